"""The nightly job: ingest, encode, align and fuse, recommend, summarise, into one dated run.

    mmfuse nightly --catalog=PATH --interactions=PATH --output=ROOT [--run_date=YYYY-MM-DD] [Beam options]
"""
from __future__ import annotations

import sys

from mmfuse.pipelines import align, encode, ingest, recommend, summary
from mmfuse.pipelines.config import Config
from mmfuse.pipelines.job import Job, run_job


def build(job: Job, config: Config) -> None:
    config.run.require("interactions")
    job.run.keep_days = config.run.keep_days  # the commit prunes, on any runner
    items, columns = ingest.read_catalog(job, config)
    interactions = ingest.read_interactions(job, config, items)
    rows, modalities = encode.encode(job, config, items, columns)
    fused, artifact = align.align(job, config, rows, interactions, modalities)
    ranked = recommend.recommend(job, config.recommend, fused, interactions)
    summary.summarize(job, config, items, fused, interactions, ranked, artifact, modalities)


def main(argv: list[str] | None = None) -> int:
    return run_job("nightly", build, argv)


if __name__ == "__main__":
    from mmfuse.runners import process
    process.quiet_console(verbose="--verbose" in sys.argv)
    sys.exit(main())
