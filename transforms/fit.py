"""Fit the learned alignment (``models.align``) in one step, on a bounded sample of the night's data.

What the step holds is set by the caps, not by the catalogue: the newest ``fit_events`` interactions and at
most ``fit_items`` items (``transforms.sample``) as float32 arrays, the fit's own arrays of them, EASE over
at most ``cf_anchors`` items, and the model. It writes the artifact folder and yields its path.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import TYPE_CHECKING, Sequence

import apache_beam as beam
import numpy as np

from mmfuse.models import evaluation as ev
from mmfuse.runners import process
from mmfuse.transforms.artifacts import publish
from mmfuse.transforms.sample import FitItems, NewestEvents

if TYPE_CHECKING:
    from mmfuse.models.align import AlignConfig


def compact(row: dict, modalities: Sequence[str]) -> dict:
    """The fields a fit reads, vectors as float32 arrays: the fit's items become one side input, and as
    lists of Python floats they are millions of objects to pickle and for a runner to size (the in-process
    runner's state cache walks every side input it loads)."""
    return {"item_id": row["item_id"],
            **{m: np.asarray(row[m], np.float32) for m in modalities if row.get(m) is not None}}


def fit_contrastive(folder: str, rows: list[dict], events: list[tuple], modalities: Sequence[str],
                    config: AlignConfig, users: int = 0, items: int = 0, dim_budget_tflop: float = 100.0) -> str:
    """Fit on the sample's items and the sample's interactions on them (the last 10% of each user's for the
    choices made on validation); save to ``folder``. ``users``, ``items``: the whole night's, whose top-k
    bounds the dims a fit may choose (``dim_budget_tflop``). Inputs are sorted first, so the fit does not
    depend on their arrival order."""
    process.prepare()
    from mmfuse.models import align  # Keras: loaded on the worker that fits, not where the pipeline is built
    start = time.monotonic()
    config = dataclasses.replace(config, dims=align.affordable_dims(users, items, dim_budget_tflop * 1e12))
    dims = {m: next(len(r[m]) for r in rows if r.get(m) is not None)
            for m in modalities if any(r.get(m) is not None for r in rows)}
    catalog = align.Catalog.from_rows(rows, dims)
    index = {item: i for i, item in enumerate(catalog.item_ids)}
    events = sorted(e for e in events if e[2] in index)
    user_ids, user = np.unique([e[1] for e in events], return_inverse=True)
    inter = ev.Interactions(user=user.astype(np.int64), item=np.array([index[e[2]] for e in events], np.int64),
                            timestamp=np.array([e[0] for e in events], np.int64),
                            weight=np.ones(len(events), np.float32), user_ids=user_ids, item_ids=catalog.item_ids)
    del rows, events
    fit, val = ev.validation_split(inter)

    def arrays(x: ev.Interactions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return x.user, x.item, x.timestamp

    with tempfile.TemporaryDirectory(prefix="mmfuse-alignment-") as local:
        aligner = align.fit_and_refit(catalog, arrays(fit), arrays(val), config, log_dir=os.path.join(local, "logs"))
        aligner.metrics["fit"] = {"events": len(inter), "users": len(user_ids), "items": len(catalog.item_ids),
                                  "epochs": aligner.metrics["epochs"],
                                  "seconds": round(time.monotonic() - start, 1)}
        aligner.save(local)
        return publish(local, folder)


class FitContrastive(beam.PTransform):
    """``(embeddings rows, interactions)`` -> the folder of the alignment fitted on the sample, written once.
    ``accelerator``: a resource hint (e.g. a GPU) for the fit step alone."""

    def __init__(self, folder: str, modalities: Sequence[str], config: AlignConfig, fit_events: int, fit_items: int,
                 seed: int, accelerator: str | None = None, dim_budget_tflop: float = 100.0):
        super().__init__()
        self._folder, self._modalities, self._config = folder, list(modalities), config
        self._fit_events, self._fit_items, self._seed, self._accelerator = fit_events, fit_items, seed, accelerator
        self._budget = dim_budget_tflop

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]) -> beam.PCollection:
        rows, interactions = inputs
        events = (interactions
                  | "Events" >> beam.Map(lambda e: (e["timestamp"], e["user_id"], e["item_id"]))
                  | "FitEvents" >> NewestEvents(self._fit_events))
        sample = (rows
                  | "CompactRows" >> beam.Map(compact, self._modalities)
                  | "FitItems" >> FitItems(events, self._fit_items, self._seed))
        users = (interactions
                 | "UserIds" >> beam.Map(lambda e: e["user_id"])
                 | "Users" >> beam.Distinct()
                 | "CountUsers" >> beam.combiners.Count.Globally())
        items = rows | "CountItems" >> beam.combiners.Count.Globally()
        fit = beam.Map(fit_contrastive, beam.pvalue.AsSingleton(sample), beam.pvalue.AsSingleton(events),
                       self._modalities, self._config, beam.pvalue.AsSingleton(users), beam.pvalue.AsSingleton(items),
                       self._budget)
        return (rows.pipeline
                | "Folder" >> beam.Create([self._folder])
                | "Fit" >> (fit.with_resource_hints(accelerator=self._accelerator) if self._accelerator else fit))
