"""Encode: one embedding per item and modality, written as the ``embeddings`` dataset.

Media named by URI are fetched first (a missing file dead-letters that modality only). Each modality is a
branch yielding ``(item_id, (modality, vector, hash))``; vectors whose content hash is unchanged since the
previous run are reused, the rest run through the modality's model; the branches merge into one row per item.
"""
from __future__ import annotations

import string
import sys

import apache_beam as beam

from mmfuse.models.registry import MODALITIES, factory
from mmfuse.pipelines import ingest
from mmfuse.pipelines.config import Config, EncodeConfig, RunConfig
from mmfuse.pipelines.job import Job, run_job
from mmfuse.transforms import embed, media
from mmfuse.transforms.contract import CatalogColumns, ContractError
from mmfuse.transforms.deadletter import DEAD
from mmfuse.transforms.parquet import ReadRows, plan
from mmfuse.transforms.runs import has_dataset, is_complete, latest_complete


def fetch_media(job: Job, run: RunConfig, items, kinds: list[str]):
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


def choose_modalities(asked: tuple[str, ...], spec: CatalogColumns, columns: set[str]) -> list[str]:
    """The asked-for modalities, or every one the catalog has columns for."""
    sources = {"text": bool(columns & set(spec.text)),
               "image": bool(columns & {spec.image_bytes, spec.image_uri}),
               "audio": bool(columns & {spec.audio_bytes, spec.audio_uri})}
    available = [m for m, s in MODALITIES.items() if sources[s.source]] + [n for n, _ in spec.vectors]
    unknown = [m for m in asked if m not in MODALITIES and m not in dict(spec.vectors)]
    if unknown:
        raise ContractError(f"--modalities: unknown {unknown}; known: {list(MODALITIES)} and declared "
                            f"--vector_columns {[n for n, _ in spec.vectors]}")
    return [m for m in available if m in asked] if asked else available


def previous_run(config: Config) -> str | None:
    run, choice = config.run, config.encode.previous
    if choice == "none":
        return None
    if choice == "auto":
        return latest_complete(run.output, run.run_date)
    if not is_complete(choice):
        raise ContractError(f"--previous={choice}: not a complete run (no _SUCCESS)")
    return choice.rstrip("/")


def encoder_factory(opts: EncodeConfig, modality: str):
    """The modality's default encoder, or the user's own model named by ``--custom_encoders``, with its settings."""
    custom = opts.custom_encoders
    windows = {"max_windows": opts.audio_max_windows}
    if modality in custom:
        path, pinned = custom[modality]
        settings = {"image": {"image_size": opts.custom_image_size}, "audio_mfcc": windows, "audio_musicnn": windows}
        return factory(modality, path, pinned=pinned, **settings.get(modality, {}))
    settings = {"text": {"max_length": opts.text_max_tokens}, "audio_mfcc": windows, "audio_musicnn": windows}
    return factory(modality, None, **settings.get(modality, {}))


def check_custom_encoders(opts: EncodeConfig) -> None:
    """Before anything runs: known modalities, SavedModels only when trusted, pinned digests matching."""
    custom = opts.custom_encoders
    unknown = set(custom) - set(MODALITIES)
    if unknown:
        raise ContractError(f"--custom_encoders: unknown modalities {sorted(unknown)}; known: {list(MODALITIES)}")
    if not custom:
        return
    from mmfuse.models.custom import is_saved_model  # loads Keras: only when there are custom models
    for modality, (path, _) in custom.items():
        if is_saved_model(path) and not opts.trust_custom_models:
            raise ContractError(f"--custom_encoders: {modality}={path} is a SavedModel, whose graph can read and "
                                "write files on the workers; pass --trust_custom_models to run it (and pin it: "
                                "PATH@sha256:DIGEST)")
        try:
            encoder_factory(opts, modality)().check_pinned()
        except ValueError as e:
            raise ContractError(f"--custom_encoders: {e}") from None


CHARS_PER_TOKEN = 128  # a text column is cut at --text_max_tokens times this: far more than the model reads


def _raw(source: str, spec: CatalogColumns, template: str, max_tokens: int):
    if source == "text":
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        if fields - set(spec.text):
            raise ContractError(f"--text_template names {sorted(fields - set(spec.text))}, which are not among "
                                f"the --text_columns {list(spec.text)}")
        return lambda item: embed.join_text(item["text"], spec.text, template, max_tokens * CHARS_PER_TOKEN)
    return lambda item: item[source]


def modality_dims(config: Config, modalities: list[str]) -> dict[str, int]:
    """Each modality's vector length, known before anything runs (custom encoders' only after they run)."""
    declared = dict(config.catalog.vectors)
    dims = {m: declared[m] if m in declared else encoder_factory(config.encode, m)().dim for m in modalities}
    unknown = sorted(m for m, d in dims.items() if not d)
    if unknown:
        raise ContractError(f"the vector length of {unknown} (custom encoders) is unknown before they run: "
                            f"use --align=contrastive, which learns it from the data")
    return dims


def encode(job: Job, config: Config, items, columns: set[str]):
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
    sys.exit(main())
