"""User vectors from interactions: a weighted sum of the fused vectors of the items each user interacted with.

Each interaction weighs ``event weight x rating (optional) x 0.5 ** (age / half-life) (optional)``, over the
user's last N interactions; the age is counted from the user's newest interaction, which gives the same
relative weights as counting from the run date. The sum is L2-normalised: scores are inner products, so
only its direction matters. A user with no usable history (no interaction on an item that has a vector, or
weights that cancel out) gets no vector and is flagged for the popularity fallback.

Each user also keeps ``history``: the ``HISTORY`` items of largest weight, each weight divided by the sum's
norm, so that the user vector is exactly ``sum(weight x item vector)`` over the whole history and a score
splits exactly by history item (``models.ranking.because``). Memory: one user's events at a time.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import apache_beam as beam
import numpy as np

HISTORY = 50  # history items kept per user to explain scores by (the largest weights)


@dataclasses.dataclass(frozen=True)
class Weighting:
    event_weights: dict = dataclasses.field(default_factory=dict)  # event -> weight; others weigh default_event
    default_event: float = 1.0
    use_rating: bool = True        # multiply by the interaction's ``weight`` (e.g. the rating) when present
    half_life_s: float = 0.0       # recency half-life in seconds; 0: no decay
    last_n: int = 0                # only each user's newest N interactions; 0: all

    def weights(self, events: list[dict]) -> list[tuple[str, float]]:
        """``(item_id, weight)`` of a user's interactions that count, newest last."""
        events = sorted(events, key=lambda e: (e["timestamp"], e["item_id"]))
        if self.last_n:
            events = events[-self.last_n:]
        newest = events[-1]["timestamp"] if events else 0
        out = []
        for e in events:
            w = self.event_weights.get(e["event"], self.default_event)
            if self.use_rating and e["weight"] is not None:
                w *= e["weight"]
            if self.half_life_s:
                w *= 0.5 ** ((newest - e["timestamp"]) / self.half_life_s)
            out.append((e["item_id"], w))
        return out


class UserVectors(beam.PTransform):
    """``{"interactions": interaction dicts, "items": item dicts} | UserVectors(weighting)`` yields one dict
    per user: ``user_id``, ``vector`` (unit float32 array, or None), ``n_interactions`` (how many went into
    the vector), ``fallback`` (True when there is no vector) and ``seen`` (every item id the user
    interacted with, sorted: these are never recommended to them)."""

    def __init__(self, weighting: Weighting):
        super().__init__()
        self._weighting = weighting

    def expand(self, inputs: dict[str, beam.PCollection]) -> beam.PCollection:
        weighting = self._weighting
        histories = (inputs["interactions"]
                     | "ByUser" >> beam.Map(lambda e: (e["user_id"], e))
                     | "Histories" >> beam.GroupByKey())
        weighted = (histories
                    | "Weigh" >> beam.FlatMap(lambda h: ((item, (h[0], w)) for item, w in weighting.weights(h[1])))
                    | "WeightsByItem" >> beam.GroupByKey())
        vectors = inputs["items"] | "ItemVectors" >> beam.Map(lambda item: (item["item_id"], item["vector"]))
        sums = ({"vector": vectors, "weights": weighted}
                | "JoinItems" >> beam.CoGroupByKey()
                | "Scale" >> beam.FlatMap(_scaled)
                | "SumPerUser" >> beam.CombinePerKey(_WeightedSum()))
        seen = histories | "Seen" >> beam.MapTuple(lambda user, events: (user, sorted({e["item_id"] for e in events})))
        history = histories | "History" >> beam.MapTuple(lambda user, events: (user, _largest(
            weighting.weights(events))))
        return ({"seen": seen, "sum": sums, "history": history}
                | "JoinSums" >> beam.CoGroupByKey()
                | "User" >> beam.MapTuple(_user))


