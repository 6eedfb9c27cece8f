"""Exact top-k by inner product over one block of queries x items, with exclusions and deterministic ties.

At 64 dimensions a score costs about as much to select as to compute, so the selection never sorts or
partitions score rows. Scores are made by the BLAS in tiles small enough to stay in cache, and a compiled
scan passes over each tile once, keeping every row's best k in order: a score enters only if it beats the
row's current k-th, so almost every score costs one comparison (the way FAISS selects). Columns are
scanned in ascending order and an equal score never displaces an earlier column, so ties go to the lower
column; callers order the item rows by item id, so column order is item-id order. Excluded (row, column)
pairs are looked up only for the few scores that would enter.

The BLAS's float32 products depend on its kernel and, for some kernels, on a row's place in the tile, so
the scan keeps ``SLACK`` more than k candidates and these are scored again in float64, in one fixed order:
the best k by that score are the answer, the same on every machine and whichever rows share a tile. A row
whose last kept candidate is within the float32 error bound of its k-th (many near-ties) is scored in full.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

SLACK = 8                # candidates kept beyond k, to be rescored exactly
ROWS_PER_TILE = 512      # a 512 x 512 float32 tile is 1 MiB: it is still in cache when it is scanned
COLUMNS_PER_TILE = 512
CHUNK = 64               # scores of a row checked at once before any is looked at one by one


def top_k(queries: np.ndarray, items: np.ndarray, k: int,
          exclude: tuple[np.ndarray, np.ndarray] | None = None,
          rows_per_tile: int = ROWS_PER_TILE, columns_per_tile: int = COLUMNS_PER_TILE
          ) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` item rows for every query row.

    ``exclude`` is ``(query_rows, item_rows)``: pairs that may never be returned (seen items, the query
    item itself). Returns ``(columns, scores)`` of shape (queries, k), best first; a query with fewer than
    k allowed items is padded with column -1 and score -inf.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    items = np.ascontiguousarray(items, dtype=np.float32)
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"top_k: queries {queries.shape} and items {items.shape} must be 2-D with one dimension")
    if k < 1:
        raise ValueError(f"top_k: k must be positive, got {k}")
    n = len(queries)
    kept = min(k + SLACK, max(len(items), 1))
    columns = np.full((n, kept), -1, dtype=np.int64)
    scores = np.full((n, kept), -np.inf, dtype=np.float32)
    if n == 0 or len(items) == 0:
        return columns[:, :k], scores[:, :k]
    ex_rows, ex_cols = (np.asarray(e, dtype=np.int64) for e in exclude) if exclude is not None else (
        np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    order = np.lexsort((ex_cols, ex_rows))
    starts = np.searchsorted(ex_rows[order], np.arange(n + 1))  # row r's excluded columns: starts[r]:starts[r + 1]
    ex_cols = ex_cols[order]
    items_t = items.T
    tile = np.empty((min(rows_per_tile, n), min(columns_per_tile, len(items))), dtype=np.float32)
    with threadpool_limits(limits=1, user_api="blas"):  # a tile is too small to share: threads only wait
        for r0 in range(0, n, rows_per_tile):
            r1 = min(r0 + rows_per_tile, n)
            for c0 in range(0, len(items), columns_per_tile):
                c1 = min(c0 + columns_per_tile, len(items))
                out = tile[:r1 - r0] if c1 - c0 == tile.shape[1] else np.empty((r1 - r0, c1 - c0), np.float32)
                block = np.matmul(queries[r0:r1], items_t[:, c0:c1], out=out)  # C-contiguous: a faster scan
                _scan(block, r0, c0, starts, ex_cols, scores, columns)
    return _rescore(queries, items, k, columns, scores, starts, ex_cols)


@njit(cache=True, nogil=True)
def _rescore(queries: np.ndarray, items: np.ndarray, k: int, columns: np.ndarray, scores: np.ndarray,
             starts: np.ndarray, ex_cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The best k of each row's kept candidates by their float64 scores (then column), as float32. Any item
    the scan did not keep scored at most the row's last kept float32 score, so it is off by at most the
    float32 error bound from that; a row whose k-th float64 score is not clear of it is scored in full."""
    n, kept = columns.shape
    dim = queries.shape[1]
    widest = 0.0
    for c in range(items.shape[0]):
        widest = max(widest, _norm(items[c]))
    bound = 2.0 * dim * 2.0 ** -23 * widest  # |float32 dot - exact| <= dim * 2**-24 * |q| |x|, doubled
    out_columns = np.full((n, k), -1, dtype=np.int64)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    exact = np.empty(kept, dtype=np.float64)
    cols = np.empty(kept, dtype=np.int64)
    for r in range(n):
        m = 0
        while m < kept and columns[r, m] >= 0:
            cols[m] = columns[r, m]
            exact[m] = _dot(queries[r], items[cols[m]])
            m += 1
        _order(exact, cols, m)
        if m == kept < items.shape[0] and exact[k - 1] <= scores[r, kept - 1] + bound * _norm(queries[r]):
            m = _score_row(queries[r], items, starts[r], starts[r + 1], ex_cols, exact, cols)
        for j in range(min(k, m)):
            out_columns[r, j], out_scores[r, j] = cols[j], np.float32(exact[j])
    return out_columns, out_scores


