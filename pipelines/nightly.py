"""The nightly job: ingest, encode, and (as their issues land) align, fuse and recommend, into one dated run.

    mmfuse nightly --catalog=PATH --interactions=PATH --output=ROOT [--run_date=YYYY-MM-DD] [Beam options]
"""
from __future__ import annotations

import sys

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import encode, ingest
from pipelines.job import Job, run_job
from pipelines.options import require


def build(job: Job, options: PipelineOptions) -> None:
    require(options, "interactions")
    items, columns = ingest.read_catalog(job, options)
    ingest.read_interactions(job, options, items)
    encode.encode(job, options, items, columns)


def main(argv: list[str] | None = None) -> int:
    return run_job("nightly", build, argv)


if __name__ == "__main__":
    sys.exit(main())
