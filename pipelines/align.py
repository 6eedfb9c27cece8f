"""Align and fuse: fit (or reuse) the alignment, then map every item's embeddings to one fused vector.

    mmfuse nightly ... [--align=contrastive|pca] [--dim=64] [--fusion=auto|attention|mean|weighted]
                       [--fusion_weights=text:0.6,image:0.4] [--refit=always|weekly|never]
                       [--fit_events=1000000] [--fit_items=100000] [--fit_minutes=10]

The contrastive fit trains on a bounded sample (``transforms.sample``: the newest ``--fit_events``
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

import contextlib
import dataclasses
import datetime as dt
import json
import os
import posixpath
import shutil
import tempfile
import time
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, ModelMetadata, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from mmfuse.models import evaluation as ev
from mmfuse.models.collaborative import SOLVER_FILE, TABLE_FILE, CfTable
from mmfuse.pipelines.config import AlignSettings, Config
from mmfuse.pipelines.job import Job
from mmfuse.transforms.deadletter import DEAD, dead_letter
from mmfuse.transforms.foldin import FoldIn
from mmfuse.transforms.sample import FitItems, NewestEvents

# models.align and transforms.pca import Keras and TensorFlow: imported where used, so that the command line
# answers --help and input errors without loading them.

ITEMS_SCHEMA = pa.schema([("item_id", pa.string()), ("vector", pa.list_(pa.float32())),
                          ("weights", pa.map_(pa.string(), pa.float32())),
                          ("parts", pa.map_(pa.string(), pa.list_(pa.float32())))])
ARTIFACT = "alignment"
CONFIG_FILE, FORMAT = "alignment.json", 2  # models.align.CONFIG_FILE, models.align.FORMAT


def align_config(a: AlignSettings):
    """The ``models.align.AlignConfig`` of the alignment options (Keras loads here, not on the command line)."""
    from mmfuse.models import align as learned
    return learned.AlignConfig(dim=a.dim, fusion=a.fusion, fusion_weights=a.fusion_weights,
                               collaborative=a.collaborative, cf_beta=a.cf_beta, cf_anchors=a.cf_anchors,
                               epochs=a.epochs, max_seconds=60.0 * a.fit_minutes, seed=a.seed)


def _catalog(rows: Sequence[dict], dims: dict[str, int]):
    """Embeddings rows (any order) -> a models.align.Catalog in item_id order, NaN rows for absent modalities
    (``cf`` too, where a row carries a folded-in cf vector)."""
    from mmfuse.models import align as learned
    rows = sorted(rows, key=lambda r: r["item_id"])
    if any(r.get(learned.CF) is not None for r in rows):
        dims = {**dims, learned.CF: next(len(r[learned.CF]) for r in rows if r.get(learned.CF) is not None)}
    features = {m: np.array([r[m] if r.get(m) is not None else [np.nan] * d for r in rows], np.float32)
                for m, d in dims.items()}
    return learned.Catalog(np.array([r["item_id"] for r in rows], dtype=str), features)


def _compact(row: dict, modalities: Sequence[str]) -> dict:
    """The fields a fit reads, vectors as float32 arrays: the fit's items become one side input, and as
    lists of Python floats they are millions of objects to pickle and for a runner to size (the in-process
    runner's state cache walks every side input it loads)."""
    return {"item_id": row["item_id"],
            **{m: np.asarray(row[m], np.float32) for m in modalities if row.get(m) is not None}}


def _publish(local: str, folder: str) -> str:
    """Copy a local artifact folder, recursively, to ``folder`` (local or gs://)."""
    for parent, _, names in sorted(os.walk(local)):
        for name in sorted(names):
            source = os.path.join(parent, name)
            with open(source, "rb") as src, \
                    FileSystems.create(posixpath.join(folder, os.path.relpath(source, local))) as dst:
                shutil.copyfileobj(src, dst)
    return folder


@contextlib.contextmanager
def _fetched(folder: str, names: Sequence[str] | None = None):
    """A local copy of an artifact folder, or of its top-level files ``names`` only (Keras and tf.Transform
    load from local paths), removed on exit."""
    with tempfile.TemporaryDirectory(prefix="mmfuse-alignment-") as local:
        for m in FileSystems.match([posixpath.join(folder, "**")])[0].metadata_list:
            if names is not None and posixpath.relpath(m.path, folder) not in names:
                continue
            target = posixpath.join(local, posixpath.relpath(m.path, folder))
            os.makedirs(posixpath.dirname(target), exist_ok=True)
            with FileSystems.open(m.path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        yield local


def _copy_artifact(source: str, folder: str) -> str:
    with _fetched(source) as local:
        return _publish(local, folder)


def fit_contrastive(folder: str, rows: list[dict], events: list[tuple], modalities: Sequence[str], config) -> str:
    """Fit on the sample's items and the sample's interactions on them (the last 10% of each user's for the
    choices made on validation); save to ``folder``. Inputs are sorted first, so the fit does not depend on
    their arrival order. What it holds: the rows and events given (bounded by the caps), their arrays, EASE
    over at most ``config.cf_anchors`` items, and the model."""
    from mmfuse.models import align as learned
    start = time.monotonic()
    dims = {m: next(len(r[m]) for r in rows if r.get(m) is not None)
            for m in modalities if any(r.get(m) is not None for r in rows)}
    catalog = _catalog(rows, dims)
    index = {item: i for i, item in enumerate(catalog.item_ids)}
    events = sorted(e for e in events if e[2] in index)
    users, user = np.unique([e[1] for e in events], return_inverse=True)
    inter = ev.Interactions(user=user.astype(np.int64), item=np.array([index[e[2]] for e in events], np.int64),
                            timestamp=np.array([e[0] for e in events], np.int64),
                            weight=np.ones(len(events), np.float32), user_ids=users, item_ids=catalog.item_ids)
    del rows, events
    fit, val = ev.validation_split(inter)
    def arrays(x):
        return x.user, x.item, x.timestamp

    with tempfile.TemporaryDirectory(prefix="mmfuse-alignment-") as local:
        aligner = learned.fit_and_refit(catalog, arrays(fit), arrays(val), config,
                                        log_dir=os.path.join(local, "logs"))
        aligner.metrics["fit"] = {"events": len(inter), "users": len(users), "items": len(catalog.item_ids),
                                  "epochs": aligner.metrics["epochs"],
                                  "seconds": round(time.monotonic() - start, 1)}
        aligner.save(local)
        return _publish(local, folder)


class AlignHandler(ModelHandler[dict, dict, Any]):
    """Embeddings rows -> item rows, with the artifact whose folder arrives as a side input."""

    def __init__(self, batch_size: int = 512):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)  # fixed, as EncoderHandler
        self._folder = None

    def update_model_path(self, model_path: str | None = None):
        self._folder = model_path

    def load_model(self):
        from mmfuse.models import align as learned
        with _fetched(self._folder) as local:
            return learned.load(local)

    def run_inference(self, batch: Sequence[dict], model, inference_args=None) -> Iterable[dict]:
        catalog = _catalog(batch, model.input_dims)
        out = model.apply(catalog.item_ids, catalog.features)
        names = model.modalities
        for i, item_id in enumerate(catalog.item_ids):
            present = [j for j, m in enumerate(names) if out["mask"][i, j] > 0]
            yield {"item_id": str(item_id), "vector": out["fused"][i].tolist(),
                   "weights": {names[j]: float(out["weights"][i, j]) for j in present},
                   "parts": {names[j]: out["parts"][i, j].tolist() for j in present}}

    def get_metrics_namespace(self) -> str:
        return "mmfuse"


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


def artifact(job: Job, config: Config, rows, interactions, modalities: Sequence[str]):
    """PCollection of the one artifact folder this run applies, fitted now or the previous run's copied in,
    and the folder reused (None when fitted now)."""
    from mmfuse.pipelines.encode import modality_dims, previous_run
    a = config.align
    kind, fit_config = a.kind, align_config(a)
    folder = posixpath.join(job.run.staging, ARTIFACT)
    reuse = _reusable(previous_run(config), a.refit_days, job.run.run_date, kind)
    job.report["alignment"] = {"kind": kind, "fusion": fit_config.fusion, "dim": fit_config.dim,
                               "reused_from": reuse}
    if reuse:
        fitted = (job.pipeline | "PreviousAlignment" >> beam.Create([reuse])
                  | "CopyIn" >> beam.Map(_copy_artifact, folder))
    elif kind == "pca":
        from mmfuse.transforms.pca import FitPca
        dims = modality_dims(config, list(modalities))
        meta = dataclasses.asdict(fit_config)
        fitted = (rows
                  | "FitPca" >> FitPca(dims, fit_config.dim, folder, posixpath.join(job.run.temp, "tft"))
                  | "AllFitted" >> beam.combiners.ToList()
                  | "WriteConfig" >> beam.Map(lambda _: _pca_config(folder, dims, meta)))
    else:
        events = (interactions
                  | "Events" >> beam.Map(lambda e: (e["timestamp"], e["user_id"], e["item_id"]))
                  | "FitEvents" >> NewestEvents(a.fit_events))
        sample = (rows
                  | "CompactRows" >> beam.Map(_compact, list(modalities))
                  | "FitItems" >> FitItems(events, a.fit_items, a.seed))
        accelerator = config.encode.accelerator
        fit = beam.Map(fit_contrastive, beam.pvalue.AsSingleton(sample), beam.pvalue.AsSingleton(events),
                       list(modalities), fit_config)
        fitted = (job.pipeline
                  | "Folder" >> beam.Create([folder])
                  | "FitContrastive" >> (fit.with_resource_hints(accelerator=accelerator) if accelerator else fit))
    run_date = job.run.run_date
    return fitted | "Stamp" >> beam.Map(_stamp, run_date), reuse


def _pca_config(folder: str, dims: dict[str, int], config: dict) -> str:
    from mmfuse.models.pca import PcaAligner
    with tempfile.TemporaryDirectory(prefix="mmfuse-alignment-") as local:
        PcaAligner.write_config(local, dims, config)
        return _publish(local, folder)


def _load_cf(folder: str) -> CfTable | None:
    """The artifact's cf table; None for an artifact fitted without one. Fetches the table's two files only:
    every fold-in worker loads it."""
    with _fetched(folder, (TABLE_FILE, SOLVER_FILE)) as local:
        return CfTable.load(local) if os.path.exists(os.path.join(local, TABLE_FILE)) else None


def with_folded_cf(rows, interactions, folder):
    """Rows with a ``cf`` field for items with interactions outside the fitted cf table (None elsewhere)."""
    pairs = interactions | "UserItem" >> beam.Map(lambda e: (e["user_id"], e["item_id"]))
    folded = pairs | "FoldIn" >> FoldIn(folder, _load_cf)
    keyed = rows | "ByItem" >> beam.Map(lambda r: (r["item_id"], r))
    return ({"row": keyed, "cf": folded} | "JoinCf" >> beam.CoGroupByKey()
            | "WithCf" >> beam.FlatMap(lambda kv: ({**row, "cf": next(iter(kv[1]["cf"]), None)}
                                                   for row in kv[1]["row"])))


def align(job: Job, config: Config, rows, interactions, modalities: Sequence[str]):
    """Items (fused vectors, weights, parts) from embeddings rows; writes ``items`` and the artifact."""
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
    return items


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


def fit_pca_local(catalog, dim: int):
    """The statistical alignment fitted on an in-memory models.align.Catalog by a local Beam pipeline (for
    evaluation)."""
    from mmfuse import runners
    from mmfuse.models import align as learned
    from mmfuse.transforms.pca import FitPca
    dims = {m: v.shape[1] for m, v in catalog.features.items()}
    rows = [{"item_id": str(item), **{m: None if np.isnan(v[i]).any() else v[i] for m, v in catalog.features.items()}}
            for i, item in enumerate(catalog.item_ids)]
    with tempfile.TemporaryDirectory(prefix="mmfuse-pca-") as folder:
        with runners.create_pipeline(PipelineOptions([])) as pipeline:
            _ = pipeline | beam.Create(rows, reshuffle=False) | FitPca(dims, dim, folder, f"{folder}/tft")
        _pca_config(folder, dims, dataclasses.asdict(learned.AlignConfig(dim=dim, fusion="mean")))
        return learned.load(folder)
