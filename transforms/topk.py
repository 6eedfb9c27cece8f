"""Exact top-k of queries against items at any catalogue size, one matrix product per (query batch, item shard).

Every item id hashes to one of ``BUCKETS`` buckets (``models.topk.bucket``). Items are stacked into blocks in
the bundle that reads them and cut by bucket there, and the pieces become a side input looked up by (bucket,
group of blocks), so the items cross the runner once, whole shards are never shuffled, and no one lookup
returns more than a group's share of a bucket however large the catalogue (a lookup's answer arrives as one
message, and a worker's peak memory grew with its size; this holds where workers look up one key at a time, as
SDK worker processes do: the local runner's in-process workers read a whole side input at their first lookup).
Once the pieces are counted, a shard is a range of consecutive buckets holding about ``shard_size`` items.
Queries never cross the runner: they are stacked into batches of up to ``batch_size`` in the bundle that makes
them, and each batch is ranked there against every shard in turn, one matrix product per shard
(``models.topk``), its partials merging as they come; the rankings are yielded per query from that bundle, so
what consumes them runs there too. Moving data between stages is the largest cost after the product on a local
runner (see docs/performance.md), and a job's users, their exclusions and their rankings are most of its data. A worker
holds one batch and one shard, the last it read, which the next batch starts with: a catalogue of one shard is
read once per worker. Parallelism follows the queries' bundles. The kernel rescores its answer exactly, so a
ranking does not depend on which queries share a batch, and ties are broken by item id, so it does not depend
on how items are cut up either. Counts are checked where pieces meet, so items a runner loses or duplicates
fail the job instead of silently changing a ranking. The same transform serves recommendations (users as
queries, their seen items excluded) and similar items (items as queries, each excluding itself).
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import math
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindows

from mmfuse.models import topk

USER_BATCH = 8192    # queries per batch: 8192 x 64 float32 is 2 MiB, plus the exclusions
ITEM_SHARD = 131072  # items per shard: 131072 x 64 float32 is 32 MiB per modality plus the fused vector
BUCKETS = 64         # a catalogue of more than BUCKETS x shard size items gets larger shards
BLOCK = 16384        # items stacked at a time where they are read: 32768 read faster, but the stacking peaks higher
GROUP = 4 * BLOCK    # items at most per group of blocks; a side-input lookup answers one group's share of a bucket


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


def _unpickle_shard(ids, vectors, modalities, parts, has, hashes) -> Shard:
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
    def stack(queries) -> Batch:
        excluded = [list(q[2]) for q in queries]
        return Batch(topk.utf8([q[0] for q in queries]), _matrix([q[1] for q in queries], "query"),
                     _starts([len(e) for e in excluded]), topk.utf8(list(itertools.chain.from_iterable(excluded))))

    def excluded_rows(self) -> np.ndarray:
        """The query row of each excluded id."""
        return np.repeat(np.arange(len(self.ids)), np.diff(self.starts))


def _starts(counts) -> np.ndarray:
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


def _matrix(vectors, what: str) -> np.ndarray:
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
        items, piece_counts = inputs["items"] | "ItemPieces" >> _Pieces()
        return (_global(inputs["queries"])
                | "QueryBatches" >> beam.ParDo(_Stack(Batch, self._batch))
                | "Rank" >> beam.ParDo(_Rank(self._k, self._shard), beam.pvalue.AsMultiMap(items),
                                       beam.pvalue.AsSingleton(piece_counts)))


def _global(records):
    if not isinstance(records.windowing.windowfn, GlobalWindows):
        raise ValueError("TopK: records must be in the global window (a batch of all queries and items)")
    return records


class _Pieces(beam.PTransform):
    """Items into ``((bucket, group), piece)`` pairs, stacked in the bundle that reads them and cut by bucket,
    and the number of items under each key (a ``Counter``, the only thing that waits for all items)."""

    def expand(self, records):
        pieces = _global(records) | "Stack" >> beam.ParDo(_Stack(Shard, BLOCK)) | "Cut" >> beam.ParDo(_Cut(GROUP))
        counts = (pieces
                  | "Count" >> beam.Map(lambda kv: collections.Counter({kv[0]: len(kv[1].ids)}))
                  | "Total" >> beam.CombineGlobally(lambda counts: sum(counts, collections.Counter())))
        return pieces, counts


class _Stack(beam.DoFn):
    """Records into blocks of up to ``size`` rows, in the bundle that reads them. Records are stacked as
    they are gathered, never handed on as a list: a runner samples an element's size by encoding it, and a
    list of thousands of records, each array pickled on its own, costs more to encode than to stack."""

    def __init__(self, kind, size: int):
        super().__init__()
        self._kind, self._size = kind, size

    def start_bundle(self):
        self._records = []

    def process(self, record):
        self._records.append(record)
        if len(self._records) == self._size:
            yield self._flush()

    def finish_bundle(self):
        if self._records:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self):
        block, self._records = self._kind.stack(self._records), []
        return block


class _Cut(beam.DoFn):
    """Blocks into pieces by bucket, keyed ``(bucket, group)``: consecutive blocks that one instance of this
    DoFn cuts (a runner has one per worker thread), up to ``size`` items, form a group, named by its first
    row's hash. A group spans bundles, so small bundles (small blocks) do not multiply the lookups; many
    instances each cutting less than ``size`` items do (a shard read takes at least one lookup per instance
    and bucket). Groups that share a name (a repeated item id) share keys, which the counts then add up."""

    def __init__(self, size: int):
        super().__init__()
        self._size = size

    def setup(self):
        self._group, self._rows = 0, self._size

    def process(self, block):
        if self._rows + len(block.ids) > self._size:
            self._group, self._rows = int(block.hashes[0] >> np.uint64(1)), 0  # fits an int64, as keys must
        self._rows += len(block.ids)
        yield from _cut(block, self._group)


def _cut(block, group: int):
    """The block's rows in pieces by bucket, keyed ``(bucket, group)``: reordered once, then cut into slices."""
    buckets = topk.bucket(block.hashes, BUCKETS)
    order = np.argsort(buckets, kind="stable")
    block, buckets = block.take(order), buckets[order]
    edges = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1], True])
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        yield (int(buckets[lo]), group), block.rows(lo, hi)


