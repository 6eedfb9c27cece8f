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
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindows

from mmfuse.models import topk
from mmfuse.models.ranking import Batch, Ranked, Shard, Span, merge, spans

if TYPE_CHECKING:
    from apache_beam.utils.windowed_value import WindowedValue

    Pieces = Mapping[tuple[int, int], Iterable[Shard]]  # side input: the pieces under each (bucket, group) key
    PieceCounts = Mapping[tuple[int, int], int]  # side input: items under each (bucket, group) key

USER_BATCH = 8192    # queries per batch: 8192 x 64 float32 is 2 MiB, plus the exclusions and histories
ITEM_SHARD = 131072  # items per shard: 131072 x 64 float32 is 32 MiB per modality plus the fused vector
BUCKETS = 64         # a catalogue of more than BUCKETS x shard size items gets larger shards
BLOCK = 16384        # items stacked at a time where they are read: 32768 read faster, but the stacking peaks higher
GROUP = 4 * BLOCK    # items at most per group of blocks; a side-input lookup answers one group's share of a bucket
BECAUSE = 3          # history items named per ranked item, for queries that carry their history


class TopK(beam.PTransform):
    """``{"queries": (query_id, vector, excluded item ids), "items": item dicts} | TopK(k)`` yields
    ``(query_id, Ranked)`` for every query that has at least one allowed item, with ``Ranked`` for one query
    (arrays of length <= k, no padding). Queries with a fourth element, their kept history ``(item ids,
    weights)`` (the query vector is the weighted sum of the history's item vectors), also get each ranked
    item's ``BECAUSE`` history items of largest share of its score; the history items' vectors are found in
    the shards as they are read.

    Item dicts carry ``item_id``, ``vector`` (fused) and ``parts`` ({modality: vector}, summing to
    ``vector``), so each score splits into what each modality contributed.
    """

    def __init__(self, k: int, batch_size: int = USER_BATCH, shard_size: int = ITEM_SHARD):
        super().__init__()
        if min(k, batch_size, shard_size) < 1:
            raise ValueError(f"TopK: k, batch size and shard size must be positive, got {k}, {batch_size}, "
                             f"{shard_size}")
        self._k, self._batch, self._shard = k, batch_size, shard_size

    def expand(self, inputs: dict[str, beam.PCollection]) -> beam.PCollection:
        items, piece_counts = inputs["items"] | "ItemPieces" >> _Pieces()
        return (_global(inputs["queries"])
                | "QueryBatches" >> beam.ParDo(_Stack(Batch, self._batch))
                | "Rank" >> beam.ParDo(_Rank(self._k, self._shard), beam.pvalue.AsMultiMap(items),
                                       beam.pvalue.AsSingleton(piece_counts)))


def _global(records: beam.PCollection) -> beam.PCollection:
    if not isinstance(records.windowing.windowfn, GlobalWindows):
        raise ValueError("TopK: records must be in the global window (a batch of all queries and items)")
    return records


class _Pieces(beam.PTransform):
    """Items into ``((bucket, group), piece)`` pairs, stacked in the bundle that reads them and cut by bucket,
    and the number of items under each key (a ``Counter``, the only thing that waits for all items)."""

    def expand(self, records: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        pieces = _global(records) | "Stack" >> beam.ParDo(_Stack(Shard, BLOCK)) | "Cut" >> beam.ParDo(_Cut(GROUP))
        counts = (pieces
                  | "Count" >> beam.Map(lambda kv: collections.Counter({kv[0]: len(kv[1].ids)}))
                  | "Total" >> beam.CombineGlobally(lambda counts: sum(counts, collections.Counter())))
        return pieces, counts


class _Stack(beam.DoFn):
    """Records into blocks of up to ``size`` rows, in the bundle that reads them. Records are stacked as
    they are gathered, never handed on as a list: a runner samples an element's size by encoding it, and a
    list of thousands of records, each array pickled on its own, costs more to encode than to stack."""

    def __init__(self, kind: type[Shard] | type[Batch], size: int):
        super().__init__()
        self._kind, self._size = kind, size

    def start_bundle(self) -> None:
        self._records = []

    def process(self, record: Any) -> Iterator[Shard | Batch]:
        self._records.append(record)
        if len(self._records) == self._size:
            yield self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self._records:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self) -> Shard | Batch:
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

    def setup(self) -> None:
        self._group, self._rows = 0, self._size

    def process(self, block: Shard) -> Iterator[tuple[tuple[int, int], Shard]]:
        if self._rows + len(block.ids) > self._size:
            self._group, self._rows = int(block.hashes[0] >> np.uint64(1)), 0  # fits an int64, as keys must
        self._rows += len(block.ids)
        yield from _cut(block, self._group)