@njit(cache=True, nogil=True)
def _score_row(query: np.ndarray, items: np.ndarray, lo: int, hi: int, ex_cols: np.ndarray, exact: np.ndarray,
               cols: np.ndarray) -> int:  # pragma: no cover - compiled
    """Fill ``exact``/``cols`` with the row's best ``len(exact)`` allowed items by float64 score, every
    item scored (the rare row of near-ties); returns how many."""
    kept = exact.shape[0]
    m = 0
    e = lo
    for c in range(items.shape[0]):
        while e < hi and ex_cols[e] < c:
            e += 1
        if e < hi and ex_cols[e] == c:
            continue
        v = _dot(query, items[c])
        if m < kept:
            m += 1
        elif not v > exact[kept - 1]:
            continue
        _insert(exact, cols, m - 1, v, c)
    return m


@njit(inline="always")
def _insert(values: np.ndarray, cols: np.ndarray, p: int, v: float, c: int) -> None:  # pragma: no cover - compiled
    """Put (v, c) in slot p or, shifting down the entries it beats, above it; an equal value stays ahead."""
    while p > 0 and values[p - 1] < v:
        values[p], cols[p] = values[p - 1], cols[p - 1]
        p -= 1
    values[p], cols[p] = v, c


@njit(cache=True, nogil=True)
def _order(exact: np.ndarray, cols: np.ndarray, m: int) -> None:  # pragma: no cover - compiled
    """Sort the first m candidates by score descending, then column ascending (insertion sort: m is small)."""
    for i in range(1, m):
        v, c = exact[i], cols[i]
        p = i
        while p > 0 and (exact[p - 1] < v or (exact[p - 1] == v and cols[p - 1] > c)):
            exact[p], cols[p] = exact[p - 1], cols[p - 1]
            p -= 1
        exact[p], cols[p] = v, c


@njit(cache=True, nogil=True)
def _dot(a: np.ndarray, b: np.ndarray) -> float:  # pragma: no cover - compiled
    """float64 dot product in index order: the same result on every machine."""
    s = 0.0
    for d in range(a.shape[0]):
        s += np.float64(a[d]) * np.float64(b[d])
    return s


@njit(cache=True, nogil=True)
def _norm(a: np.ndarray) -> float:  # pragma: no cover - compiled
    return np.sqrt(_dot(a, a))