def bucket_counts(piece_counts) -> np.ndarray:
    """Items per bucket, from the counts per ``(bucket, group)`` key."""
    out = np.zeros(BUCKETS, dtype=np.int64)
    for (bucket, _), rows in piece_counts.items():
        out[bucket] += rows
    return out


def _read(pieces, span: Span, piece_counts) -> Shard:
    """The shard of ``span`` from its pieces, checked against the count before they are put together."""
    keys = sorted(key for key in piece_counts if span.lo <= key[0] < span.hi)
    mine = [p for key in keys for p in pieces[key]]
    held = sum(len(p.ids) for p in mine)
    if held != span.rows:
        raise RuntimeError(f"TopK: item buckets {span.lo}..{span.hi - 1} hold {held} records where {span.rows} "
                           "were counted: the runner lost or duplicated data")
    return Shard.concat(mine)


try:
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim  # glibc
except (OSError, AttributeError):  # another C library: nothing to hand back
    _MALLOC_TRIM = None


class _Rank(beam.DoFn):
    """Each batch against every shard, its partials merged as they come, yielded per query. The worker holds
    the last shard it read and starts the next batch with it. Its peak memory stays close to one shard and
    one batch however many batches it ranks: the kernels are compiled before the first batch (the
    compiler's memory stays), and a shard's pages go back to the system before the next is read (glibc
    keeps freed memory in per-thread pools, and a runner runs bundles on several threads)."""

    def __init__(self, k: int, shard_size: int):
        super().__init__()
        self._k, self._shard_size = k, shard_size

    def setup(self):
        topk.compile_kernels()
        self._held = None  # (span, shard, HashIndex of its ids)

    def process(self, batch, items, piece_counts):
        shards = spans(bucket_counts(piece_counts), self._shard_size)
        if self._held is not None and self._held[0] in shards:
            shards.remove(self._held[0])
            shards.insert(0, self._held[0])
        hashes = topk.mixed_hash(batch.excluded_ids)
        buckets, rows = topk.bucket(hashes, BUCKETS), batch.excluded_rows()
        best = None
        for span in shards:
            mine = np.flatnonzero((buckets >= span.lo) & (buckets < span.hi))
            ranked = self._rank(batch, rows[mine], batch.excluded_ids[mine], hashes[mine],
                                *self._shard(items, span, piece_counts))
            best = ranked if best is None else merge(best, ranked, self._k)
        if best is not None:
            yield from _per_query(best)

    def _rank(self, batch, excluded_rows, excluded_ids, excluded_hashes, shard, index) -> Ranked:
        """The batch's best k in one shard. A method of its own so that nothing refers to the shard once it
        returns: the next shard is read with this one freed."""
        found, cols = index.find(excluded_ids, excluded_hashes)
        columns, scores = topk.top_k(batch.vectors, shard.vectors, self._k, (excluded_rows[found], cols[found]))
        item_ids = np.where(columns >= 0, shard.ids[np.maximum(columns, 0)], b"")
        return Ranked(batch.ids, item_ids, scores, shard.modalities,
                      topk.contributions(batch.vectors, shard.parts, shard.has, columns))

    def _shard(self, items, span: Span, piece_counts):
        if self._held is None or self._held[0] != span:
            self._held = None
            if _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)
            shard = _read(items, span, piece_counts)
            self._held = span, shard, topk.HashIndex(shard.ids, shard.hashes)
        return self._held[1:]


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


def _per_query(r: Ranked):
    """A batch's ranking as one record per query that got any item."""
    item_ids, found = topk.text(r.item_ids), np.count_nonzero(r.scores > -np.inf, axis=1).tolist()
    for row, (query, n) in enumerate(zip(topk.text(r.query_ids).tolist(), found)):
        if n:
            yield query, Ranked(query, item_ids[row, :n], r.scores[row, :n], r.modalities,
                                r.contributions[row, :n])
