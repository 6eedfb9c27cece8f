"""Exact top-k of queries against items at any catalogue size, one matrix product per (query batch, item shard).

Every id hashes to one of ``BUCKETS`` buckets (``models.topk.bucket``). Records are stacked into blocks in
the bundle that produces them and cut by bucket there, and the pieces become a side input looked up by
bucket, so the data cross the runner once and whole shards are never shuffled. (A runner hands each worker
its whole share of a stage's input in one message; the one stage TopK adds receives only small task
descriptions.) Once the records are counted per bucket, a shard (or a batch) is a range of consecutive
buckets holding about ``shard_size`` items (``batch_size`` queries). A task reads one shard's pieces, then
each of its query batches' in turn, and yields each batch's partial top-k from one matrix product
(``models.topk``); the partials of a batch merge in a combiner that keeps only the best k per query. So a
worker holds one shard and one batch at a time, and each shard is read by a few tasks rather than copied
once per batch. Counts are checked where pieces meet, so data a runner loses or duplicates fails the job
instead of silently changing a ranking. The same transform serves recommendations (users as queries, their
seen items excluded) and similar items (items as queries, each excluding itself). Ties are broken by item
id, so the result does not depend on how ids are cut up.
"""
from __future__ import annotations

import ctypes
import itertools
import math
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindows

from models import topk

USER_BATCH = 8192    # queries per batch: 8192 x 64 float32 is 2 MiB, plus the exclusions
ITEM_SHARD = 131072  # items per shard: 131072 x 64 float32 is 32 MiB per modality plus the fused vector. Each
                     # shard adds a partial ranking per query that crosses the runner, the largest cost after
                     # the product at 64 dimensions
BUCKETS = 64         # a catalogue of more than BUCKETS x shard size items gets larger shards
BLOCK = 8192         # records stacked at a time where they are read
TASKS = 2            # the task count is a multiple of this (the workers to share them evenly), and no larger:
                     # every task reads its whole shard through the runner
TASK_BATCHES = 16    # at most this many query batches per task, so a big job still spreads over many workers


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
    def stack(items) -> Shard:
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

    def take(self, rows) -> Shard:
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
    def concat(pieces) -> Shard:
        """One shard from its pieces, rows sorted by item id."""
        modalities = tuple(sorted({m for p in pieces for m in p.modalities}))
        parts, has = [], []
        for p in pieces:
            where = [modalities.index(m) for m in p.modalities]
            widened = np.zeros((len(modalities), *p.vectors.shape), dtype=np.float32)
            h = np.zeros((len(p.ids), len(modalities)), dtype=bool)
            widened[where], h[:, where] = p.parts, p.has
            parts.append(widened)
            has.append(h)
        out = Shard(np.concatenate([p.ids for p in pieces]), _concat([p.vectors for p in pieces], "item"),
                    modalities, np.concatenate(parts, axis=1), np.concatenate(has),
                    np.concatenate([p.hashes for p in pieces]))
        return out.take(np.argsort(out.ids, kind="stable"))


def _unpickle_shard(ids, vectors, modalities, parts, has, hashes) -> Shard:
    if modalities:
        last = (vectors - parts.sum(axis=0)) * has[:, -1:]
        parts = np.concatenate([parts, last[None]])
    return Shard(ids, vectors, modalities, parts, has, hashes)


