"""Exact top-k of queries against items at any catalogue size, as one task per (query batch, item shard).

Items are cut into shards and queries into batches by a stable hash of their id, with the counts of both
known inside the pipeline, so no worker ever holds more than one shard and one batch. Each (batch, shard)
pair meets in one GroupByKey and yields a partial top-k from one matrix product (``models.topk``); the
partials of a batch merge in a combiner that keeps only the best k per query. The same transform serves
recommendations (users as queries, their seen items excluded) and similar items (items as queries, each
excluding itself). Ties are broken by item id, so the result does not depend on the sharding.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import apache_beam as beam
import numpy as np

from models import topk

USER_BATCH = 8192    # queries per task: 8192 x 64 float32 is 2 MiB
ITEM_SHARD = 32768   # items per task: 32768 x 64 float32 is 8 MiB per modality plus the fused vector


class Shard(NamedTuple):
    """Items stacked into matrices: a block of input items, or a whole shard with rows sorted by item id
    (so that column order breaks ties as the item id does)."""
    ids: np.ndarray          # (s,) str
    vectors: np.ndarray      # (s, D) float32, fused
    modalities: tuple        # names of the parts, sorted
    parts: np.ndarray        # (M, s, D) float32; zero where an item lacks the modality
    has: np.ndarray          # (s, M) bool: which modalities each item has

    @staticmethod
    def stack(items) -> Shard:
        ids = np.array([item["item_id"] for item in items], dtype=str)
        vectors = _matrix([item["vector"] for item in items], "item")
        modalities = tuple(sorted({m for item in items for m in item["parts"]}))
        parts = np.zeros((len(modalities), *vectors.shape), dtype=np.float32)
        has = np.zeros((len(items), len(modalities)), dtype=bool)
        for row, item in enumerate(items):
            for name, part in item["parts"].items():
                m = modalities.index(name)
                parts[m, row], has[row, m] = part, True
        return Shard(ids, vectors, modalities, parts, has)

    def take(self, rows: np.ndarray) -> Shard:
        return Shard(self.ids[rows], self.vectors[rows], self.modalities, self.parts[:, rows], self.has[rows])

    @staticmethod
    def concat(blocks) -> Shard:
        """One shard from its blocks, rows sorted by item id."""
        modalities = tuple(sorted({m for b in blocks for m in b.modalities}))
        parts, has = [], []
        for b in blocks:
            where = [modalities.index(m) for m in b.modalities]
            p = np.zeros((len(modalities), *b.vectors.shape), dtype=np.float32)
            h = np.zeros((len(b.ids), len(modalities)), dtype=bool)
            p[where], h[:, where] = b.parts, b.has
            parts.append(p)
            has.append(h)
        out = Shard(np.concatenate([b.ids for b in blocks]), _concat([b.vectors for b in blocks], "item"),
                    modalities, np.concatenate(parts, axis=1), np.concatenate(has))
        return out.take(np.argsort(out.ids, kind="stable"))


class Batch(NamedTuple):
    """Queries stacked into a matrix, with the items each may not get as (row, item id) pairs."""
    ids: np.ndarray            # (b,) str
    vectors: np.ndarray        # (b, D) float32
    excluded_rows: np.ndarray  # (e,) int64 query row
    excluded_ids: np.ndarray   # (e,) str item id

    @staticmethod
    def stack(queries) -> Batch:
        excluded = [list(q[2]) for q in queries]
        return Batch(np.array([q[0] for q in queries], dtype=str), _matrix([q[1] for q in queries], "query"),
                     np.repeat(np.arange(len(queries)), [len(e) for e in excluded]),
                     np.array([i for e in excluded for i in e], dtype=str))

    def take(self, rows: np.ndarray) -> Batch:
        new = np.full(len(self.ids), -1)
        new[rows] = np.arange(len(rows))
        moved = new[self.excluded_rows]
        keep = moved >= 0
        return Batch(self.ids[rows], self.vectors[rows], moved[keep], self.excluded_ids[keep])

    def only(self, keep: np.ndarray) -> Batch:
        """The same queries with only the exclusions where ``keep``."""
        return Batch(self.ids, self.vectors, self.excluded_rows[keep], self.excluded_ids[keep])

    @staticmethod
    def concat(blocks) -> Batch:
        """One batch from its blocks, rows sorted by query id."""
        offsets = np.cumsum([0] + [len(b.ids) for b in blocks[:-1]])
        out = Batch(np.concatenate([b.ids for b in blocks]), _concat([b.vectors for b in blocks], "query"),
                    np.concatenate([b.excluded_rows + o for b, o in zip(blocks, offsets)]),
                    np.concatenate([b.excluded_ids for b in blocks]))
        return out.take(np.argsort(out.ids, kind="stable"))


class Ranked(NamedTuple):
    """Best items for a batch of queries (or one query): best first, padded with '' / -inf past the end."""
    query_ids: np.ndarray    # (b,)
    item_ids: np.ndarray     # (b, k) str
    scores: np.ndarray       # (b, k) float32
    modalities: tuple        # (M,)
    contributions: np.ndarray  # (b, k, M) float32: <query, part>; NaN where the item lacks the modality


def _matrix(vectors, what: str) -> np.ndarray:
    try:
        out = np.array(vectors, dtype=np.float32)
    except ValueError:
        out = None
    if out is None or out.ndim != 2:
        raise ValueError(f"TopK: {what} vectors of different lengths ({sorted({len(v) for v in vectors})})")
    return out


def _concat(matrices, what: str) -> np.ndarray:
    if len({m.shape[1] for m in matrices}) > 1:
        raise ValueError(f"TopK: {what} vectors of different lengths ({sorted({m.shape[1] for m in matrices})})")
    return np.concatenate(matrices)


def groups(n: int, size: int) -> int:
    return max(1, math.ceil(n / size))


class TopK(beam.PTransform):
    """``{"queries": (query_id, vector, excluded item ids), "items": item dicts} | TopK(k)`` yields
    ``(query_id, Ranked)`` for every query that has at least one allowed item, with ``Ranked`` for one query
    (arrays of length <= k, no padding).

    Item dicts carry ``item_id``, ``vector`` (fused) and ``parts`` ({modality: vector}, summing to
    ``vector``), so each score splits into what each modality contributed. Records are stacked into
    matrices in the bundle that makes them, so from there on only blocks of a few thousand rows are
    shuffled, never one record at a time.
    """

    def __init__(self, k: int, batch_size: int = USER_BATCH, shard_size: int = ITEM_SHARD):
        super().__init__()
        if min(k, batch_size, shard_size) < 1:
            raise ValueError(f"TopK: k, batch size and shard size must be positive, got {k}, {batch_size}, "
                             f"{shard_size}")
        self._k, self._batch, self._shard = k, batch_size, shard_size

    def expand(self, inputs):
        shards, n_shards = inputs["items"] | "Shards" >> _Group(Shard, self._shard)
        batches, n_batches = inputs["queries"] | "Batches" >> _Group(Batch, self._batch)
        pairs = ((shards | "ShardToPairs" >> beam.FlatMap(_shard_pairs, beam.pvalue.AsSingleton(n_batches)),
                  batches | "BatchToPairs" >> beam.FlatMap(_batch_pairs, beam.pvalue.AsSingleton(n_shards)))
                 | "AllPairs" >> beam.Flatten()
                 | "MeetPairs" >> beam.GroupByKey())
        return (pairs
                | "PartialTopK" >> beam.FlatMap(_partial, self._k)
                | "MergePartials" >> beam.CombinePerKey(MergeRanked(self._k))
                | "PerQuery" >> beam.FlatMap(_per_query))


class _Group(beam.PTransform):
    """Records into ``(group, block)`` with about ``size`` records per group: stacked per bundle, then split
    by a stable hash of the id modulo ``n``, which is known only once all records are counted. Returns the
    groups and ``n`` (a one-element PCollection); a group no id hashed to does not appear."""

    def __init__(self, kind, size: int):
        super().__init__()
        self._kind, self._size = kind, size

    def expand(self, records):
        kind, size = self._kind, self._size
        blocks = (records
                  | "Bundle" >> beam.BatchElements(min_batch_size=1024, max_batch_size=8192)
                  | "Stack" >> beam.Map(kind.stack))
        modulus = (blocks
                   | "Sizes" >> beam.Map(lambda b: len(b.ids))
                   | "Total" >> beam.CombineGlobally(sum)
                   | "Groups" >> beam.Map(groups, size))

        def split(block, n):
            group = topk.id_hash(block.ids.tolist()) % np.uint64(n)
            for g in np.unique(group).tolist():
                yield g, block.take(np.flatnonzero(group == g))

        grouped = (blocks
                   | "Split" >> beam.FlatMap(split, beam.pvalue.AsSingleton(modulus))
                   | "Group" >> beam.GroupByKey()
                   | "Concat" >> beam.MapTuple(lambda g, parts: (g, kind.concat(list(parts)))))
        return grouped, modulus


def _shard_pairs(shard, n_batches):
    s, value = shard
    for b in range(n_batches):
        yield (s, b), value


def _batch_pairs(batch, n_shards):
    """The batch once per shard, each copy carrying only the exclusions whose item hashes to that shard."""
    b, value = batch
    shard_of = topk.id_hash(value.excluded_ids.tolist()) % np.uint64(n_shards)
    for s in range(n_shards):
        yield (s, b), value.only(shard_of == s)


def _partial(pair, k):
    """One (batch, shard) task: the shard's best k for every query of the batch, from one matrix product."""
    (_, b), values = pair
    shard = next((v for v in values if isinstance(v, Shard)), None)
    batch = next((v for v in values if isinstance(v, Batch)), None)
    if shard is None or batch is None:  # a shard or batch number that no id hashed to
        return
    found, cols = topk.locate(shard.ids, batch.excluded_ids)
    columns, scores = topk.top_k(batch.vectors, shard.vectors, k, (batch.excluded_rows[found], cols[found]))
    valid = columns >= 0
    safe = np.where(valid, columns, 0)
    contributions = np.einsum("bd,mbkd->bkm", batch.vectors, shard.parts[:, safe])
    contributions[~shard.has[safe]] = np.nan
    yield b, Ranked(batch.ids, np.where(valid, shard.ids[safe], ""), scores, shard.modalities, contributions)


