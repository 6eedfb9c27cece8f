"""The nightly job: ingest, encode, align and fuse, recommend, into one dated run.

    mmfuse nightly --catalog=PATH --interactions=PATH --output=ROOT [--run_date=YYYY-MM-DD] [Beam options]
"""
from __future__ import annotations

import sys

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import align, encode, ingest, recommend
from pipelines.job import Job, run_job
from pipelines.options import require


class NightlyOptions(PipelineOptions):
    """How long dated runs are kept."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--keep_days", type=int, default=None,
                            help="Once a run is complete, remove runs and staging dated more than this many days "
                                 "before --run_date; the newest complete run always stays (default: keep all)")


def build(job: Job, options: PipelineOptions) -> None:
    require(options, "interactions")
    job.run.keep_days = options.view_as(NightlyOptions).keep_days  # the commit prunes, on any runner
    items, columns = ingest.read_catalog(job, options)
    interactions = ingest.read_interactions(job, options, items)
    rows, modalities = encode.encode(job, options, items, columns)
    items = align.align(job, options, rows, interactions, modalities)
    recommend.recommend(job, options, items, interactions)


def main(argv: list[str] | None = None) -> int:
    return run_job("nightly", build, argv)


if __name__ == "__main__":
    sys.exit(main())
