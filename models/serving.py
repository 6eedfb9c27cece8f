"""A night as a TensorFlow SavedModel: the rankings the night wrote, answered in one graph.

``Night`` holds the night's item matrix (fused vectors and their modality parts, rows sorted by item id),
its user vectors with what each user has seen, and the fallback's popular list. Its signatures:

- ``recommend(user_id (B,) string, k () int32)``: each user's top ``k`` unseen items by ``<user, item>``
  (ties: item id), with each score's per-modality contributions; a user without a vector, or one the night
  never saw, gets the popular items they have not seen, with one contribution, ``popularity``;
- ``similar(item_id (B,) string, k () int32)``: each item's top ``k`` other items.

Outputs, per query: ``item_id`` (B, k) ('' past the end), ``score`` (B, k) (-inf there), ``contributions``
(B, k, M) in ``MODALITIES`` order (NaN where the item lacks the modality), ``fallback`` (B,) bool. The
scores are exact products over the whole matrix, so the answers are the night's own rankings.

Memory: the item matrix (items x dim x (1 + modalities) float32) and the user vectors (users x dim) are
variables; a request holds (B x items) scores. Nothing here reads or writes files but ``save``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow as tf

POPULARITY = "popularity"
META = "mmfuse.json"  # beside saved_model.pb, under assets/: the contributions' modality names


class Arrays(NamedTuple):
    """What a night's datasets hold, as arrays: items sorted by id; users in any order."""
    item_ids: np.ndarray       # (n,) str, sorted
    vectors: np.ndarray        # (n, D) float32, fused
    modalities: tuple          # (M,) names of the parts
    parts: np.ndarray          # (M, n, D) float32, zero where absent
    has: np.ndarray            # (n, M) bool
    user_ids: np.ndarray       # (u,) str
    user_vectors: np.ndarray   # (u, D) float32, zero for fallback users
    personal: np.ndarray       # (u,) bool: has a vector
    seen_splits: np.ndarray    # (u + 1,) int64: user r's seen item rows are seen_rows[splits[r]:splits[r + 1]]
    seen_rows: np.ndarray      # (s,) int64 item rows (items without a vector are left out: never ranked)
    popular_rows: np.ndarray   # (p,) int64 item rows, most popular first
    popular_shares: np.ndarray  # (p,) float32


