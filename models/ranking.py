"""The numpy blocks the exact top-k moves and ranks: item shards, query batches with their exclusions, and
rankings, with how shards are cut (``spans``) and rankings merged (``merge``). Nothing here knows of Beam;
``transforms.topk`` moves these between workers and ``models.topk`` ranks them."""
from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from mmfuse.models import topk


class Shard(NamedTuple):
    """Items stacked into matrices: a piece of input items, or a whole shard with rows sorted by item id
    (so that column order breaks ties as the item id does). Ids are UTF-8 bytes (``models.topk.utf8``) until
    ``TopK`` yields them: numpy's str spends 4 bytes a character, and millions of ids cross the runner."""
    ids: np.ndarray          # (s,) bytes
    vectors: np.ndarray      # (s, D) float32, fused
    modalities: tuple        # names of the parts, sorted
    parts: np.ndarray        # (M, s, D) float32; zero where an item lacks the modality
    has: np.ndarray          # (s, M) bool: which modalities each item has
    hashes: np.ndarray       # (s,) uint64 mixed hash of each id (``models.topk.mixed_hash``)

    @staticmethod
    def stack(items: Sequence[Mapping[str, Any]]) -> Shard:
        ids = topk.utf8([item["item_id"] for item in items])
        vectors = _matrix([item["vector"] for item in items], "item")
        modalities = tuple(sorted({m for item in items for m in item["parts"]}))
        parts = np.zeros((len(modalities), *vectors.shape), dtype=np.float32)
        has = np.zeros((len(items), len(modalities)), dtype=bool)
        for row, item in enumerate(items):
            for name, part in item["parts"].items():
                m = modalities.index(name)
                parts[m, row], has[row, m] = part, True
        return Shard(ids, vectors, modalities, parts, has, topk.mixed_hash(ids))

    def take(self, rows: np.ndarray | slice) -> Shard:
        return Shard(self.ids[rows], self.vectors[rows], self.modalities, self.parts[:, rows], self.has[rows],
                     self.hashes[rows])

    def __reduce__(self):
        """Pickled (as a runner moves it) without its last modality's part, which is the fused vector minus
        the other parts: a third less to move at two modalities, and the data moved is most of a run's cost
        on the local runner."""
        return _unpickle_shard, (self.ids, self.vectors, self.modalities, self.parts[:-1], self.has, self.hashes)

    def rows(self, lo: int, hi: int) -> Shard:
        """Rows ``lo`` to ``hi - 1``, as views."""
        return self.take(slice(lo, hi))

    @staticmethod
    def concat(pieces: Sequence[Shard]) -> Shard:
        """One shard from its pieces, rows sorted by item id. Each piece's rows are copied once, straight to
        their sorted places: fresh memory is slow to fill in a busy worker (page faults)."""
        modalities = tuple(sorted({m for p in pieces for m in p.modalities}))
        dims = sorted({p.vectors.shape[1] for p in pieces})
        if len(dims) > 1:
            raise ValueError(f"TopK: item vectors of different lengths ({dims})")
        ids = np.concatenate([p.ids for p in pieces])
        order = np.argsort(ids, kind="stable")
        place = np.empty_like(order)
        place[order] = np.arange(len(order))
        out = Shard(ids[order], np.empty((len(ids), dims[0]), dtype=np.float32), modalities,
                    np.zeros((len(modalities), len(ids), dims[0]), dtype=np.float32),
                    np.zeros((len(ids), len(modalities)), dtype=bool),
                    np.concatenate([p.hashes for p in pieces])[order])
        start = 0
        for p in pieces:
            rows = place[start:start + len(p.ids)]
            start += len(p.ids)
            out.vectors[rows] = p.vectors
            for part, has, name in zip(p.parts, p.has.T, p.modalities):
                m = modalities.index(name)
                out.parts[m, rows], out.has[rows, m] = part, has
        return out


def _unpickle_shard(ids: np.ndarray, vectors: np.ndarray, modalities: tuple, parts: np.ndarray, has: np.ndarray,
                    hashes: np.ndarray) -> Shard:
    if modalities:
        last = (vectors - parts.sum(axis=0)) * has[:, -1:]
        parts = np.concatenate([parts, last[None]])
    return Shard(ids, vectors, modalities, parts, has, hashes)


