"""Encode: one embedding per item and modality, written as the ``embeddings`` dataset.

Media named by URI are fetched first (a missing file dead-letters that modality only). Each modality is a
branch yielding ``(item_id, (modality, vector, hash))``; vectors whose content hash is unchanged since the
previous run are reused, the rest run through the modality's model; the branches merge into one row per item.
"""
from __future__ import annotations

import string
import sys

import apache_beam as beam

from mmfuse.models.registry import MODALITIES
from mmfuse.pipelines import ingest
from mmfuse.pipelines.config import Config, RunConfig
from mmfuse.pipelines.job import Job, run_job
from mmfuse.pipelines.resolve import check_custom_encoders, choose_modalities, encoder_factory, previous_run
from mmfuse.transforms import embed, media
from mmfuse.transforms.contract import CatalogColumns, ContractError
from mmfuse.transforms.deadletter import DEAD
from mmfuse.transforms.parquet import ReadRows, plan
from mmfuse.transforms.runs import has_dataset


def fetch_media(job: Job, run: RunConfig, items: beam.PCollection, kinds: list[str]) -> beam.PCollection:
    """Read the media of these kinds that items name by URI (audio by reference: its decoder seeks to the
    windows it keeps); a missing file dead-letters that medium only."""
    for kind in kinds:
        fetched, dead = items | f"Fetch {kind}" >> media.FetchMedia(kind, run.max_media_bytes, run.media_roots,
                                                                    in_parts=kind == "audio")
        job.stage(f"media:{kind}",
                  items | f"With {kind} before" >> beam.Filter(media.has(kind)),
                  fetched | f"With {kind} after" >> beam.Filter(media.has(kind)),
                  dead)
        items = fetched
    return items


CHARS_PER_TOKEN = 128  # a text column is cut at --text_max_tokens times this: far more than the model reads


def _raw(source: str, spec: CatalogColumns, template: str, max_tokens: int):
    if source == "text":
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        if fields - set(spec.text):
            raise ContractError(f"--text_template names {sorted(fields - set(spec.text))}, which are not among "
                                f"the --text_columns {list(spec.text)}")
        return lambda item: embed.join_text(item["text"], spec.text, template, max_tokens * CHARS_PER_TOKEN)
    return lambda item: item[source]


def encode(job: Job, config: Config, items: beam.PCollection, columns: set[str]) -> tuple[beam.PCollection, list[str]]:
    """Embeddings rows for every item (one column per modality, null where the item lacks it), and the
    modalities encoded."""
    spec, opts = config.catalog, config.encode
    chosen = choose_modalities(opts.modalities, spec, columns)
    check_custom_encoders(opts)
    hints = {"accelerator": opts.accelerator} if opts.accelerator else {}
    previous = previous_run(config)
    job.report["previous"] = previous
    before = None
    if previous and has_dataset(previous, "embeddings"):
        work, _ = plan(f"{previous}/embeddings", lambda f, c: None)
        wanted = ["item_id"] + [c for m in chosen for c in (m, f"{m}_hash")]
        before = job.pipeline | "ReadPrevious" >> ReadRows(work, wanted) | "Rows" >> beam.Values()

    needed = sorted({MODALITIES[m].source for m in chosen if m in MODALITIES} & {"image", "audio"})
    items = fetch_media(job, config.run, items, needed)
    branches = {"items": items}
    for m in chosen:
        if m in MODALITIES:
            prev = before | f"Previous {m}" >> embed.PreviousVectors(m) if before is not None else None
            raw = _raw(MODALITIES[m].source, spec, opts.text_template, opts.text_max_tokens)
            out = items | f"Encode {m}" >> embed.EncodeModality(
                m, raw, encoder_factory(opts, m), opts.batch_sizes.get(m, MODALITIES[m].batch_size), hints, prev)
            vectors = (out["encoded"], out[embed.REUSED]) | f"Vectors {m}" >> beam.Flatten()
            job.count("modalities", m, encoded=out["encoded"], reused=out[embed.REUSED], dead=out[DEAD])
            branches[m] = job.stage(f"encode:{m}", out["in"], vectors, out[DEAD])
        else:
            has = items | f"Has {m}" >> beam.Filter(lambda e, n=m: n in e[1]["vectors"])
            vectors, dead = has | f"Encode {m}" >> embed.PrecomputedVectors(m, dict(spec.vectors)[m])
            job.count("modalities", m, encoded=vectors, dead=dead)
            branches[m] = job.stage(f"encode:{m}", has, vectors, dead)
    rows = branches | "MergeEmbeddings" >> embed.MergeEmbeddings(chosen)
    job.stage("encode", items, rows)
    job.write("embeddings", rows, embed.schema(chosen))
    return rows, chosen


def build(job: Job, config: Config) -> None:
    encode(job, config, *ingest.read_catalog(job, config))


def main(argv: list[str] | None = None) -> int:
    return run_job("encode", build, argv)


if __name__ == "__main__":
    from mmfuse.runners import process
    process.quiet_console(verbose="--verbose" in sys.argv)
    sys.exit(main())
