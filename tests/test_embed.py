"""The encode branch of one modality with a small fake encoder (no TensorFlow): batching, dead letters,
reuse by content hash and the merge into one row per item, in seconds."""
from __future__ import annotations

import hashlib

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from mmfuse import runners
from mmfuse.models.base import Encoder, InputError
from mmfuse.transforms import embed
from mmfuse.transforms.deadletter import DEAD

CALLS: list[int] = []  # batch sizes the fake model saw (the local runner runs in this process)


class Letters(Encoder):
    """A deterministic stand-in: a text's vector counts its letters a-d."""

    modality, dim = "text", 4

    @property
    def identifier(self) -> str:
        return "letters-v1"

    def preprocess(self, value: str) -> str:
        if not value.strip():
            raise InputError("empty_text", "the text is empty")
        return value

    def encode_batch(self, inputs):
        CALLS.append(len(inputs))
        return np.array([[t.count(c) for c in "abcd"] for t in inputs], np.float32)


def _items(texts: dict[str, str]):
    return [(i, {"text": t, "source": f"catalog.parquet#{i}"}) for i, t in texts.items()]


def _check(texts: dict[str, str], previous: list | None, rows: list, dead: list, reused: list) -> None:
    """Encode ``texts`` (with ``previous`` (item_id, (vector, hash)) pairs to reuse) and compare each output."""
    with runners.create_pipeline(PipelineOptions(["--runner=DirectRunner"])) as p:
        items = p | "Items" >> beam.Create(_items(texts))
        before = p | "Before" >> beam.Create(previous) if previous is not None else None
        branch = items | embed.EncodeModality("text", lambda item: item["text"], Letters, 2, {}, before)
        merged = ({"items": items, "text": (branch["encoded"], branch[embed.REUSED]) | beam.Flatten()}
                  | embed.MergeEmbeddings(["text"]))
        assert_that(merged | "Rows" >> beam.Map(lambda r: (r["item_id"], r["text"], r["text_hash"] is not None)),
                    equal_to(rows), label="CheckRows")
        assert_that(branch[DEAD] | "Dead" >> beam.Map(lambda d: (d["stage"], d["key"], d["error"], d["source"])),
                    equal_to(dead), label="CheckDead")
        assert_that(branch[embed.REUSED] | "Reused" >> beam.Keys(), equal_to(reused), label="CheckReused")


def test_vectors_dead_letters_and_one_row_per_item():
    CALLS.clear()
    _check({"a": "ab", "b": "ccd", "c": "  ", "e": "aaa"}, None,
           rows=[("a", [1, 1, 0, 0], True), ("b", [0, 0, 2, 1], True), ("c", None, False), ("e", [3, 0, 0, 0], True)],
           dead=[("encode:text", "c", "empty_text", "catalog.parquet#c")], reused=[])
    assert sum(CALLS) == 3 and max(CALLS) <= 2  # the good texts, in batches of at most 2


def test_unchanged_content_reuses_the_previous_vector_without_the_model():
    digest = embed.content_hash("letters-v1", b"ab")
    stale = embed.content_hash("letters-v1", b"old text")
    CALLS.clear()
    _check({"a": "ab", "b": "ccd"}, [("a", ([9.0] * 4, digest)), ("b", ([7.0] * 4, stale))],
           rows=[("a", [9, 9, 9, 9], True), ("b", [0, 0, 2, 1], True)], dead=[], reused=["a"])
    assert sum(CALLS) == 1  # only b's text changed


def test_content_hash_names_the_model_and_the_input():
    assert embed.content_hash("m1", b"x") != embed.content_hash("m2", b"x") != embed.content_hash("m1", b"y")
    assert embed.content_hash("m1", b"x") == hashlib.sha256(b"m1\0x").hexdigest()[:32]