class MergeRanked(beam.CombineFn):
    """Keeps the best k per query of a batch's partials: the accumulator never exceeds batch x k."""

    def __init__(self, k: int):
        super().__init__()
        self._k = k

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, ranked):
        return ranked if accumulator is None else merge(accumulator, ranked, self._k)

    def merge_accumulators(self, accumulators):
        out = None
        for a in accumulators:
            if a is not None:
                out = a if out is None else merge(out, a, self._k)
        return out

    def extract_output(self, accumulator):
        return accumulator


def merge(a: Ranked, b: Ranked, k: int) -> Ranked:
    """Two partials of the same queries into their best k: score descending, then item id ascending."""
    modalities = tuple(sorted(set(a.modalities) | set(b.modalities)))
    contributions = [np.full((*r.scores.shape, len(modalities)), np.nan, dtype=np.float32) for r in (a, b)]
    for out, r in zip(contributions, (a, b)):
        out[..., [modalities.index(m) for m in r.modalities]] = r.contributions
    ids = np.concatenate([a.item_ids, b.item_ids], axis=1)
    scores = np.concatenate([a.scores, b.scores], axis=1)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return Ranked(a.query_ids, np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1),
                  modalities, np.take_along_axis(np.concatenate(contributions, axis=1), order[..., None], 1))


def _per_query(batch):
    _, r = batch
    for row, query in enumerate(r.query_ids.tolist()):
        n = int(np.count_nonzero(r.scores[row] > -np.inf))
        if n:
            yield query, Ranked(query, r.item_ids[row, :n], r.scores[row, :n], r.modalities,
                                r.contributions[row, :n])
