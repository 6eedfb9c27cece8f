"""What every mmfuse job shares: counting stages, collecting dead letters, writing datasets, committing.

A job module builds its transforms on a :class:`Job` and calls :func:`run_job`; the job then writes the
dead letters and commits the dated run folder (``metrics.json`` and ``_SUCCESS`` last) inside the pipeline.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from typing import TYPE_CHECKING, Callable

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from mmfuse import runners
from mmfuse.pipelines import alerts, report
from mmfuse.pipelines.config import Config, RunConfig
from mmfuse.pipelines.options import check_known, help_text
from mmfuse.runners import process
from mmfuse.transforms import deadletter
from mmfuse.transforms.contract import ContractError
from mmfuse.transforms.counting import count_stage
from mmfuse.transforms.parquet import WriteDataset
from mmfuse.transforms.runs import METRICS, CommitRun, RunFolder, TooManyDeadLetters

if TYPE_CHECKING:
    from apache_beam.runners.runner import PipelineResult


class Job:
    def __init__(self, pipeline: beam.Pipeline, run: RunFolder):
        self.pipeline, self.run = pipeline, run
        self._counts, self._dead, self._written = [], [], []
        self.report: dict = {}  # extra keys for metrics.json, known when the job is built

    def stage(self, name: str, into: beam.PCollection, out: beam.PCollection, dead: beam.PCollection | None = None,
              section: str = "stages") -> beam.PCollection:
        """Record a stage's counts (in = out + dead) and its dead letters; returns ``out``."""
        if dead is None:
            dead = self.pipeline | f"NoDead {name}" >> beam.Create([])
        self._counts += count_stage(name, section, **{"in": into, "out": out, "dead": dead})
        self._dead.append(dead)
        return out

    def count(self, section: str, name: str, **pcolls) -> None:
        """Extra counts for the report that are not a stage, e.g. per-modality encoded/reused."""
        self._counts += count_stage(name, section, **pcolls)

    def write(self, dataset: str, pcoll: beam.PCollection, schema: pa.Schema, tables: bool = False) -> None:
        """Write ``pcoll`` (row dicts, or Arrow tables where ``tables``) as a dataset of the run."""
        self._written.append(pcoll | f"Write {dataset}" >> WriteDataset(self.run.dataset_prefix(dataset), schema,
                                                                         tables))

    def wait_for(self, pcoll: beam.PCollection) -> None:
        """Commit only after ``pcoll`` is computed: for outputs written by a step itself (model artifacts)."""
        self._written.append(pcoll)

    def figures(self, pcolls: list[beam.PCollection]) -> None:
        """Summary figures for ``metrics.json``, as ``(section, name, key, value)`` tuples (``transforms.summary``)."""
        self._counts += pcolls

    def finish(self, run: RunConfig) -> None:
        """Write the dead letters and commit the night: ``metrics.json``, ``report.html``, ``_SUCCESS``."""
        dead = self._dead | "AllDeadLetters" >> beam.Flatten(pipeline=self.pipeline)
        self.write("dead_letter", dead, deadletter.SCHEMA)
        reasons = (dead
                   | "DeadReason" >> beam.Map(lambda d: ((d["stage"], d["error"]), 1))
                   | "DeadReasons" >> beam.CombinePerKey(sum))
        _ = self.pipeline | "CommitRun" >> CommitRun(
            self.run, self._counts, self._written, self.report, reasons, run.max_dead_fraction,
            alerts=functools.partial(alerts.breaches, alert=run.alert),
            pages=lambda metrics: {report.REPORT: report.render(metrics)})


def execute(build: Callable[[Job, Config], None], argv: list[str] | None,
            started: Callable[[RunFolder], None] = lambda run: None) -> tuple[PipelineResult, RunFolder]:
    """Build and run a job to the end, calling ``started`` once the run holds its lock; returns the Beam
    result and the run folder. Raises ContractError."""
    check_known(argv)
    options = PipelineOptions(argv)
    config = Config.parse(options)
    config.run.require("catalog", "output")
    run = RunFolder(config.run.output, config.run.run_date)
    pipeline = runners.create_pipeline(options)
    job = Job(pipeline, run)
    build(job, config)
    job.finish(config.run)
    run.acquire()
    try:
        run.recover()
        started(run)
        result = pipeline.run()
        result.wait_until_finish()
    finally:
        run.release()
    return result, run


def run_job(name: str, build: Callable[[Job, Config], None], argv: list[str] | None) -> int:
    """The command line of a job: user errors become one line on stderr and exit code 2, a stage that
    dead-lettered too much exit code 3, any other failure exit code 1; a complete night that breached an
    alert threshold prints one line per breach and exits with ``alerts.ALERT_EXIT`` (4)."""
    process.prepare()
    root = logging.getLogger()
    root.setLevel(max(root.level, logging.WARNING))  # a quiet console (runners.process) may have raised it
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(help_text(name))
        return 0
    try:
        _, run = execute(build, argv, lambda run: print(f"mmfuse {name}: run {run.run_id} started for {run.final}",
                                                        flush=True))
    except ContractError as e:
        print(f"mmfuse {name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a scheduler wants one line; the log above has the traceback
        refused = TooManyDeadLetters.find(e)
        if refused:
            print(f"mmfuse {name}: error: {refused}", file=sys.stderr)
            return 3
        logging.exception("mmfuse %s failed", name)
        print(f"mmfuse {name}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return 1
    path = f"{run.final}/{METRICS}"
    metrics = None
    if FileSystems.exists(path):
        with FileSystems.open(path) as f:
            metrics = json.load(f)
    if not metrics or metrics.get("run_id") != run.run_id:  # a dry run, a template, a launcher that did not wait
        print(f"mmfuse {name}: submitted run {run.run_id} for {run.final}")
        return 0
    print("\n".join(summary(name, run.final, metrics)))
    for line in metrics.get("alerts", []):
        print(f"mmfuse {name}: alert: {line}", file=sys.stderr)
    return alerts.ALERT_EXIT if metrics.get("alerts") else 0


def summary(name: str, run_dir: str, metrics: dict) -> list[str]:
    """The console's lines for a published run: one per stage (records in -> out, dead letters, seconds from
    its first record in to its last out), then where the run and its report are."""
    seconds = metrics.get("stage_seconds", {})
    lines = [f"mmfuse {name}: {stage} {c['in']}->{c['out']} (+{c['dead']} dead)"
             + (f" {seconds[stage]:.1f} s" if stage in seconds else "") for stage, c in metrics["stages"].items()]
    dead = sum(c["dead"] for c in metrics["stages"].values())
    return [*lines, f"mmfuse {name}: wrote {run_dir} ({len(lines)} stages, {dead} dead letters); "
                    f"report: {run_dir}/{report.REPORT}"]