def _cut(block: Shard, group: int) -> Iterator[tuple[tuple[int, int], Shard]]:
    """The block's rows in pieces by bucket, keyed ``(bucket, group)``: reordered once, then cut into slices."""
    buckets = topk.bucket(block.hashes, BUCKETS)
    order = np.argsort(buckets, kind="stable")
    block, buckets = block.take(order), buckets[order]
    edges = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1], True])
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        yield (int(buckets[lo]), group), block.rows(lo, hi)


def bucket_counts(piece_counts: PieceCounts) -> np.ndarray:
    """Items per bucket, from the counts per ``(bucket, group)`` key."""
    out = np.zeros(BUCKETS, dtype=np.int64)
    for (bucket, _), rows in piece_counts.items():
        out[bucket] += rows
    return out


def _read(pieces: Pieces, span: Span, piece_counts: PieceCounts) -> Shard:
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

    def setup(self) -> None:
        topk.compile_kernels()
        self._held = None  # (span, shard, HashIndex of its ids)

    def process(self, batch: Batch, items: Pieces, piece_counts: PieceCounts) -> Iterator[tuple[str, Ranked]]:
        shards = spans(bucket_counts(piece_counts), self._shard_size)
        if self._held is not None and self._held[0] in shards:
            shards.remove(self._held[0])
            shards.insert(0, self._held[0])
        hashes = topk.mixed_hash(batch.excluded_ids)
        buckets, rows = topk.bucket(hashes, BUCKETS), batch.excluded_rows()
        history = batch.history
        if history is not None:  # history items' vectors, found in the shards as they are read
            history_buckets = topk.bucket(history.hashes, BUCKETS)
            history_vectors = np.full((len(history.ids), batch.vectors.shape[1]), np.nan, np.float32)
        best = None
        for span in shards:
            mine = np.flatnonzero((buckets >= span.lo) & (buckets < span.hi))
            shard, index = self._shard(items, span, piece_counts)
            ranked = self._rank(batch, rows[mine], batch.excluded_ids[mine], hashes[mine], shard, index)
            if history is not None:
                theirs = np.flatnonzero((history_buckets >= span.lo) & (history_buckets < span.hi))
                found, at = index.find(history.ids[theirs], history.hashes[theirs])
                history_vectors[theirs[found]] = shard.vectors[at[found]]
            del shard, index  # the next shard is read with this one freed
            best = ranked if best is None else merge(best, ranked, self._k)
        if best is None:
            return
        if history is not None:
            ids, shares = history.explain(history_vectors, best.vectors, BECAUSE)
            best = best._replace(vectors=None, because_ids=ids, because_shares=shares)
        yield from _per_query(best)

    def _rank(self, batch: Batch, excluded_rows: np.ndarray, excluded_ids: np.ndarray, excluded_hashes: np.ndarray,
              shard: Shard, index: topk.HashIndex) -> Ranked:
        """The batch's best k in one shard, with their vectors where the batch's history is to explain them."""
        found, cols = index.find(excluded_ids, excluded_hashes)
        columns, scores = topk.top_k(batch.vectors, shard.vectors, self._k, (excluded_rows[found], cols[found]))
        item_ids = np.where(columns >= 0, shard.ids[np.maximum(columns, 0)], b"")
        vectors = None if batch.history is None else shard.vectors[np.maximum(columns, 0)]
        return Ranked(batch.ids, item_ids, scores, shard.modalities,
                      topk.contributions(batch.vectors, shard.parts, shard.has, columns), vectors)

    def _shard(self, items: Pieces, span: Span, piece_counts: PieceCounts) -> tuple[Shard, topk.HashIndex]:
        if self._held is None or self._held[0] != span:
            self._held = None
            if _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)
            shard = _read(items, span, piece_counts)
            self._held = span, shard, topk.HashIndex(shard.ids, shard.hashes)
        return self._held[1:]


def _per_query(r: Ranked) -> Iterator[tuple[str, Ranked]]:
    """A batch's ranking as one record per query that got any item."""
    item_ids, found = topk.text(r.item_ids), np.count_nonzero(r.scores > -np.inf, axis=1).tolist()
    because_ids = None if r.because_ids is None else topk.text(r.because_ids)
    for row, (query, n) in enumerate(zip(topk.text(r.query_ids).tolist(), found)):
        if n:
            because = {} if because_ids is None else {"because_ids": because_ids[row, :n],
                                                      "because_shares": r.because_shares[row, :n]}
            yield query, Ranked(query, item_ids[row, :n], r.scores[row, :n], r.modalities,
                                r.contributions[row, :n], **because)