class Batch(NamedTuple):
    """Queries stacked into a matrix, with the items each may not get (row r's are ``excluded_ids[
    starts[r]:starts[r + 1]]``), and the mixed hashes of the query ids (their buckets). Ids are UTF-8 bytes,
    as in ``Shard``. The excluded ids are most of what crosses the runner, so nothing else is kept per
    exclusion: a task hashes them when it reads the batch, which costs less than moving the hashes."""
    ids: np.ndarray           # (b,) bytes
    vectors: np.ndarray       # (b, D) float32
    starts: np.ndarray        # (b + 1,) int64: where each row's excluded ids start
    excluded_ids: np.ndarray  # (e,) bytes item id
    hashes: np.ndarray        # (b,) uint64 mixed hash of each query id

    @staticmethod
    def stack(queries) -> Batch:
        excluded = [list(q[2]) for q in queries]
        ids = topk.utf8([q[0] for q in queries])
        return Batch(ids, _matrix([q[1] for q in queries], "query"), _starts([len(e) for e in excluded]),
                     topk.utf8(list(itertools.chain.from_iterable(excluded))), topk.mixed_hash(ids))

    def take(self, rows: np.ndarray) -> Batch:
        counts = np.diff(self.starts)[rows]
        starts = _starts(counts)
        moved = np.repeat(self.starts[:-1][rows] - starts[:-1], counts) + np.arange(starts[-1])
        return Batch(self.ids[rows], self.vectors[rows], starts, self.excluded_ids[moved], self.hashes[rows])

    def rows(self, lo: int, hi: int) -> Batch:
        """Rows ``lo`` to ``hi - 1``, as views."""
        a, b = self.starts[lo], self.starts[hi]
        return Batch(self.ids[lo:hi], self.vectors[lo:hi], self.starts[lo:hi + 1] - a, self.excluded_ids[a:b],
                     self.hashes[lo:hi])

    def excluded_rows(self) -> np.ndarray:
        """The query row of each excluded id."""
        return np.repeat(np.arange(len(self.ids)), np.diff(self.starts))

    @staticmethod
    def concat(pieces) -> Batch:
        """One batch from its pieces, rows sorted by query id."""
        out = Batch(np.concatenate([p.ids for p in pieces]), _concat([p.vectors for p in pieces], "query"),
                    _starts(np.concatenate([np.diff(p.starts) for p in pieces])),
                    np.concatenate([p.excluded_ids for p in pieces]), np.concatenate([p.hashes for p in pieces]))
        return out.take(np.argsort(out.ids, kind="stable"))


def _starts(counts) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


class Ranked(NamedTuple):
    """Best items for a batch of queries (or one query): best first, padded with '' / -inf past the end.
    A batch's partials carry UTF-8 ids (``models.topk.utf8``); what ``TopK`` yields carries str."""
    query_ids: np.ndarray    # (b,)
    item_ids: np.ndarray     # (b, k)
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


class Span(NamedTuple):
    """A shard or batch: the buckets ``lo`` to ``hi - 1`` and how many records were counted in them."""
    lo: int
    hi: int
    rows: int


def spans(counts: np.ndarray, size: int, multiple: int = 1) -> list[Span]:
    """Consecutive bucket ranges of at most about ``size`` records each: as many ranges as the total needs,
    rounded up to a ``multiple`` (to share evenly), at most one per bucket; empty ranges are left out."""
    n = min(len(counts), _round_up(max(1, math.ceil(int(counts.sum()) / size)), multiple))
    edges = [math.ceil(s * len(counts) / n) for s in range(n + 1)]
    out = [Span(lo, hi, int(counts[lo:hi].sum())) for lo, hi in zip(edges, edges[1:])]
    return [span for span in out if span.rows]


