"""Encode: one embedding per item and modality, written as the ``embeddings`` dataset.

Media named by URI are fetched first (a missing file dead-letters that modality only). Each modality is a
branch yielding ``(item_id, (modality, vector, hash))``; the branches merge into one row per item.
"""
from __future__ import annotations

import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import ingest
from pipelines import options as o
from pipelines.job import Job, run_job
from transforms import embed, media


def fetch_media(job: Job, options: PipelineOptions, items):
    limit = options.view_as(o.RunOptions).max_media_bytes
    for kind in ("image", "audio"):
        fetched, dead = items | f"Fetch {kind}" >> media.FetchMedia(kind, limit)
        job.stage(f"media:{kind}",
                  items | f"With {kind} before" >> beam.Filter(media.has(kind)),
                  fetched | f"With {kind} after" >> beam.Filter(media.has(kind)),
                  dead)
        items = fetched
    return items


def encode(job: Job, options: PipelineOptions, items):
    """Embeddings rows for every item: one column per modality, null where the item lacks it."""
    spec = o.catalog_columns(options)
    items = fetch_media(job, options, items)
    branches = {"items": items}
    for name, dim in spec.vectors:
        has = items | f"Has {name}" >> beam.Filter(lambda e, n=name: n in e[1]["vectors"])
        vectors, dead = has | f"Encode {name}" >> embed.PrecomputedVectors(name, dim)
        branches[name] = job.stage(f"encode:{name}", has, vectors, dead)
    modalities = [name for name, _ in spec.vectors]
    rows = branches | "MergeEmbeddings" >> embed.MergeEmbeddings(modalities)
    job.stage("encode", items, rows)
    job.write("embeddings", rows, embed.schema(modalities))
    return rows


def build(job: Job, options: PipelineOptions) -> None:
    encode(job, options, ingest.read_catalog(job, options))


def main(argv: list[str] | None = None) -> int:
    return run_job("encode", build, argv)


if __name__ == "__main__":
    sys.exit(main())
