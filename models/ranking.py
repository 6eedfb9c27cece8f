"""The numpy blocks the exact top-k moves and ranks: item shards, query batches with their exclusions, and
rankings, with how shards are cut (``spans``) and rankings merged (``merge``). Nothing here knows of Beam;
``transforms.topk`` moves these between workers and ``models.topk`` ranks them."""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, NamedTuple, Sequence

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
    starts[r]:starts[r + 1]]``) and, for users, the history their vectors are sums of. Ids are UTF-8 bytes,
    as in ``Shard``."""
    ids: np.ndarray           # (b,) bytes
    vectors: np.ndarray       # (b, D) float32
    starts: np.ndarray        # (b + 1,) int64: where each row's excluded ids start
    excluded_ids: np.ndarray  # (e,) bytes item id
    history: History | None = None

    @staticmethod
    def stack(queries: Sequence[tuple]) -> Batch:
        """Queries ``(id, vector, excluded ids)``, or ``(id, vector, excluded ids, (history ids, weights))``
        for rankings explained by history item."""
        excluded = [list(q[2]) for q in queries]
        history = History.stack([q[3] for q in queries]) if len(queries[0]) > 3 else None
        return Batch(topk.utf8([q[0] for q in queries]), _matrix([q[1] for q in queries], "query"),
                     _starts([len(e) for e in excluded]), topk.utf8(list(itertools.chain.from_iterable(excluded))),
                     history)

    def excluded_rows(self) -> np.ndarray:
        """The query row of each excluded id."""
        return np.repeat(np.arange(len(self.ids)), np.diff(self.starts))


class History(NamedTuple):
    """Each query's kept history items with their weights (the query vector is ``sum(weight x vector)`` over
    the whole history): row r's are ``starts[r]:starts[r + 1]``. Ids are UTF-8 bytes, with their mixed hashes:
    the ranking finds each item's vector in the shard that holds it."""
    starts: np.ndarray   # (b + 1,) int64
    ids: np.ndarray      # (t,) bytes
    weights: np.ndarray  # (t,) float32
    hashes: np.ndarray   # (t,) uint64

    @staticmethod
    def stack(histories: Sequence[tuple[Sequence[str], Sequence[float]]]) -> History:
        ids = topk.utf8([i for h in histories for i in h[0]])
        return History(_starts([len(h[0]) for h in histories]), ids,
                       np.concatenate([np.asarray(h[1], np.float32) for h in histories] + [np.zeros(0, np.float32)]),
                       topk.mixed_hash(ids))

    def explain(self, vectors: np.ndarray, ranked: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """For each query row and ranked item (``ranked`` (b, k, D), their vectors), the ``n`` history items of
        largest share of its score (``because``), with ``vectors`` (t, D) the history items' (NaN: none, never
        named): ids ``(b, k, n)`` (b'' past a query's history) and shares (NaN there). Holds
        ``HISTORY_CHUNK`` queries' histories, padded to the longest, at a time."""
        b, k = ranked.shape[:2]
        ids, shares = np.full((b, k, n), b"", dtype=self.ids.dtype), np.full((b, k, n), np.nan, np.float32)
        known = ~np.isnan(vectors).any(1)
        for lo in range(0, b, HISTORY_CHUNK):
            starts = self.starts[lo:lo + HISTORY_CHUNK + 1]
            counts = np.diff(starts)
            hi, longest = lo + len(counts), int(counts.max(initial=0))
            if not longest:
                continue
            slot = np.arange(longest)
            valid = slot < counts[:, None]
            rows = np.where(valid, starts[:-1, None] + slot, 0)
            weights = np.where(valid & known[rows], self.weights[rows], np.nan)  # NaN shares sort last
            picked, share = because(np.nan_to_num(vectors[rows]), weights, ranked[lo:hi], n)
            found = np.take_along_axis(np.broadcast_to(rows[:, None, :], (hi - lo, k, longest)), picked, 2)
            ids[lo:hi, :, :picked.shape[2]] = np.where(np.isnan(share), b"", self.ids[found])
            shares[lo:hi, :, :picked.shape[2]] = share
        return ids, shares


HISTORY_CHUNK = 1024  # queries explained at a time: 1024 x 50 history items x 64 float32 is 13 MiB


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
    vectors: np.ndarray | None = None         # (b, k, D) float32: the items' vectors, while because is to come
    because_ids: np.ndarray | None = None     # (b, k, n): history items of largest share ('' past the history)
    because_shares: np.ndarray | None = None  # (b, k, n) float32: their shares of the score (NaN past it)


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
    order = np.lexsort((np.concatenate([a.item_ids, b.item_ids], axis=1),
                        -np.concatenate([a.scores, b.scores], axis=1)), axis=-1)[:, :k]

    def best(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        both = np.concatenate([x, y], axis=1)
        return np.take_along_axis(both, order.reshape(order.shape + (1,) * (both.ndim - 2)), 1)
    return Ranked(a.query_ids, best(a.item_ids, b.item_ids), best(a.scores, b.scores), modalities,
                  best(*contributions), None if a.vectors is None else best(a.vectors, b.vectors))


def because(history: np.ndarray, weights: np.ndarray, items: np.ndarray, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Which history items a score comes from. The user vector is ``weightsᵀ history`` (history item vectors,
    (h, D), weights as the ``users`` dataset keeps them), so the score of item row ``i`` of ``items`` (r, D)
    splits exactly into ``weights[j] <history[j], items[i]>``. Returns the (r, n) history rows of the largest
    contributions, largest first (ties: lower row; NaN weights last), and those (r, n) contributions. Leading
    axes batch: (c, h, D), (c, h) and (c, r, D) give (c, r, n)."""
    shares = (items @ np.swapaxes(history, -1, -2)) * weights[..., None, :]
    order = np.argsort(-shares, axis=-1, kind="stable")[..., :n]
    return order, np.take_along_axis(shares, order, axis=-1)