class TopK(beam.PTransform):
    """``{"queries": (query_id, vector, excluded item ids), "items": item dicts} | TopK(k)`` yields
    ``(query_id, Ranked)`` for every query that has at least one allowed item, with ``Ranked`` for one query
    (arrays of length <= k, no padding).

    Item dicts carry ``item_id``, ``vector`` (fused) and ``parts`` ({modality: vector}, summing to
    ``vector``), so each score splits into what each modality contributed.
    """

    def __init__(self, k: int, batch_size: int = USER_BATCH, shard_size: int = ITEM_SHARD):
        super().__init__()
        if min(k, batch_size, shard_size) < 1:
            raise ValueError(f"TopK: k, batch size and shard size must be positive, got {k}, {batch_size}, "
                             f"{shard_size}")
        self._k, self._batch, self._shard = k, batch_size, shard_size

    def expand(self, inputs):
        items, item_counts = inputs["items"] | "ItemPieces" >> _Pieces(Shard)
        queries, query_counts = inputs["queries"] | "QueryPieces" >> _Pieces(Batch)
        tasks = (item_counts
                 | "Tasks" >> beam.FlatMap(_tasks, beam.pvalue.AsSingleton(query_counts), self._shard, self._batch)
                 | "Spread" >> beam.Reshuffle())
        return (tasks
                | "PartialTopK" >> beam.ParDo(_PartialTopK(self._k), beam.pvalue.AsMultiMap(items),
                                              beam.pvalue.AsMultiMap(queries))
                | "MergePartials" >> beam.CombinePerKey(MergeRanked(self._k))
                | "PerQuery" >> beam.FlatMap(_per_query, beam.pvalue.AsSingleton(item_counts), self._shard))


class _Pieces(beam.PTransform):
    """Records into ``(bucket, piece)`` pairs, stacked in the bundle that reads them and cut by bucket, and
    the number of records in each bucket (one array, the only thing that waits for all records)."""

    def __init__(self, kind):
        super().__init__()
        self._kind = kind

    def expand(self, records):
        if not isinstance(records.windowing.windowfn, GlobalWindows):
            raise ValueError("TopK: records must be in the global window (a batch of all queries and items)")
        blocks = records | "Stack" >> beam.ParDo(_Stack(self._kind))
        counts = (blocks
                  | "Count" >> beam.Map(lambda b: np.bincount(_buckets(b), minlength=BUCKETS))
                  | "Total" >> beam.CombineGlobally(lambda counts: sum(counts, np.zeros(BUCKETS, dtype=np.int64))))
        return blocks | "Cut" >> beam.FlatMap(_cut), counts


class _Stack(beam.DoFn):
    """Records into blocks of up to ``BLOCK`` rows, in the bundle that reads them. Records are stacked as
    they are gathered, never handed on as a list: a runner samples an element's size by encoding it, and a
    list of thousands of records, each array pickled on its own, costs more to encode than to stack."""

    def __init__(self, kind):
        super().__init__()
        self._kind = kind

    def start_bundle(self):
        self._records = []

    def process(self, record):
        self._records.append(record)
        if len(self._records) == BLOCK:
            yield self._flush()

    def finish_bundle(self):
        if self._records:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self):
        block, self._records = self._kind.stack(self._records), []
        return block


def _buckets(block) -> np.ndarray:
    return topk.bucket(block.hashes, BUCKETS)


def _cut(block):
    """The block's rows in pieces by bucket: reordered once, then cut into slices."""
    buckets = _buckets(block)
    order = np.argsort(buckets, kind="stable")
    block, buckets = block.take(order), buckets[order]
    edges = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1], True])
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        yield int(buckets[lo]), block.rows(lo, hi)


def _tasks(item_counts, query_counts, shard_size: int, batch_size: int):
    """Every (shard, batch) pair once, as tasks of one shard and some of its batches: the fewest tasks
    whose number is a multiple of ``TASKS`` (where there are enough batches) and that hold at most
    ``TASK_BATCHES`` batches each, so that each shard is read as few times as an even split allows while a
    large job still has a task for every worker. The batches are as many as the size needs, rounded up so
    that each of a shard's tasks gets as many. Largest first: a runner that deals tasks out in turn then
    gives its workers near-equal shares."""
    shards = spans(item_counts, shard_size)
    needed = len(spans(query_counts, batch_size))
    even = TASKS // math.gcd(len(shards), TASKS)
    per_shard = min(needed, _round_up(max(even, math.ceil(needed / TASK_BATCHES)), even))
    batches = spans(query_counts, batch_size, per_shard)
    tasks = [(shard, batches[j::per_shard]) for shard in shards for j in range(per_shard) if batches[j::per_shard]]
    tasks.sort(key=lambda t: -t[0].rows * sum(b.rows for b in t[1]))
    yield from enumerate(tasks)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _read(kind, pieces, span: Span, what: str):
    """The shard or batch of ``span`` from its pieces, checked against the count."""
    block = kind.concat([p for bucket in range(span.lo, span.hi) for p in pieces[bucket]])
    if len(block.ids) != span.rows:
        raise RuntimeError(f"TopK: {what} buckets {span.lo}..{span.hi - 1} hold {len(block.ids)} records where "
                           f"{span.rows} were counted: the runner lost or duplicated data")
    return block


