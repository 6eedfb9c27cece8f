"""Per-modality embeddings, merged into one ``embeddings`` row per item.

Every modality branch yields ``(item_id, (modality, vector, content_hash))``; :class:`MergeEmbeddings`
joins the branches with the items, so a new modality is one more branch and items missing a modality
simply have nulls there.
"""
from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa

from mmfuse.transforms import media
from mmfuse.transforms.deadletter import DEAD, dead_letter
from mmfuse.transforms.inference import Encode

if TYPE_CHECKING:
    from mmfuse.models.base import Encoder

REUSED = "reused"


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

    def expand(self, items: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        name, dim = self._name, self._dim
        stage, identifier = f"encode:{name}", f"precomputed:{name}:{dim}"

        def check(element: tuple[str, dict]) -> Iterator[tuple[str, tuple] | beam.pvalue.TaggedOutput]:
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


def join_text(text: dict, columns: tuple[str, ...], template: str = "", max_chars: int | None = None) -> str | None:
    """The text a text model sees: a template over the columns, or the non-empty columns joined with " | ".
    Each column is cut at ``max_chars`` first: the model reads a few hundred tokens, and a huge field must
    not cost the tokenizer gigabytes."""
    values = {c: (", ".join(v) if isinstance(v, list) else v)[:max_chars] for c, v in text.items()}
    if not values:
        return None
    if template:
        return template.format_map({c: values.get(c, "") for c in columns})
    return " | ".join(values[c] for c in columns if c in values)


class EncodeModality(beam.PTransform):
    """Keyed items -> ``{"in", "encoded", "reused", dead}`` PCollections for one content modality.

    ``raw(item)`` gives the bytes or text the model reads (None: the item lacks this modality). Its hash
    with the model identifier is compared with the previous run's: equal means yesterday's vector is
    reused without decoding or running the model; otherwise the item is preprocessed and encoded.
    Vector branches are ``(item_id, (modality, vector, hash))``.
    """

    def __init__(self, modality: str, raw: Callable[[dict], str | bytes | media.MediaFile | None],
                 make: Callable[[], Encoder], batch_size: int, resource_hints: dict,
                 previous: beam.PCollection | None = None):
        super().__init__()
        self._modality, self._raw, self._make = modality, raw, make
        self._batch_size, self._hints, self._previous = batch_size, resource_hints, previous

    def expand(self, items: beam.PCollection) -> dict[str, beam.PCollection]:
        encoder = self._make()  # cheap: networks are built on first use
        modality, raw_of, identifier = self._modality, self._raw, encoder.identifier

        def with_hash(element: tuple[str, dict]) -> Iterator[tuple[str, tuple[Any, str, str]]]:
            item_id, item = element
            raw = raw_of(item)
            if raw is not None:
                payload = (raw.encode() if isinstance(raw, str) else
                           raw.sha256.encode() if isinstance(raw, media.MediaFile) else raw)
                yield item_id, (raw, item["source"], content_hash(identifier, payload))

        def reuse_or_encode(element: tuple[str, dict]) -> Iterator[tuple | beam.pvalue.TaggedOutput]:
            item_id, grouped = element
            before = dict((h, v) for v, h in grouped["before"])
            for raw, source, digest in grouped["now"]:
                if digest in before:
                    yield beam.pvalue.TaggedOutput(REUSED, (item_id, (modality, before[digest], digest)))
                else:
                    yield (item_id, digest), (raw, source)

        present = items | "Raw" >> beam.FlatMap(with_hash)
        before = self._previous if self._previous is not None else items.pipeline | "NoPrevious" >> beam.Create([])
        split = ({"now": present, "before": before}
                 | "JoinPrevious" >> beam.CoGroupByKey()
                 | "ReuseOrEncode" >> beam.FlatMap(reuse_or_encode).with_outputs(REUSED, main="todo"))
        vectors, dead = split.todo | "Encode" >> Encode(
            self._make, f"encode:{modality}", self._batch_size, self._hints)
        encoded = vectors | "Branch" >> beam.Map(
            lambda kv: (kv[0][0], (modality, np.asarray(kv[1], np.float32).tolist(), kv[0][1])))
        return {"in": present, "encoded": encoded, REUSED: split[REUSED], DEAD: dead}


class PreviousVectors(beam.PTransform):
    """Rows of a previous ``embeddings`` dataset -> ``(item_id, (vector, hash))`` for one modality."""

    def __init__(self, modality: str):
        super().__init__()
        self._modality = modality

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        m = self._modality
        return rows | beam.FlatMap(
            lambda row: [(row["item_id"], (row[m], row[f"{m}_hash"]))] if row.get(f"{m}_hash") else [])


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

    def expand(self, inputs: dict[str, beam.PCollection]) -> beam.PCollection:
        items = inputs["items"]
        modalities = self._modalities

        def row(element: tuple[str, dict]) -> dict:
            item_id, grouped = element
            out = {"item_id": item_id, **{m: None for m in modalities}, **{f"{m}_hash": None for m in modalities}}
            for modality, vector, digest in grouped["vectors"]:
                out[modality], out[f"{modality}_hash"] = vector, digest
            return out

        vectors = [inputs[m] for m in modalities] | "FlattenBranches" >> beam.Flatten(pipeline=items.pipeline)
        return ({"items": items | "Ids" >> beam.Map(lambda e: (e[0], None)), "vectors": vectors}
                | "Join" >> beam.CoGroupByKey()
                | "Row" >> beam.Map(row))
