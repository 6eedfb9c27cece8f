"""Dated run folders that are trusted only when complete, one run per date at a time.

A run holds its date for its whole life: ``ROOT/_staging/<date>/_LOCK``, created only if absent (``O_EXCL``
on local disks, a generation precondition on ``gs://``), so a second run of the same date stops with one
line instead of deleting the first one's work. It writes into ``ROOT/_staging/<date>/<run_id>/`` and, once
every dataset is written, one commit step publishes it, as output committers do:

1. ``metrics.json`` is staged, and every file the run wrote is checked to be there;
2. a journal, ``_staging/<date>/<run_id>.ready``, lists the night's files: from here the night is
   committed, and a commit cut short is finished by the next run of that date (roll forward);
3. ``ROOT/<date>/_SUCCESS`` is removed first, then the old night's other files, the new files are moved in,
   ``_SUCCESS`` is written last, and staging, journal and lock are removed.

A reader (the next night, ``--refit``, ``--keep_days``, a user) trusts only ``ROOT/<date>`` folders that hold
``_SUCCESS``: it sees the old complete night, the new complete night, or, while a rerun's commit moves files,
no complete night of that date, never a partial one. The commit runs inside the pipeline, so it also happens
on runners whose launcher does not wait for the job. Paths go through Beam's ``FileSystems``, so the same
code serves local disks and ``gs://``. On an object store a folder is only a name prefix (``exists`` is
false for it and deleting it removes nothing), so folders here are tested and removed by what lies under
them.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import re
import signal
import socket
import uuid
from typing import Callable, Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from mmfuse.transforms import counting
from mmfuse.transforms.contract import ContractError

SUCCESS = "_SUCCESS"
METRICS = "metrics.json"
LOCK = "_LOCK"
READY = ".ready"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _join(*parts: str) -> str:
    return FileSystems.join(*parts) if "://" in parts[0] else posixpath.join(*parts)


def _files_under(path: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([_join(path, "**")])[0].metadata_list)


def _remove_tree(path: str) -> None:
    """Delete a folder and all under it; on object stores the trailing ``/`` deletes the whole prefix."""
    if FileSystems.exists(path) or _files_under(path):
        FileSystems.delete([path.rstrip("/") + "/" if "://" in path else path])


def _dates(root: str, pattern: str) -> set[str]:
    """The date-named first-level folders of ``root`` under which ``pattern`` (starting at them) matches."""
    matched = FileSystems.match([_join(root, pattern)])[0].metadata_list
    firsts = {m.path[len(root):].lstrip("/").split("/")[0] for m in matched}
    return {d for d in firsts if _DATE.match(d)}


def has_dataset(run_dir: str, dataset: str) -> bool:
    """Whether a run wrote this dataset (tested by its files, as a folder does not exist on object stores)."""
    return bool(_files_under(_join(run_dir.rstrip("/"), dataset)))


def is_complete(run_dir: str) -> bool:
    return FileSystems.exists(_join(run_dir, SUCCESS))


def latest_complete(root: str, before: str) -> str | None:
    """The newest complete ``ROOT/<date>`` strictly before ``before``, or None."""
    root = root.rstrip("/")
    earlier = sorted(d for d in _dates(root, f"*/{SUCCESS}") if d < before)
    return _join(root, earlier[-1]) if earlier else None


def _check_keep_days(keep_days: int | None) -> None:
    if keep_days is not None and keep_days < 0:
        raise ContractError(f"--keep_days={keep_days}: must be 0 or more")


def prune(root: str, run_date: str, keep_days: int) -> list[str]:
    """Remove date folders (complete or not) and staging dated before ``run_date - keep_days``; returns them.

    Never touches ``run_date`` itself, dates after it (a backfill must not delete newer nights) or the
    newest complete run up to ``run_date``, which the next night reuses even after a gap of many days.
    """
    _check_keep_days(keep_days)
    root = root.rstrip("/")
    cutoff = (dt.date.fromisoformat(run_date) - dt.timedelta(days=keep_days)).isoformat()
    keep = latest_complete(root, (dt.date.fromisoformat(run_date) + dt.timedelta(days=1)).isoformat())
    old = [_join(root, d) for d in sorted(_dates(root, "*/**")) if d < cutoff]
    old += [_join(root, "_staging", d) for d in sorted(_dates(_join(root, "_staging"), "*/**")) if d < cutoff]
    removed = [path for path in old if path != keep]
    for path in removed:
        _remove_tree(path)
    return removed


def _step(name: str) -> None:
    """Fault injection for tests: ``MMFUSE_KILL_AT=<step>`` kills the process (SIGKILL) at that commit step."""
    if os.environ.get("MMFUSE_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` in one step if it does not exist; False if it does. Local disks:
    ``O_EXCL``; ``gs://``: ``ifGenerationMatch=0``. Other stores have no such primitive: a check, then a
    write."""
    if "://" not in path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if path.startswith("gs://"):
        import gcsfs
        try:
            gcsfs.GCSFileSystem().pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    if FileSystems.exists(path):
        return False
    with FileSystems.create(path) as f:
        f.write(data)
    return True