try:
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim  # glibc
except (OSError, AttributeError):  # another C library: nothing to hand back
    _MALLOC_TRIM = None


class _PartialTopK(beam.DoFn):
    """``_partial``, with a worker's peak memory kept close to one task's data however many tasks it runs:
    the kernels are compiled before the first task (the compiler's memory stays), and before each task the
    pages freed by earlier work (other stages, earlier tasks) go back to the system. glibc keeps freed
    memory in per-thread pools, and a runner runs bundles on several threads, so a task would otherwise
    take fresh pages on top of them."""

    def __init__(self, k: int):
        super().__init__()
        self._k = k

    def setup(self):
        topk.compile_kernels()

    def process(self, task, items, queries):
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
        yield from _partial(task, self._k, items, queries)


def _partial(task, k, items, queries):
    """One task: its shard, then for each of its batches the shard's best k for every query, from one
    matrix product."""
    _, (span, batch_spans) = task
    shard = _read(Shard, items, span, "item")
    index = topk.HashIndex(shard.ids, shard.hashes)
    for batch_span in batch_spans:
        batch = _read(Batch, queries, batch_span, "query")
        hashes = topk.mixed_hash(batch.excluded_ids)
        buckets = topk.bucket(hashes, BUCKETS)
        mine = np.flatnonzero((buckets >= span.lo) & (buckets < span.hi))
        found, cols = index.find(batch.excluded_ids[mine], hashes[mine])
        columns, scores = topk.top_k(batch.vectors, shard.vectors, k, (batch.excluded_rows()[mine][found], cols[found]))
        item_ids = np.where(columns >= 0, shard.ids[np.maximum(columns, 0)], b"")
        yield batch_span.lo, Ranked(batch.ids, item_ids, scores, shard.modalities,
                                    topk.contributions(batch.vectors, shard.parts, shard.has, columns))


class MergeRanked(beam.CombineFn):
    """Keeps the best k per query of a batch's partials, and how many partials it has merged: the
    accumulator never exceeds batch x k."""

    def __init__(self, k: int):
        super().__init__()
        self._k = k

    def create_accumulator(self):
        return 0, None

    def add_input(self, accumulator, ranked):
        return self.merge_accumulators([accumulator, (1, ranked)])

    def merge_accumulators(self, accumulators):
        count, out = 0, None
        for n, ranked in accumulators:
            if ranked is not None:
                count, out = count + n, ranked if out is None else merge(out, ranked, self._k)
        return count, out

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


def _per_query(batch, item_counts, shard_size: int):
    """The merged batch as one record per query, once every shard's partial is in."""
    _, (merged, r) = batch
    shards = len(spans(item_counts, shard_size))
    if merged != shards:
        raise RuntimeError(f"TopK: a query batch merged {merged} partial rankings for {shards} item shards: "
                           "the runner lost or duplicated data")
    item_ids, found = topk.text(r.item_ids), np.count_nonzero(r.scores > -np.inf, axis=1).tolist()
    for row, (query, n) in enumerate(zip(topk.text(r.query_ids).tolist(), found)):
        if n:
            yield query, Ranked(query, item_ids[row, :n], r.scores[row, :n], r.modalities,
                                r.contributions[row, :n])