@njit(cache=True, nogil=True)
def _scan(block: np.ndarray, r0: int, c0: int, starts: np.ndarray, ex_cols: np.ndarray, scores: np.ndarray,
          columns: np.ndarray) -> None:  # pragma: no cover - compiled
    """Fold the tile's scores (rows r0.., columns c0..) into each row's best k, kept ordered. A row is
    checked ``CHUNK`` scores at a time against its k-th, and only a chunk holding a score that beats it is
    walked one score at a time: after the first few tiles almost no chunk does."""
    k = scores.shape[1]
    width = block.shape[1]
    for i in range(block.shape[0]):
        r = r0 + i
        best, cols = scores[r], columns[r]
        kth = best[k - 1]
        lo, hi = starts[r], starts[r + 1]
        for j0 in range(0, width, CHUNK):
            j1 = min(j0 + CHUNK, width)
            if not _beaten(block, i, j0, j1, kth):
                continue
            for j in range(j0, j1):
                v = block[i, j]
                if v > kth:  # -inf never enters, and an equal score never displaces an earlier column
                    c = c0 + j
                    a, b = lo, hi  # is (r, c) excluded? binary search of the row's sorted excluded columns
                    while a < b:
                        m = (a + b) // 2
                        if ex_cols[m] < c:
                            a = m + 1
                        else:
                            b = m
                    if a < hi and ex_cols[a] == c:
                        continue
                    _insert(best, cols, k - 1, v, c)
                    kth = best[k - 1]


@njit(inline="always")
def _beaten(block: np.ndarray, i: int, j0: int, j1: int, kth: float) -> bool:  # pragma: no cover - compiled
    """Whether any of row i's scores j0..j1-1 beats kth, as a count the compiler vectorises (16 scores an
    instruction). The indices are unsigned: a signed index makes numba wrap negative values around, and
    that check keeps the loop scalar (six times slower)."""
    above = 0
    for j in range(np.uint64(j0), np.uint64(j1)):
        above += block[i, j] > kth
    return above > 0


@njit(cache=True, nogil=True, fastmath=True)
def contributions(queries: np.ndarray, parts: np.ndarray, has: np.ndarray,
                  columns: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """``out[b, j, m]`` = <query b, part m of item ``columns[b, j]``>: what each modality adds to the
    score; NaN where the item lacks the modality or the slot is empty (column -1). Summed in any order
    (vectorised): a contribution is an explanation, and the parts' sum matches the score to float
    tolerance either way."""
    n, k = columns.shape
    out = np.full((n, k, parts.shape[0]), np.nan, dtype=np.float32)
    for b in range(n):
        for j in range(k):
            c = columns[b, j]
            if c < 0:
                continue
            for m in range(parts.shape[0]):
                if has[c, m]:
                    s = np.float32(0.0)
                    for d in range(queries.shape[1]):
                        s += queries[b, d] * parts[m, c, d]
                    out[b, j, m] = s
    return out


def compile_kernels() -> None:
    """Compile the kernels (or load them from numba's cache) on a tiny input, before any data is held: the
    compiler's memory stays with the process, and taken in the middle of a first task it lands on top of
    that task's data."""
    one = np.ones((1, 1), dtype=np.float32)
    columns, _ = top_k(one, one, 1, (np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64)))
    contributions(one, one[None], np.ones((1, 1), dtype=bool), columns)
    ids = utf8(["a"])
    HashIndex(ids, mixed_hash(ids)).find(ids, mixed_hash(ids))


