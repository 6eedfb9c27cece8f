"""The bounded sample a fit trains on, chosen by Beam combiners: what one worker holds is set by the caps.

``NewestEvents`` keeps the newest ``n`` interactions: an approximate quantile of the timestamps (Beam's
``ApproximateQuantiles``, about 1,000 numbers whatever the input) drops everything clearly older, so only
about ``n`` events reach ``Top.Largest``, whose merge holds at most twice that. ``FitItems`` keeps the items
those events touch, most touched first, plus a seeded sample of the rest of the catalog (their content
enters the fit's z-score statistics), ``n`` in all. Both are reproducible: ties break on ids, samples on a
hash of (seed, id).
"""
from __future__ import annotations

import collections
import hashlib

import apache_beam as beam

QUANTILES = 1001  # rank error about 0.1% of the events


def seeded_fraction(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (seed, key): a sample that is the same on every worker and every run."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def _cutoff(quantiles: list, total: int, n: int):
    """The newest timestamp such that at least ``n`` events are at or after it (None: keep everything)."""
    if total <= n or not quantiles:
        return None
    step = int((1.0 - n / total) * (len(quantiles) - 1))  # rounded down: keeps a little more than n
    return quantiles[max(step - 2, 0)]  # two quantiles back: more than the combiner's rank error (1 / QUANTILES)


class NewestEvents(beam.PTransform):
    """(timestamp, user_id, item_id) tuples -> one list of the newest ``n`` (ties: larger ids first)."""

    def __init__(self, n: int):
        super().__init__()
        self._n = n

    def expand(self, events: beam.PCollection) -> beam.PCollection:
        stamps = events | "Stamps" >> beam.Map(lambda e: e[0])
        total = stamps | "CountEvents" >> beam.combiners.Count.Globally()
        quantiles = stamps | "StampQuantiles" >> beam.ApproximateQuantiles.Globally(QUANTILES)
        cutoff = (quantiles | "Cutoff" >> beam.Map(
            lambda q, total, n: _cutoff(q, total, n), beam.pvalue.AsSingleton(total), self._n))
        return (events
                | "Recent" >> beam.Filter(lambda e, c: c is None or e[0] >= c, beam.pvalue.AsSingleton(cutoff))
                | "Newest" >> beam.combiners.Top.Largest(self._n))


def _chosen_ids(events: list, n: int) -> dict[str, int]:
    """The ``n`` items the events touch most (ties by id), with their rank."""
    counts = collections.Counter(e[2] for e in events)
    ranked = sorted(counts, key=lambda item: (-counts[item], item))[:n]
    return {item: rank for rank, item in enumerate(ranked)}


class FitItems(beam.PTransform):
    """Catalog rows -> one list of at most ``n`` rows: those the sampled ``events`` touch most, then a seeded
    sample of the others (each kept with probability (n - touched) / (catalog size - touched), then the first
    by hash)."""

    def __init__(self, events: beam.PCollection, n: int, seed: int):
        super().__init__()
        self._events, self._n, self._seed = events, n, seed

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        n, seed = self._n, self._seed
        chosen = self._events | "Touched" >> beam.Map(_chosen_ids, n)
        size = rows | "CountItems" >> beam.combiners.Count.Globally()

        def keep(row: dict, chosen: dict[str, int], size: int) -> bool:
            if row["item_id"] in chosen:
                return True
            return seeded_fraction(seed, row["item_id"]) < (n - len(chosen)) / max(size - len(chosen), 1)

        def rank(row: dict, chosen: dict[str, int]) -> tuple[int, float, str]:
            # touched items by how often, then the sampled ones by hash
            item = row["item_id"]
            return (0, chosen[item], "") if item in chosen else (1, seeded_fraction(seed, item), item)

        return (rows
                | "InSample" >> beam.Filter(keep, beam.pvalue.AsSingleton(chosen), beam.pvalue.AsSingleton(size))
                | "Ranked" >> beam.Map(lambda row, chosen: (rank(row, chosen), row), beam.pvalue.AsSingleton(chosen))
                | "First" >> beam.combiners.Top.Smallest(n, key=lambda pair: pair[0])
                | "Rows" >> beam.Map(lambda pairs: [row for _, row in pairs]))
