"""Per-modality embeddings, merged into one ``embeddings`` row per item.

Every modality branch yields ``(item_id, (modality, vector, content_hash))``; :class:`MergeEmbeddings`
joins the branches with the items, so a new modality is one more branch and items missing a modality
simply have nulls there.
"""
from __future__ import annotations

import hashlib
import math

import apache_beam as beam
import numpy as np
import pyarrow as pa

from transforms.deadletter import DEAD, dead_letter


def content_hash(identifier: str, payload: bytes) -> str:
    """Hash of a modality's input and the model that reads it: equal hashes mean the vector can be reused."""
    return hashlib.sha256(identifier.encode() + b"\0" + payload).hexdigest()[:32]


class PrecomputedVectors(beam.PTransform):
    """A vector column the user declared as a modality: checked for its dimension and for NaN/inf.

    Takes only items that have the column; a bad vector dead-letters this modality, not the item.
    """

    def __init__(self, name: str, dim: int):
        super().__init__()
        self._name, self._dim = name, dim

    def expand(self, items):
        name, dim = self._name, self._dim
        stage, identifier = f"encode:{name}", f"precomputed:{name}:{dim}"

        def check(element):
            item_id, item = element
            values = item["vectors"][name]
            if len(values) != dim or not all(math.isfinite(v) for v in values):
                problem = (f"has {len(values)} values, declared {dim}" if len(values) != dim
                           else "holds NaN or infinite values")
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
                    stage, item_id, "bad_vector", f"{name} {problem}; the item goes on without it",
                    item["source"]))
                return
            vector = np.asarray(values, dtype=np.float32)
            yield item_id, (name, vector.tolist(), content_hash(identifier, vector.tobytes()))

        return items | "Check" >> beam.FlatMap(check).with_outputs(DEAD, main="ok")


def schema(modalities: list[str]) -> pa.Schema:
    fields = [("item_id", pa.string())]
    for m in modalities:
        fields += [(m, pa.list_(pa.float32())), (f"{m}_hash", pa.string())]
    return pa.schema(fields)


class MergeEmbeddings(beam.PTransform):
    """``{"items": keyed items, <modality>: branch, ...}`` -> one embeddings row per item (nulls where absent)."""

    def __init__(self, modalities: list[str]):
        super().__init__()
        self._modalities = modalities

    def expand(self, inputs):
        items = inputs["items"]
        modalities = self._modalities

        def row(element):
            item_id, grouped = element
            out = {"item_id": item_id, **{m: None for m in modalities}, **{f"{m}_hash": None for m in modalities}}
            for modality, vector, digest in grouped["vectors"]:
                out[modality], out[f"{modality}_hash"] = vector, digest
            return out

        vectors = [inputs[m] for m in modalities] | "FlattenBranches" >> beam.Flatten(pipeline=items.pipeline)
        return ({"items": items | "Ids" >> beam.Map(lambda e: (e[0], None)), "vectors": vectors}
                | "Join" >> beam.CoGroupByKey()
                | "Row" >> beam.Map(row))
