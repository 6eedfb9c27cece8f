"""Dated run folders that are trusted only when complete.

A run writes into ``ROOT/_staging/<date>/<run_id>/`` and, once every dataset is written, a single commit
step writes ``metrics.json``, moves the staged files to ``ROOT/<date>/`` (replacing an older attempt) and
writes ``_SUCCESS`` last. A killed run therefore never leaves a folder that looks complete, and a reader
(the next night, a user) trusts only ``ROOT/<date>`` folders holding ``_SUCCESS``. The commit runs inside
the pipeline, so it also happens on runners whose launcher does not wait for the job (Dataflow templates).
Paths go through Beam's ``FileSystems``, so the same code serves local disks and ``gs://``.
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
    if not FileSystems.exists(path):
        return []
    return sorted(m.path for m in FileSystems.match([_join(path, "**")])[0].metadata_list)


def is_complete(run_dir: str) -> bool:
    return FileSystems.exists(_join(run_dir, SUCCESS))


def latest_complete(root: str, before: str) -> str | None:
    """The newest complete ``ROOT/<date>`` strictly before ``before``, or None."""
    if not FileSystems.exists(root):
        return None
    dates = {posixpath.basename(posixpath.dirname(m.path.rstrip("/")))
             for m in FileSystems.match([_join(root, "*", SUCCESS)])[0].metadata_list}
    earlier = sorted(d for d in dates if _DATE.match(d) and d < before)
    return _join(root, earlier[-1]) if earlier else None


class RunFolder:
    """Where one run of one date writes; picklable so the commit step can run on a worker."""

    def __init__(self, root: str, run_date: str, run_id: str | None = None):
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

    def dataset_prefix(self, dataset: str) -> str:
        return _join(self.staging, dataset, "part")

    def clear_stale_staging(self) -> None:
        """Remove what killed runs of this date left in staging (one run of a date at a time)."""
        if FileSystems.exists(self._staging_date):
            FileSystems.delete([self._staging_date])

    def commit(self, report: dict) -> None:
        """Write the report, publish the staged files as ``ROOT/<date>`` and mark it complete."""
        with FileSystems.create(_join(self.staging, METRICS)) as f:
            f.write(json.dumps(report, indent=2, sort_keys=True).encode())
        if FileSystems.exists(self.final):
            FileSystems.delete([self.final])
        sources = _files_under(self.staging)
        targets = [self.final + src[len(self.staging):] for src in sources]
        for folder in sorted({posixpath.dirname(t) for t in targets}):
            if not FileSystems.exists(folder):
                FileSystems.mkdirs(folder)
        FileSystems.rename(sources, targets)
        with FileSystems.create(_join(self.final, SUCCESS)) as f:
            f.write(f"{self.run_id}\n".encode())
        FileSystems.delete([self._staging_date])


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
