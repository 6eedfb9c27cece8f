"""Exact top-k by inner product over one block of queries x items, with exclusions and deterministic ties.

At 64 dimensions a score costs about as much to select as to compute, so the selection never sorts or
partitions whole score rows. The columns of a block are dealt into ``G`` strided groups and each row keeps
only its group maxima (one vectorised pass); the k-th largest group maximum ``t`` is a lower bound of the
row's k-th best score, because k distinct groups each hold a score >= t. Every score >= t therefore lies in
one of the (about k) groups whose maximum is >= t, and only those few groups are gathered and compared with
``t``. The survivors, usually little more than k per row, are ordered exactly: score descending, then
column ascending. Callers order the item rows by item id, so column order is item-id order.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

ROWS_PER_BLOCK = 256  # queries scored at once: a 256 x 16384 float32 block is 16 MiB


def top_k(queries: np.ndarray, items: np.ndarray, k: int,
          exclude: tuple[np.ndarray, np.ndarray] | None = None,
          rows_per_block: int = ROWS_PER_BLOCK) -> tuple[np.ndarray, np.ndarray]:
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
    columns = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0 or len(items) == 0:
        return columns, scores
    ex_rows, ex_cols = (np.asarray(e, dtype=np.int64) for e in exclude) if exclude is not None else (None, None)
    if ex_rows is not None:
        order = np.argsort(ex_rows, kind="stable")
        ex_rows, ex_cols = ex_rows[order], ex_cols[order]
    items_t = items.T
    for start in range(0, n, rows_per_block):
        stop = min(start + rows_per_block, n)
        block = queries[start:stop] @ items_t
        if ex_rows is not None:
            lo, hi = np.searchsorted(ex_rows, [start, stop])
            block[ex_rows[lo:hi] - start, ex_cols[lo:hi]] = -np.inf
        rows, cols, vals = _select(block, k)
        rank = _ranks(rows)
        columns[start + rows, rank] = cols
        scores[start + rows, rank] = vals
    return columns, scores


def _select(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's best k entries as flat ``(row, column, score)``, sorted by row, score desc, column asc."""
    n, s = block.shape
    groups = _groups(s, k)
    if groups is None:
        rows, cols = np.nonzero(block > -np.inf)
        return _best(rows, cols, block[rows, cols], k)
    depth = s // groups  # full strided rows; the remaining tail columns are their own groups of one
    strided = as_strided(block, shape=(n, depth, groups), strides=(block.strides[0], groups * 4, 4))
    tail = block[:, depth * groups:]
    maxima = np.concatenate([strided.max(axis=1), tail], axis=1)
    kth = np.partition(maxima, maxima.shape[1] - k, axis=1)[:, maxima.shape[1] - k]
    # A row with fewer than k allowed items has kth == -inf; its -inf entries are dropped below.
    hit_rows, hit_groups = np.nonzero(maxima >= kth[:, None])
    in_tail = hit_groups >= groups
    g_rows, g = hit_rows[~in_tail], hit_groups[~in_tail]
    cols = g[:, None] + groups * np.arange(depth)
    vals = np.take(block.reshape(-1), (g_rows * s)[:, None] + cols)
    keep = (vals >= kth[g_rows, None]) & (vals > -np.inf)
    t_rows, t_cols = hit_rows[in_tail], hit_groups[in_tail] - groups + depth * groups
    t_vals = block[t_rows, t_cols]
    t_keep = t_vals > -np.inf
    rows = np.concatenate([np.broadcast_to(g_rows[:, None], cols.shape)[keep], t_rows[t_keep]])
    return _best(rows, np.concatenate([cols[keep], t_cols[t_keep]]),
                 np.concatenate([vals[keep], t_vals[t_keep]]), k)


def _groups(columns: int, k: int) -> int | None:
    """How many strided groups a row of ``columns`` scores is dealt into; None when a row is small enough
    to order whole. Many groups make the k-th group maximum a tight bound (few survivors); few groups make
    finding it cheap. A group count of about sqrt(columns * k) balances the two."""
    if columns <= 8 * k or columns < 1024:
        return None
    return int(min(columns // 4, max(4 * k, 2 ** round(np.log2(np.sqrt(columns * k))))))


def _best(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, k: int):
    """The first k of each row after ordering by (row, score desc, column asc)."""
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    keep = _ranks(rows) < k
    return rows[keep], cols[keep], vals[keep]


def _ranks(rows: np.ndarray) -> np.ndarray:
    """Position of each entry within its run of equal (sorted) row numbers."""
    if len(rows) == 0:
        return rows
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    return np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))


def id_hash(ids) -> np.ndarray:
    """64-bit FNV-1a of each id's UTF-8 bytes, vectorised over ids. Unlike ``hash()`` it is the same in every
    process and run, so items land in the same shard and users in the same batch wherever they are placed."""
    raw = np.array([i.encode() for i in ids], dtype=bytes)
    h = np.full(len(raw), 0xCBF29CE484222325, dtype=np.uint64)
    if len(raw) == 0 or raw.dtype.itemsize == 0:
        return h
    octets = raw.view(np.uint8).reshape(len(raw), raw.dtype.itemsize)
    lengths = np.char.str_len(raw)
    for j in range(octets.shape[1]):
        h = np.where(j < lengths, (h ^ octets[:, j]) * np.uint64(0x100000001B3), h)
    return h


def locate(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``ids`` in ``sorted_ids`` (a sorted string array): ``(found, rows)``, rows valid where found."""
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), dtype=bool), np.zeros(len(ids), dtype=np.int64)
    rows = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[rows] == ids, rows