class Batch(NamedTuple):
    """Queries stacked into a matrix, with the items each may not get (row r's are ``excluded_ids[
    starts[r]:starts[r + 1]]``). Ids are UTF-8 bytes, as in ``Shard``."""
    ids: np.ndarray           # (b,) bytes
    vectors: np.ndarray       # (b, D) float32
    starts: np.ndarray        # (b + 1,) int64: where each row's excluded ids start
    excluded_ids: np.ndarray  # (e,) bytes item id

    @staticmethod
    def stack(queries: Sequence[tuple[str, Sequence[float] | np.ndarray, Iterable[str]]]) -> Batch:
        excluded = [list(q[2]) for q in queries]
        return Batch(topk.utf8([q[0] for q in queries]), _matrix([q[1] for q in queries], "query"),
                     _starts([len(e) for e in excluded]), topk.utf8(list(itertools.chain.from_iterable(excluded))))

    def excluded_rows(self) -> np.ndarray:
        """The query row of each excluded id."""
        return np.repeat(np.arange(len(self.ids)), np.diff(self.starts))


def _starts(counts: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


class Ranked(NamedTuple):
    """Best items for a batch of queries (or one query): best first, padded with '' / -inf past the end.
    A batch's rankings carry UTF-8 ids (``models.topk.utf8``); what ``TopK`` yields carries str."""
    query_ids: np.ndarray    # (b,)
    item_ids: np.ndarray     # (b, k)
    scores: np.ndarray       # (b, k) float32
    modalities: tuple        # (M,)
    contributions: np.ndarray  # (b, k, M) float32: <query, part>; NaN where the item lacks the modality


def _matrix(vectors: Sequence[Sequence[float] | np.ndarray], what: str) -> np.ndarray:
    try:
        out = np.array(vectors, dtype=np.float32)
    except ValueError:
        out = None
    if out is None or out.ndim != 2:
        raise ValueError(f"TopK: {what} vectors of different lengths ({sorted({len(v) for v in vectors})})")
    return out


class Span(NamedTuple):
    """A shard: the buckets ``lo`` to ``hi - 1`` and how many records were counted in them."""
    lo: int
    hi: int
    rows: int


def spans(counts: np.ndarray, size: int) -> list[Span]:
    """Consecutive bucket ranges of about ``size`` records each (as many ranges as the total needs, at
    most one per bucket); empty ranges are left out."""
    n = min(len(counts), max(1, math.ceil(int(counts.sum()) / size)))
    edges = [math.ceil(s * len(counts) / n) for s in range(n + 1)]
    out = [Span(lo, hi, int(counts[lo:hi].sum())) for lo, hi in zip(edges, edges[1:])]
    return [span for span in out if span.rows]


def merge(a: Ranked, b: Ranked, k: int) -> Ranked:
    """Two rankings of the same queries into their best k: score descending, then item id ascending."""
    modalities = tuple(sorted(set(a.modalities) | set(b.modalities)))
    contributions = [np.full((*r.scores.shape, len(modalities)), np.nan, dtype=np.float32) for r in (a, b)]
    for out, r in zip(contributions, (a, b)):
        out[..., [modalities.index(m) for m in r.modalities]] = r.contributions
    ids = np.concatenate([a.item_ids, b.item_ids], axis=1)
    scores = np.concatenate([a.scores, b.scores], axis=1)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return Ranked(a.query_ids, np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1),
                  modalities, np.take_along_axis(np.concatenate(contributions, axis=1), order[..., None], 1))


def because(history: np.ndarray, weights: np.ndarray, items: np.ndarray, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Which history items a score comes from. The user vector is ``weightsᵀ history`` (history item vectors,
    (h, D), weights as the ``users`` dataset keeps them), so the score of item row ``i`` of ``items`` (r, D)
    splits exactly into ``weights[j] <history[j], items[i]>``. Returns the (r, n) history rows of the largest
    contributions, largest first (ties: lower row), and those (r, n) contributions."""
    shares = (items @ history.T) * weights[None, :]
    order = np.argsort(-shares, axis=1, kind="stable")[:, :n]
    return order, np.take_along_axis(shares, order, axis=1)
