"""Ingest: read the catalog and the interactions, keep what meets the contract, dead-letter the rest.

``mmfuse ingest`` runs only this, as a check of new input data: its run folder holds ``dead_letter`` and
``metrics.json``.
"""
from __future__ import annotations

import sys

import apache_beam as beam

from mmfuse.pipelines.config import Config
from mmfuse.pipelines.job import Job, run_job
from mmfuse.transforms.contract import ContractError, check_catalog_schema, check_interactions_schema
from mmfuse.transforms.parquet import ReadRows, plan
from mmfuse.transforms.validate import ValidateCatalog, ValidateInteractions


def read_catalog(job: Job, config: Config) -> tuple[beam.PCollection, set[str]]:
    """Valid catalog items, one per ``item_id``, as ``(item_id, item)``, and the columns the files have."""
    spec, path = config.catalog, config.run.catalog
    work, columns = plan(path, lambda f, cols: check_catalog_schema(f, cols, spec))
    if not work:
        raise ContractError(f"{path}: the catalog has no rows")
    rows = job.pipeline | "ReadCatalog" >> ReadRows(work, spec.all)
    items, dead = rows | "ValidateCatalog" >> ValidateCatalog(spec)
    return job.stage(ValidateCatalog.STAGE, rows, items, dead), columns


def read_interactions(job: Job, config: Config, items: beam.PCollection) -> beam.PCollection:
    """Valid interactions on catalog items, as dicts with ``timestamp`` in epoch seconds."""
    run, spec = config.run, config.interactions
    work, _ = plan(run.interactions, lambda f, cols: check_interactions_schema(f, cols, spec))
    rows = job.pipeline | "ReadInteractions" >> ReadRows(work, spec.all)
    item_ids = items | "ItemIds" >> beam.Keys()
    events, dead = rows | "ValidateInteractions" >> ValidateInteractions(spec, run.run_date, item_ids,
                                                                        run.pseudonym_key)
    return job.stage(ValidateInteractions.STAGE, rows, events, dead)


def build(job: Job, config: Config) -> None:
    items, _ = read_catalog(job, config)
    if config.run.interactions:
        read_interactions(job, config, items)


def main(argv: list[str] | None = None) -> int:
    return run_job("ingest", build, argv)


if __name__ == "__main__":
    from mmfuse.runners import process
    process.quiet_console(verbose="--verbose" in sys.argv)
    sys.exit(main())