class Night(tf.Module):
    def __init__(self, a: Arrays):
        super().__init__()
        n, m = len(a.item_ids), len(a.modalities)
        self.modalities = (*a.modalities, POPULARITY)
        self._item_ids = tf.Variable(a.item_ids.astype(object), trainable=False, dtype=tf.string)
        self._vectors = tf.Variable(a.vectors, trainable=False)
        self._parts = tf.Variable(a.parts, trainable=False)
        self._has = tf.Variable(a.has, trainable=False)
        self._user_vectors = tf.Variable(a.user_vectors, trainable=False)
        self._personal = tf.Variable(a.personal, trainable=False)
        self._seen_splits = tf.Variable(a.seen_splits, trainable=False)
        self._seen_rows = tf.Variable(a.seen_rows, trainable=False)
        self._popular_rows = tf.Variable(a.popular_rows, trainable=False)
        self._popular_shares = tf.Variable(a.popular_shares, trainable=False)
        self._items = _table(a.item_ids)
        self._users = _table(a.user_ids)
        self._n, self._m = n, m

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.int32)])
    def recommend(self, user_id: tf.Tensor, k: tf.Tensor) -> dict:
        rows = self._users.lookup(user_id)
        known = rows >= 0
        row = tf.maximum(rows, 0)
        personal = known & tf.gather(self._personal, row)
        starts = tf.gather(self._seen_splits, row)
        ends = tf.where(known, tf.gather(self._seen_splits, row + 1), starts)  # an unknown user has seen nothing
        seen = tf.gather(self._seen_rows, tf.ragged.range(starts, ends))
        users = tf.gather(self._user_vectors, row)
        ranked = self._ranked(users, seen, k)
        popular = self._popular(seen, k)
        pick = personal[:, None]
        return {"item_id": tf.where(pick, ranked["item_id"], popular["item_id"]),
                "score": tf.where(pick, ranked["score"], popular["score"]),
                "contributions": tf.where(pick[..., None], ranked["contributions"], popular["contributions"]),
                "fallback": ~personal}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.int32)])
    def similar(self, item_id: tf.Tensor, k: tf.Tensor) -> dict:
        rows = self._items.lookup(item_id)
        known = rows >= 0
        row = tf.maximum(rows, 0)
        itself = tf.RaggedTensor.from_row_lengths(tf.boolean_mask(rows, known), tf.cast(known, tf.int64))
        ranked = self._ranked(tf.gather(self._vectors, row), itself, k)
        missing = ~known[:, None]
        return {"item_id": tf.where(missing, "", ranked["item_id"]),
                "score": tf.where(missing, -np.inf, ranked["score"]),
                "contributions": tf.where(missing[..., None], np.nan, ranked["contributions"]),
                "fallback": tf.zeros_like(known)}

    def _ranked(self, queries: tf.Tensor, excluded: tf.RaggedTensor, k: tf.Tensor) -> dict:
        """Top ``k`` items of each query by ``<query, item>``, ``excluded`` (ragged item rows) left out."""
        scores = tf.matmul(queries, self._vectors, transpose_b=True)
        where = tf.stack([tf.cast(excluded.value_rowids(), tf.int64), tf.cast(excluded.flat_values, tf.int64)], 1)
        scores = tf.tensor_scatter_nd_update(scores, where, tf.fill(tf.shape(where)[:1], -np.inf))
        best, rows = tf.math.top_k(scores, tf.minimum(k, self._n))  # ties: the lower row, i.e. item id
        found = best > -np.inf
        parts = tf.gather(self._parts, rows, axis=1)                     # (M, B, k, D)
        contributions = tf.transpose(tf.reduce_sum(parts * queries[None, :, None, :], -1), (1, 2, 0))
        contributions = tf.where(tf.gather(self._has, rows) & found[..., None], contributions, np.nan)
        contributions = tf.pad(contributions, [[0, 0], [0, 0], [0, 1]], constant_values=np.nan)
        return _padded({"item_id": tf.where(found, tf.gather(self._item_ids, rows), ""),
                        "score": tf.where(found, best, -np.inf), "contributions": contributions}, k)

    def _popular(self, seen: tf.RaggedTensor, k: tf.Tensor) -> dict:
        """The popular list without what each user has seen, its first ``k``."""
        b = tf.shape(seen.row_splits)[0] - 1
        where = tf.stack([tf.cast(seen.value_rowids(), tf.int64), tf.cast(seen.flat_values, tf.int64)], 1)
        seen_dense = tf.scatter_nd(where, tf.ones(tf.shape(where)[:1], tf.bool), tf.cast([b, self._n], tf.int64))
        unseen = ~tf.gather(seen_dense, self._popular_rows, axis=1)      # (B, p)
        order = tf.argsort(tf.cast(~unseen, tf.int32), axis=1, stable=True)[:, :k]  # unseen first, in list order
        rows = tf.gather(self._popular_rows, order)
        found = tf.gather(unseen, order, batch_dims=1)
        shares = tf.gather(self._popular_shares, order)
        contributions = tf.concat([tf.fill(tf.concat([tf.shape(rows), [self._m]], 0), np.nan),
                                   tf.where(found, shares, np.nan)[..., None]], -1)
        return _padded({"item_id": tf.where(found, tf.gather(self._item_ids, rows), ""),
                        "score": tf.where(found, shares, -np.inf), "contributions": contributions}, k)

    def save(self, folder: str | Path) -> None:
        tf.saved_model.save(self, str(folder), signatures={"recommend": self.recommend, "similar": self.similar,
                                                           "serving_default": self.recommend})
        (Path(folder) / "assets").mkdir(exist_ok=True)
        (Path(folder) / "assets" / META).write_text(json.dumps({"modalities": list(self.modalities)}))


def modalities(folder: str | Path) -> list[str]:
    """The contributions' modality names of a saved night."""
    return json.loads((Path(folder) / "assets" / META).read_text())["modalities"]


def _table(keys: np.ndarray) -> tf.lookup.StaticHashTable:
    """id -> row, -1 for an unknown id."""
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(keys.astype(object), tf.string), tf.range(len(keys), dtype=tf.int64)), -1)


def _padded(out: dict, k: tf.Tensor) -> dict:
    """Rankings shorter than ``k`` (fewer items than asked for) padded to ``k`` columns."""
    short = k - tf.shape(out["score"])[1]
    return {"item_id": tf.pad(out["item_id"], [[0, 0], [0, short]], constant_values=""),
            "score": tf.pad(out["score"], [[0, 0], [0, short]], constant_values=-np.inf),
            "contributions": tf.pad(out["contributions"], [[0, 0], [0, short], [0, 0]], constant_values=np.nan)}
