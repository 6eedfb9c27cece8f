"""Dated run folders that are trusted only when complete.

A run writes into ``ROOT/_staging/<date>/<run_id>/`` and, once every dataset is written, a single commit
step writes ``metrics.json``, moves the staged files to ``ROOT/<date>/`` (replacing an older attempt) and
writes ``_SUCCESS`` last. A killed run therefore never leaves a folder that looks complete, and a reader
(the next night, a user) trusts only ``ROOT/<date>`` folders holding ``_SUCCESS``. The commit runs inside
the pipeline, so it also happens on runners whose launcher does not wait for the job (Dataflow templates).
Paths go through Beam's ``FileSystems``, so the same code serves local disks and ``gs://``. On an object
store a folder is only a name prefix (``exists`` is false for it and deleting it removes nothing), so
folders here are tested and removed by what lies under them.
"""
from __future__ import annotations

import datetime as dt
import json
import posixpath
import re
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms import counting
from transforms.contract import ContractError

SUCCESS = "_SUCCESS"
METRICS = "metrics.json"
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

    def clear_stale_staging(self) -> None:
        """Remove what killed runs of this date left in staging (one run of a date at a time)."""
        _remove_tree(self._staging_date)

    def commit(self, report: dict) -> None:
        """Write the report, publish the staged files as ``ROOT/<date>``, mark it complete, prune old runs."""
        with FileSystems.create(_join(self.staging, METRICS)) as f:
            f.write(json.dumps(report, indent=2, sort_keys=True).encode())
        _remove_tree(self.final)
        sources = _files_under(self.staging)
        targets = [self.final + src[len(self.staging):] for src in sources]
        for folder in sorted({posixpath.dirname(t) for t in targets}):
            if not FileSystems.exists(folder):
                FileSystems.mkdirs(folder)
        FileSystems.rename(sources, targets)
        with FileSystems.create(_join(self.final, SUCCESS)) as f:
            f.write(f"{self.run_id}\n".encode())
        _remove_tree(self._staging_date)
        if self.keep_days is not None:
            prune(self.root, self.run_date, self.keep_days)


class CommitRun(beam.PTransform):
    """Last step of a run: waits for every write, checks the counts reconcile, then commits.

    ``written`` are the PCollections of file names the writes return; taking them as side inputs makes
    this step run only after all of them are finalised.
    """

    def __init__(self, run: RunFolder, counts: list, written: list, extra: dict | None = None):
        super().__init__()
        self._run, self._counts, self._written, self._extra = run, counts, written, extra or {}

    def expand(self, pbegin):
        run, extra = self._run, self._extra
        counts = self._counts | "FlattenCounts" >> beam.Flatten()

        def commit(_, counts, *written):
            report = {"run_date": run.run_date, "run_id": run.run_id, **extra, **counting.report(counts)}
            broken = counting.unreconciled(report.get("stages", {}))
            if broken:
                raise RuntimeError(f"record counts do not reconcile (in != out + dead): {broken}")
            report["files"] = sum(len(w) for w in written)
            run.commit(report)
            yield run.final

        return (pbegin
                | "Once" >> beam.Create([None])
                | "Commit" >> beam.FlatMap(commit, beam.pvalue.AsList(counts),
                                           *[beam.pvalue.AsList(w) for w in self._written]))
