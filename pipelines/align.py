"""Align and fuse: fit (or reuse) the alignment, then map every item's embeddings to one fused vector.

    mmfuse nightly ... [--align=contrastive|pca] [--dim=64|128|256] [--fusion=auto|attention|mean|weighted]
                       [--fusion_weights=text:0.6,image:0.4] [--refit=always|weekly|never]
                       [--fit_events=1000000] [--fit_items=100000] [--fit_minutes=10]

The contrastive fit trains on a bounded sample (``transforms.fit``: the newest ``--fit_events``
interactions and at most ``--fit_items`` items), in one step whose memory is set by those caps, not by the
catalogue. The fitted alignment is saved with the run (``ROOT/<date>/alignment/``: ``alignment.json`` with
its config, the sample's size and training metrics, plus ``alignment.keras`` and the cf table, or one
tf.Transform folder per modality), so later runs can apply it to new items without refitting. Items with
interactions outside the sample get cf vectors by fold-in (``transforms.foldin``). Applying the artifact is
RunInference over every item, writing ``items``:
``item_id``, ``vector`` (unit length), ``weights`` (fusion weight per present modality, summing to 1) and
``parts`` (per-modality share of the vector: they sum to it, so scores split into contributions).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import posixpath
from typing import TYPE_CHECKING, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelMetadata, RunInference

from mmfuse.models.collaborative import SOLVER_FILE, TABLE_FILE, CfTable
from mmfuse.pipelines.config import AlignSettings, Config
from mmfuse.pipelines.job import Job
from mmfuse.pipelines.resolve import modality_dims, previous_run
from mmfuse.transforms import artifacts
from mmfuse.transforms.deadletter import DEAD, dead_letter
from mmfuse.transforms.fit import FitContrastive
from mmfuse.transforms.foldin import FoldIn
from mmfuse.transforms.inference import AlignHandler

# models.align and transforms.pca import Keras and TensorFlow: imported where used, so that the command line
# answers --help and input errors without loading them.
if TYPE_CHECKING:
    from mmfuse.models.align import AlignConfig

ITEMS_SCHEMA = pa.schema([("item_id", pa.string()), ("vector", pa.list_(pa.float32())),
                          ("weights", pa.map_(pa.string(), pa.float32())),
                          ("parts", pa.map_(pa.string(), pa.list_(pa.float32())))])
ARTIFACT = "alignment"
CONFIG_FILE, FORMAT = "alignment.json", 2  # models.align.CONFIG_FILE, models.align.FORMAT


def align_config(a: AlignSettings) -> AlignConfig:
    """The ``models.align.AlignConfig`` of the alignment options (Keras loads here, not on the command line)."""
    from mmfuse.models import align
    dim = a.dim or (None if a.collaborative else align.DEFAULT_DIM)  # None: chosen by the fit
    return align.AlignConfig(dim=dim, fusion=a.fusion, fusion_weights=a.fusion_weights,
                             collaborative=a.collaborative, cf_beta=a.cf_beta, cf_anchors=a.cf_anchors,
                             epochs=a.epochs, max_seconds=60.0 * a.fit_minutes, seed=a.seed)


def _reusable(previous: str | None, max_age_days: int | None, run_date: str, kind: str) -> str | None:
    """The previous run's artifact folder when it may be reused: same kind and format, and younger than
    ``max_age_days`` (None: any age; 0: never reuse)."""
    if previous is None or max_age_days == 0:
        return None
    meta_path = posixpath.join(previous, ARTIFACT, CONFIG_FILE)
    if not FileSystems.exists(meta_path):
        return None
    with FileSystems.open(meta_path) as f:
        meta = json.load(f)
    fitted = dt.date.fromisoformat(meta.get("fitted_on", "1970-01-01"))
    outdated = meta["kind"] == "contrastive" and meta.get("format") != FORMAT
    if meta["kind"] != kind or outdated or (max_age_days is not None
                                            and (dt.date.fromisoformat(run_date) - fitted).days >= max_age_days):
        return None
    return posixpath.join(previous, ARTIFACT)


def _stamp(folder: str, run_date: str) -> str:
    """Record the fit date in the artifact's config (weekly refits compare against it)."""
    path = posixpath.join(folder, CONFIG_FILE)
    with FileSystems.open(path) as f:
        meta = json.load(f)
    meta.setdefault("fitted_on", run_date)
    with FileSystems.create(path) as f:
        f.write(json.dumps(meta, indent=1).encode())
    return folder