def _read_json(path: str):
    """The file's JSON; None when it is absent (asked first: an object store's "not found" is no OSError) or
    cut short by a kill."""
    if not FileSystems.exists(path):
        return None
    try:
        with FileSystems.open(path) as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError):  # gone meanwhile on a local disk, or a partial file
        return None


def _dead(holder: dict) -> bool:
    """Whether the lock's holder provably died: a process of this host that no longer exists."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


class RunFolder:
    """Where one run of one date writes; picklable so the commit step can run on a worker."""

    def __init__(self, root: str, run_date: str, run_id: str | None = None, keep_days: int | None = None):
        try:
            dt.date.fromisoformat(run_date)
        except ValueError:
            raise ContractError(f"--run_date={run_date!r} is not a date (YYYY-MM-DD)") from None
        self.root = root.rstrip("/")
        self.run_date = run_date
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.final = _join(self.root, run_date)
        self._staging_date = _join(self.root, "_staging", run_date)
        self.staging = _join(self._staging_date, self.run_id)
        # Scratch space of the run's steps: beside its staging (never published), removed with it.
        self.temp = _join(self._staging_date, f"{self.run_id}.tmp")
        self._lock = _join(self._staging_date, LOCK)
        self.keep_days = keep_days

    @property
    def keep_days(self) -> int | None:
        """When set, the commit prunes older runs (see ``prune``), inside the pipeline like the commit."""
        return self._keep_days

    @keep_days.setter
    def keep_days(self, value: int | None) -> None:
        _check_keep_days(value)  # while the job is built, not in the commit after the whole run
        self._keep_days = value

    def dataset_prefix(self, dataset: str) -> str:
        return _join(self.staging, dataset, "part")

    def acquire(self) -> None:
        """Hold the date for this run; raises ContractError naming the run that holds it. A lock whose
        holder provably died (a process of this host that is gone) is taken over."""
        me = json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                         "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}).encode()
        if _create_exclusive(self._lock, me):
            return
        holder = _read_json(self._lock) or {}
        if _dead(holder):
            FileSystems.delete([self._lock])
            if _create_exclusive(self._lock, me):
                return
            holder = _read_json(self._lock) or {}
        raise ContractError(
            f"{self.run_date} is being written into {self.root} by another run (run {holder.get('run_id')}, "
            f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}); wait for it, or "
            f"remove {self._lock} if that run is dead")

    def release(self) -> None:
        """Let the date go, if this run still holds it (the commit releases it too)."""
        if (_read_json(self._lock) or {}).get("run_id") == self.run_id:
            FileSystems.delete([self._lock])

    def recover(self) -> None:
        """With the date held: finish the commit of an earlier run of this date that was cut short (its
        journal exists), then remove what other earlier runs left in staging."""
        journals = FileSystems.match([_join(self._staging_date, f"*{READY}")])[0].metadata_list
        for journal in sorted(m.path for m in journals):
            names = _read_json(journal)
            if names is not None:
                RunFolder(self.root, self.run_date, posixpath.basename(journal)[:-len(READY)])._publish(names)
        leftovers = [path for path in _files_under(self._staging_date) if path != self._lock]
        if leftovers:
            FileSystems.delete(leftovers)
        if "://" not in self._staging_date:  # a local disk keeps the emptied folders
            for parent, _, _ in sorted(os.walk(self._staging_date), reverse=True):
                if parent != self._staging_date and not os.listdir(parent):
                    os.rmdir(parent)

    def commit(self, report: dict, written: list[str] | None = None) -> None:
        """Stage the report, check every written file is there, journal the night, publish it, release."""
        with FileSystems.create(_join(self.staging, METRICS)) as f:
            f.write(json.dumps(report, indent=2, sort_keys=True).encode())
        missing = [w for w in written or [] if not (FileSystems.exists(w) or _files_under(w))]
        if missing:
            raise RuntimeError(f"{len(missing)} written file(s) are missing from staging, e.g. {missing[0]}")
        names = [path[len(self.staging):].lstrip("/") for path in _files_under(self.staging)]
        _step("journal")
        with FileSystems.create(self.staging + READY) as f:
            f.write(json.dumps(names).encode())
        self._publish(names)
        _remove_tree(self._staging_date)  # stale runs' leftovers were removed at the start; the lock goes too
        if self.keep_days is not None:
            prune(self.root, self.run_date, self.keep_days)

    def _publish(self, names: list[str]) -> None:
        """The journal's steps after it is written; each may be repeated (a roll forward repeats them)."""
        _step("unmark")
        if FileSystems.exists(_join(self.final, SUCCESS)):
            FileSystems.delete([_join(self.final, SUCCESS)])
        _step("clear")
        keep = {_join(self.final, name) for name in names}
        old = [path for path in _files_under(self.final) if path not in keep]
        if old:
            FileSystems.delete(old)
        _step("move")
        moves = [(_join(self.staging, n), _join(self.final, n)) for n in names]
        moves = [(src, dst) for src, dst in moves if FileSystems.exists(src)]  # a roll forward skips moved ones
        for folder in sorted({posixpath.dirname(dst) for _, dst in moves}):
            if not FileSystems.exists(folder):
                FileSystems.mkdirs(folder)
        if moves:
            FileSystems.rename([src for src, _ in moves], [dst for _, dst in moves])
        _step("mark")
        with FileSystems.create(_join(self.final, SUCCESS)) as f:
            f.write(f"{self.run_id}\n".encode())
        _step("clean")
        for path in (self.staging, self.temp):
            _remove_tree(path)
        if FileSystems.exists(self.staging + READY):
            FileSystems.delete([self.staging + READY])


