"""A cf vector for every item with interactions that the fitted cf table does not hold, at any scale.

The fit computes cf vectors for its bounded sample only (``models.collaborative``). Every other item with
interactions is folded in by the same regression: each user's sum of the table's anchor vectors is made where
that user's interactions are grouped, each item's sum of its users' vectors is combined per item, and the
fit's solver turns that sum into the item's vector. Two shuffles of the interactions; a worker holds one
user's items, a d-vector per item key being combined, and the table (bounded by the fit's caps). The sums are
of fixed-point integers (``SCALE``), whose addition does not depend on the order a runner combines them in,
so the same inputs give the same vectors bit for bit.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import apache_beam as beam
import numpy as np

from mmfuse.models.collaborative import fold_in

SCALE = 2.0 ** 32  # fixed point of the summed vectors: 2e-10 resolution, |sums| up to 2e9 in an int64


class _Table:
    """The table of an artifact folder, loaded once per DoFn instance (the folder is a side input)."""

    def __init__(self, load: Callable[[str], object]):
        self._load, self._folder, self._table = load, None, None

    def get(self, folder: str):
        if folder != self._folder:
            self._folder, self._table = folder, self._load(folder)
        return self._table


class _WithTable(beam.DoFn):
    def __init__(self, load: Callable[[str], object]):
        self._load = load

    def setup(self):
        self._tables = _Table(self._load)


class _UserVectors(_WithTable):
    """(user, items) -> (item, the user's summed anchor vectors) for each of the user's items not in the table."""

    def process(self, element: tuple[str, Iterable[str]], folder: str) -> Iterator[tuple[str, np.ndarray]]:
        table = self._tables.get(folder)
        if table is None:
            return
        items = sorted(set(element[1]))
        rows = table.rows(items)
        anchors = rows[rows >= 0][table.anchor[rows[rows >= 0]]]
        if not len(anchors) or (rows >= 0).all():
            return
        user = np.rint(table.vectors[anchors].sum(0, dtype=np.float64) * SCALE).astype(np.int64)
        for item, row in zip(items, rows):
            if row < 0:
                yield item, user


class _Fold(_WithTable):
    """(item, sum of its users' vectors) -> (item, its cf vector)."""

    def process(self, element: tuple[str, np.ndarray], folder: str) -> Iterator[tuple[str, np.ndarray]]:
        item, total = element
        yield item, fold_in(self._tables.get(folder).solver, total[None, :] / SCALE)[0]


class _VectorSum(beam.CombineFn):
    """Elementwise sum of integer vectors, in place in the accumulator (exact: any order gives the same sum)."""

    def create_accumulator(self) -> None:
        return None

    def add_input(self, total: np.ndarray | None, vector: np.ndarray) -> np.ndarray:
        return vector.copy() if total is None else np.add(total, vector, out=total)

    def merge_accumulators(self, totals: Iterable[np.ndarray | None]) -> np.ndarray | None:
        out = None
        for total in totals:
            out = self.add_input(out, total) if total is not None else out
        return out

    def extract_output(self, total: np.ndarray | None) -> np.ndarray | None:
        return total


class FoldIn(beam.PTransform):
    """(user_id, item_id) pairs -> (item_id, cf vector) for items with interactions outside the fitted table.

    ``folder``: singleton PCollection of the artifact folder; ``load(folder)`` returns its
    ``models.collaborative.CfTable`` (None: nothing to fold in). Repeated pairs count once, as in the fit."""

    def __init__(self, folder: beam.PCollection, load: Callable[[str], object]):
        super().__init__()
        self._folder, self._load = folder, load

    def expand(self, pairs: beam.PCollection) -> beam.PCollection:
        folder = beam.pvalue.AsSingleton(self._folder)
        return (pairs
                | "ByUser" >> beam.GroupByKey()
                | "UserVectors" >> beam.ParDo(_UserVectors(self._load), folder)
                | "ItemSums" >> beam.CombinePerKey(_VectorSum())
                | "Fold" >> beam.ParDo(_Fold(self._load), folder))