def _scaled(joined: tuple[str, dict]) -> Iterator[tuple[str, tuple[np.ndarray, int]]]:
    """``(user, (weight x item vector, 1))`` for each weighted interaction on an item that has a vector."""
    _, grouped = joined
    for vector in grouped["vector"]:  # at most one: item ids are unique
        vector = np.asarray(vector, dtype=np.float32)
        for weights in grouped["weights"]:
            for user, w in weights:
                yield user, (np.float32(w) * vector, 1)


class _WeightedSum(beam.CombineFn):
    """Sum of weighted vectors and the number of interactions in it; the accumulator is one vector."""

    def create_accumulator(self) -> tuple[None, int]:
        return None, 0

    def add_input(self, accumulator: tuple[np.ndarray | None, int],
                  element: tuple[np.ndarray, int]) -> tuple[np.ndarray | None, int]:
        return self.merge_accumulators([accumulator, element])

    def merge_accumulators(self, accumulators: Iterable[tuple[np.ndarray | None, int]]
                           ) -> tuple[np.ndarray | None, int]:
        total, n = None, 0
        for vector, count in accumulators:
            if vector is not None:
                total = vector.astype(np.float64) if total is None else total + vector
                n += count
        return total, n

    def extract_output(self, accumulator: tuple[np.ndarray | None, int]) -> tuple[np.ndarray | None, int]:
        return accumulator


def _largest(weights: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The ``HISTORY`` items of largest summed weight (ties: item id)."""
    summed: dict[str, float] = {}
    for item, w in weights:
        summed[item] = summed.get(item, 0.0) + w
    return sorted(summed.items(), key=lambda iw: (-abs(iw[1]), iw[0]))[:HISTORY]


def _user(user: str, joined: dict) -> dict:
    [seen], [history] = joined["seen"], joined["history"]
    total, n = (joined["sum"] or [(None, 0)])[0]
    norm = float(np.linalg.norm(total)) if total is not None else 0.0
    usable = norm > 1e-12 and np.isfinite(norm)
    return {"user_id": user, "vector": (total / norm).astype(np.float32) if usable else None,
            "n_interactions": n if usable else 0, "fallback": not usable, "seen": seen,
            "history": [(item, w / norm) for item, w in history] if usable else []}


class RecentPopular(beam.PTransform):
    """The fallback for users without a vector: the ``n`` items with the most interactions in the last
    ``window_s`` seconds before the newest interaction, as one list of ``(item_id, share of those
    interactions)``, most popular first (ties by item id). Only items in ``allowed`` (ids) can be listed."""

    def __init__(self, window_s: float, n: int):
        super().__init__()
        self._window, self._n = window_s, n

    def expand(self, inputs: dict[str, beam.PCollection]) -> beam.PCollection:
        window, n = self._window, self._n
        interactions = inputs["interactions"]
        newest = beam.pvalue.AsSingleton(interactions
                                         | "Times" >> beam.Map(lambda e: e["timestamp"])
                                         | "Newest" >> beam.CombineGlobally(max).without_defaults())
        recent = (interactions
                  | "Recent" >> beam.Filter(lambda e, t: e["timestamp"] > t - window, newest)
                  | "Ids" >> beam.Map(lambda e: (e["item_id"], 1)))
        allowed = inputs["allowed"] | "Allowed" >> beam.Map(lambda i: (i, 0))
        counts = ({"recent": recent, "allowed": allowed}
                  | "Join" >> beam.CoGroupByKey()
                  | "Count" >> beam.FlatMap(lambda j: [(j[0], len(j[1]["recent"]))]
                                            if j[1]["allowed"] and j[1]["recent"] else []))
        return (counts
                | "Top" >> beam.combiners.Top.Of(n, key=lambda c: (c[1], _descending(c[0])))
                | "Shares" >> beam.Map(_shares))


def _descending(text: str) -> tuple:
    """A key that orders strings in reverse, so ``Top`` (largest first) breaks count ties by id ascending."""
    return tuple(-ord(c) for c in text) + (1,)


def _shares(top: list) -> list[tuple[str, float]]:
    total = sum(c for _, c in top) or 1
    return [(item, c / total) for item, c in top]