def utf8(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Ids as UTF-8 bytes (numpy ``S``): a quarter of the size of numpy's 4-byte characters, which matters
    for the millions of ids that cross a runner, and ordered as the ids are (UTF-8 keeps code-point order)."""
    try:
        return np.asarray(ids, dtype=bytes)  # ASCII ids, the usual case, in one pass
    except UnicodeEncodeError:
        return np.strings.encode(np.asarray(ids, dtype=str), "utf-8")


def text(ids: np.ndarray) -> np.ndarray:
    """``utf8`` undone."""
    try:
        return ids.astype(str)
    except UnicodeDecodeError:
        return np.strings.decode(ids, "utf-8")


def id_hash(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """64-bit FNV-1a of each id's UTF-8 bytes. Unlike ``hash()`` it is the same in every process and run, so
    an id lands in the same bucket wherever it is read."""
    raw = np.ascontiguousarray(utf8(ids))
    h = np.full(len(raw), 0xCBF29CE484222325, dtype=np.uint64)
    if len(raw) == 0 or raw.dtype.itemsize == 0:
        return h
    _fnv1a(raw.view(np.uint8).reshape(len(raw), -1), np.strings.str_len(raw), h)
    return h


@njit(cache=True, nogil=True)
def _fnv1a(codes: np.ndarray, lengths: np.ndarray, h: np.ndarray) -> None:  # pragma: no cover - compiled
    """Fold each row's first ``lengths`` bytes into its hash (compiled: a task hashes the ids of every
    exclusion it reads, millions in a large job)."""
    prime = np.uint64(0x100000001B3)
    for i in range(codes.shape[0]):
        x = h[i]
        for j in range(lengths[i]):
            x = (x ^ np.uint64(codes[i, j])) * prime
        h[i] = x


def mixed_hash(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """``id_hash`` scrambled by the MurmurHash3 finaliser: FNV's high bits barely depend on an id's last
    characters, and ``bucket`` takes the high bits."""
    h = id_hash(ids)
    for factor in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h = (h ^ (h >> np.uint64(33))) * np.uint64(factor)
    return h ^ (h >> np.uint64(33))


def bucket(hashes: np.ndarray, n: int) -> np.ndarray:
    """Each mixed hash's bucket in ``range(n)``, by its high bits: consecutive buckets are consecutive hash
    ranges, so ``bucket * m // n`` groups them into m near-equal ranges."""
    return ((hashes >> np.uint64(32)) * np.uint64(n) >> np.uint64(32)).astype(np.int64)


def locate(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``ids`` in ``sorted_ids`` (a sorted array of the same kind, str or ``utf8``): ``(found, rows)``,
    rows valid where found."""
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), dtype=bool), np.zeros(len(ids), dtype=np.int64)
    rows = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[rows] == ids, rows


class HashIndex:
    """Rows of sorted ids, looked up by their mixed hashes in an open-addressing table: a task looks up
    every exclusion of every batch it reads (millions in a large job), and a probe costs a few cache
    misses where a binary search costs twenty. Ids are compared after the hash matches, and the rare id
    whose hash another id shares is looked up by string (``locate``), so the answer is exact."""

    def __init__(self, ids: np.ndarray, hashes: np.ndarray):
        self.ids = ids
        self.bits = max(1, 2 * len(ids) - 1).bit_length()  # at most half full
        self.table = _hash_table(hashes, self.bits)
        self.hashes = hashes

    def find(self, wanted: np.ndarray, wanted_hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``locate``, by hash: ``(found, rows)``, rows valid where found."""
        rows = _probe(self.table, self.hashes, self.bits, wanted_hashes)
        hit = rows >= 0
        rows = np.maximum(rows, 0)
        found = hit & (self.ids[rows] == wanted) if len(self.ids) else hit
        shared = hit & ~found
        if shared.any():
            found[shared], rows[shared] = locate(self.ids, wanted[shared])
        return found, rows


@njit(cache=True, nogil=True)
def _hash_table(hashes: np.ndarray, bits: int) -> np.ndarray:  # pragma: no cover - compiled
    """Slots of 2**bits holding a row (or -1), each row at the first free slot from its hash's low bits (a
    shard's ids share their high bits, which pick its buckets)."""
    table = np.full(1 << bits, -1, dtype=np.int64)
    mask = (1 << bits) - 1
    for row in range(hashes.shape[0]):
        slot = np.int64(hashes[row] & np.uint64(mask))
        while table[slot] >= 0:
            slot = (slot + 1) & mask
        table[slot] = row
    return table


@njit(cache=True, nogil=True)
def _probe(table: np.ndarray, hashes: np.ndarray, bits: int,
           wanted_hashes: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """The first row whose hash equals each wanted hash, or -1."""
    out = np.full(wanted_hashes.shape[0], -1, dtype=np.int64)
    mask = (1 << bits) - 1
    for i in range(wanted_hashes.shape[0]):
        h = wanted_hashes[i]
        slot = np.int64(h & np.uint64(mask))
        while table[slot] >= 0:
            if hashes[table[slot]] == h:
                out[i] = table[slot]
                break
            slot = (slot + 1) & mask
    return out
