"""Ingest: read the catalog and the interactions, keep what meets the contract, dead-letter the rest.

``mmfuse ingest`` runs only this, as a check of new input data: its run folder holds ``dead_letter`` and
``metrics.json``.
"""
from __future__ import annotations

import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import options as o
from pipelines.job import Job, run_job
from transforms.contract import ContractError, check_catalog_schema, check_interactions_schema
from transforms.parquet import ReadRows, plan
from transforms.privacy import load_key
from transforms.validate import ValidateCatalog, ValidateInteractions


def read_catalog(job: Job, options: PipelineOptions):
    """Valid catalog items, one per ``item_id``, as ``(item_id, item)``, and the columns the files have."""
    spec = o.catalog_columns(options)
    path = options.view_as(o.RunOptions).catalog
    work, columns = plan(path, lambda f, cols: check_catalog_schema(f, cols, spec))
    if not work:
        raise ContractError(f"{path}: the catalog has no rows")
    rows = job.pipeline | "ReadCatalog" >> ReadRows(work, spec.all)
    items, dead = rows | "ValidateCatalog" >> ValidateCatalog(spec)
    return job.stage(ValidateCatalog.STAGE, rows, items, dead), columns


def read_interactions(job: Job, options: PipelineOptions, items):
    """Valid interactions on catalog items, as dicts with ``timestamp`` in epoch seconds."""
    run, privacy = options.view_as(o.RunOptions), options.view_as(o.PrivacyOptions)
    spec = o.interaction_columns(options)
    key = load_key(privacy.pseudonym_key_file) if privacy.pseudonymize_user_ids else None
    work, _ = plan(run.interactions, lambda f, cols: check_interactions_schema(f, cols, spec))
    rows = job.pipeline | "ReadInteractions" >> ReadRows(work, spec.all)
    item_ids = items | "ItemIds" >> beam.Keys()
    events, dead = rows | "ValidateInteractions" >> ValidateInteractions(spec, run.run_date, item_ids, key)
    return job.stage(ValidateInteractions.STAGE, rows, events, dead)


def build(job: Job, options: PipelineOptions) -> None:
    items, _ = read_catalog(job, options)
    if options.view_as(o.RunOptions).interactions:
        read_interactions(job, options, items)


def main(argv: list[str] | None = None) -> int:
    return run_job("ingest", build, argv)


if __name__ == "__main__":
    sys.exit(main())