class TooManyDeadLetters(RuntimeError):
    """A stage refused more than ``--max_dead_fraction`` of its records: the night is not published."""

    MARK = "too many dead letters: "

    @classmethod
    def find(cls, error: BaseException) -> str | None:
        """The one-line message, from the exception or from a runner's wrapping of it (which keeps its text)."""
        text = str(error)
        at = text.find(cls.MARK)
        return re.sub(r" \[while running '[^']*'\]$", "", text[at:].splitlines()[0]) if at >= 0 else None


def _too_dead(stages: dict, reasons: dict, limit: float, staging: str) -> str | None:
    over = [(name, c) for name, c in sorted(stages.items()) if c.get("in") and c.get("dead", 0) > limit * c["in"]]
    if not over:
        return None
    parts = []
    for name, c in over:
        top = sorted(reasons.get(name, {}).items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        parts.append(f"stage {name} dead-lettered {c['dead']} of {c['in']} records ({c['dead'] / c['in']:.0%}; "
                     + ", ".join(f"{error} {n}" for error, n in top) + ")")
    return (TooManyDeadLetters.MARK + "; ".join(parts) + f", above --max_dead_fraction={limit:g}; nothing was "
            f"published, the dead letters are in {_join(staging, 'dead_letter')}")


class CommitRun(beam.PTransform):
    """Last step of a run: waits for every write, checks the counts reconcile, then commits.

    ``written`` are the PCollections of file names the writes return; taking them as side inputs makes
    this step run only after all of them are finalised. ``alerts(report)`` names the thresholds the night
    breached (kept in the report as ``alerts``; the night still commits); ``pages(report)`` gives files
    drawn from the report (``{name: text}``), published with the night.
    """

    def __init__(self, run: RunFolder, counts: list, written: list, extra: dict, reasons: beam.PCollection,
                 max_dead_fraction: float = 1.0, alerts: Callable[[dict], list[str]] | None = None,
                 pages: Callable[[dict], dict[str, str]] | None = None):
        super().__init__()
        self._run, self._counts, self._written, self._extra = run, counts, written, extra
        self._reasons, self._max_dead, self._alerts, self._pages = reasons, max_dead_fraction, alerts, pages

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        run, extra, limit, alerts, pages = self._run, self._extra, self._max_dead, self._alerts, self._pages
        counts = self._counts | "FlattenCounts" >> beam.Flatten()

        def commit(_: None, counts: list[tuple], reasons: list[tuple[tuple[str, str], int]],
                   *written: list) -> Iterator[str]:
            report = {"run_date": run.run_date, "run_id": run.run_id, **extra, **counting.report(counts)}
            broken = counting.unreconciled(report.get("stages", {}))
            if broken:
                raise RuntimeError(f"record counts do not reconcile (in != out + dead): {broken}")
            report["dead_letters"] = {}
            for (stage, error), n in sorted(reasons):
                report["dead_letters"].setdefault(stage, {})[error] = n
            refused = _too_dead(report.get("stages", {}), report["dead_letters"], limit, run.staging)
            if refused:
                raise TooManyDeadLetters(refused)
            report["files"] = sum(len(w) for w in written)
            report["alerts"] = alerts(report) if alerts else []
            try:  # a page is a view of the report: failing to draw it must not cost the night
                drawn = pages(report) if pages else {}
            except Exception:  # noqa: BLE001 - logged with its traceback; the night goes on without the page
                logging.exception("could not draw the run's pages; the night is published without them")
                drawn = {}
            for name, text in drawn.items():
                with FileSystems.create(_join(run.staging, name), mime_type="text/html") as f:
                    f.write(text.encode())
            run.commit(report, [path for w in written for path in w if isinstance(path, str)])
            yield run.final

        return (pbegin
                | "Once" >> beam.Create([None])
                | "Commit" >> beam.FlatMap(commit, beam.pvalue.AsList(counts), beam.pvalue.AsList(self._reasons),
                                           *[beam.pvalue.AsList(w) for w in self._written]))