def artifact(job: Job, config: Config, rows: beam.PCollection, interactions: beam.PCollection,
             modalities: Sequence[str]) -> tuple[beam.PCollection, str | None]:
    """PCollection of the one artifact folder this run applies, fitted now or the previous run's copied in,
    and the folder reused (None when fitted now)."""
    a = config.align
    kind, fit_config = a.kind, align_config(a)
    folder = posixpath.join(job.run.staging, ARTIFACT)
    reuse = _reusable(previous_run(config), a.refit_days, job.run.run_date, kind)
    job.report["alignment"] = {"kind": kind, "fusion": fit_config.fusion, "dim": fit_config.dim or "auto",
                               "reused_from": reuse}
    if reuse:
        fitted = (job.pipeline | "PreviousAlignment" >> beam.Create([reuse])
                  | "CopyIn" >> beam.Map(artifacts.copy, folder))
    elif kind == "pca":
        from mmfuse.transforms.pca import FitPca, write_config
        dims = modality_dims(config, list(modalities))
        meta = dataclasses.asdict(fit_config)
        fitted = (rows
                  | "FitPca" >> FitPca(dims, fit_config.dim, folder, posixpath.join(job.run.temp, "tft"))
                  | "AllFitted" >> beam.combiners.ToList()
                  | "WriteConfig" >> beam.Map(lambda _: write_config(folder, dims, meta)))
    else:
        fitted = ((rows, interactions)
                  | "FitContrastive" >> FitContrastive(folder, modalities, fit_config, a.fit_events, a.fit_items,
                                                       a.seed, config.encode.accelerator, a.dim_budget_tflop))
    run_date = job.run.run_date
    return fitted | "Stamp" >> beam.Map(_stamp, run_date), reuse


def _load_cf(folder: str) -> CfTable | None:
    """The artifact's cf table; None for an artifact fitted without one. Fetches the table's two files only:
    every fold-in worker loads it."""
    with artifacts.fetched(folder, (TABLE_FILE, SOLVER_FILE)) as local:
        return CfTable.load(local) if os.path.exists(os.path.join(local, TABLE_FILE)) else None


def with_folded_cf(rows: beam.PCollection, interactions: beam.PCollection,
                   folder: beam.PCollection) -> beam.PCollection:
    """Rows with a ``cf`` field for items with interactions outside the fitted cf table (None elsewhere)."""
    pairs = interactions | "UserItem" >> beam.Map(lambda e: (e["user_id"], e["item_id"]))
    folded = pairs | "FoldIn" >> FoldIn(folder, _load_cf)
    keyed = rows | "ByItem" >> beam.Map(lambda r: (r["item_id"], r))
    return ({"row": keyed, "cf": folded} | "JoinCf" >> beam.CoGroupByKey()
            | "WithCf" >> beam.FlatMap(lambda kv: ({**row, "cf": next(iter(kv[1]["cf"]), None)}
                                                   for row in kv[1]["row"])))


def align(job: Job, config: Config, rows: beam.PCollection, interactions: beam.PCollection,
          modalities: Sequence[str]) -> tuple[beam.PCollection, beam.PCollection]:
    """Items (fused vectors, weights, parts) from embeddings rows, and the artifact's folder; writes
    ``items`` and the artifact."""
    folder, reused = artifact(job, config, rows, interactions, modalities)
    job.wait_for(folder)
    # A reused artifact may hold a cf table whatever tonight's --collaborative says (one without folds
    # nothing in); a fit made tonight holds one exactly when --collaborative asks for it.
    may_hold_cf = config.align.kind == "contrastive" and (config.align.collaborative or reused is not None)
    inputs = with_folded_cf(rows, interactions, folder) if may_hold_cf else rows
    usable, dead = inputs | "HasModality" >> beam.FlatMap(_has_modality, list(modalities)).with_outputs(DEAD, main="ok")
    metadata = folder | "Metadata" >> beam.Map(lambda path: ModelMetadata(model_id=path, model_name=ARTIFACT))
    fused = usable | "Fuse" >> RunInference(AlignHandler(), model_metadata_pcoll=metadata)
    items, unaligned = fused | "Aligned" >> beam.FlatMap(_aligned).with_outputs(DEAD, main="ok")
    dead = (dead, unaligned) | "AlignDead" >> beam.Flatten()
    job.stage("align", rows, items, dead)
    job.write("items", items, ITEMS_SCHEMA)
    return items, folder


def _has_modality(row: dict, modalities: list[str]):
    if any(row.get(m) is not None for m in modalities):
        yield row
    else:
        yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
            "align", row["item_id"], "no_modality", "every modality of this item failed or is missing", ""))


def _aligned(item: dict):
    if item["weights"]:
        yield item
    else:
        yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
            "align", item["item_id"], "no_aligned_modality",
            "none of the item's modalities is known to the alignment (fitted before they existed)", ""))
