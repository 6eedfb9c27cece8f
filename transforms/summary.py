"""A night's summary figures, for ``metrics.json`` and the report, each made by a combiner whose state is
bounded whatever the catalogue: fixed-bin histograms, histograms of counts (as many entries as distinct
counts), sums, and a handful of sample users. Nothing gathers the outputs.

Every figure is a ``(SECTION, name, key, value)`` tuple, as counts are (``transforms.counting``), so the
commit step nests them into ``metrics.json`` with the counts.
"""
from __future__ import annotations

import base64
import hashlib
from typing import Callable, Iterable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

SECTION = "summary"
HEAD_SHARE = 0.2  # the most-interacted fifth of the catalogue is its head; every other item is the long tail


class _Bins(beam.CombineFn):
    """Counts of values in ``bins`` equal bins over [lo, hi] (values outside go to the end bins)."""

    def __init__(self, lo: float, hi: float, bins: int):
        self._lo, self._hi, self._bins = lo, hi, bins

    def create_accumulator(self) -> np.ndarray:
        return np.zeros(self._bins, np.int64)

    def add_input(self, acc: np.ndarray, value: float) -> np.ndarray:
        position = (value - self._lo) / (self._hi - self._lo) * self._bins
        acc[min(self._bins - 1, max(0, int(np.floor(position))))] += 1
        return acc

    def merge_accumulators(self, accs: Iterable[np.ndarray]) -> np.ndarray:
        return np.sum(list(accs), axis=0)

    def extract_output(self, acc: np.ndarray) -> dict:
        return {"edges": np.linspace(self._lo, self._hi, self._bins + 1).round(6).tolist(), "counts": acc.tolist()}


class Histograms(beam.PTransform):
    """``values(record)`` -> ``(key, value)`` pairs; one histogram per key, as ``(SECTION, name, key, {edges,
    counts})``. Each value also updates the Beam distribution ``mmfuse/summary.<name>.<key>.milli`` (Beam's
    distributions hold integers: thousandths), which the runner's monitoring (Dataflow's) shows live."""

    def __init__(self, name: str, values: Callable, lo: float, hi: float, bins: int = 20):
        super().__init__()
        self._name, self._values, self._bins = name, values, (lo, hi, bins)

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        name = self._name
        return (pcoll
                | "Values" >> beam.FlatMap(self._values)
                | "Distributions" >> beam.ParDo(_Distributions(name))
                | "Bins" >> beam.CombinePerKey(_Bins(*self._bins))
                | "Figure" >> beam.Map(lambda kv: (SECTION, name, kv[0], kv[1])))


class _Distributions(beam.DoFn):
    """Passes ``(key, value)`` on, recording the value in the key's Beam distribution."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    def setup(self) -> None:
        self._metrics: dict = {}

    def process(self, kv: tuple[str, float]) -> Iterator[tuple[str, float]]:
        metric = self._metrics.get(kv[0])
        if metric is None:
            metric = self._metrics[kv[0]] = Metrics.distribution("mmfuse", f"summary.{self._name}.{kv[0]}.milli")
        metric.update(int(round(kv[1] * 1000)))
        yield kv


def gini(histogram: dict[int, int]) -> float:
    """Gini coefficient of non-negative values given as ``{value: how many}`` (0: all equal, ->1: one has all)."""
    values = sorted(histogram)
    n = sum(histogram.values())
    total = sum(v * histogram[v] for v in values)
    if not n or not total:
        return 0.0
    ranked, start = 0.0, 0
    for v in values:  # sum over ascending ranks i (1-based) of i * x_i, a block of c equal values at a time
        c = histogram[v]
        ranked += v * (c * start + c * (c + 1) / 2)
        start += c
    return float(2 * ranked / (n * total) - (n + 1) / n)


def head_threshold(popularity: dict[int, int], share: float = HEAD_SHARE) -> int:
    """The smallest interaction count that puts an item in the head: the items at or above it are at most
    ``share`` of the catalogue (ties stay together, in the tail)."""
    n, above = sum(popularity.values()), 0
    threshold = max(popularity, default=0) + 1
    for value in sorted(popularity, reverse=True):
        if value == 0 or above + popularity[value] > share * n:
            break
        above += popularity[value]
        threshold = value
    return threshold


def _exposure_figures(_: None, exposure: list[tuple[int, int]], tail: tuple[int, int], threshold: int) -> list[tuple]:
    """Coverage, long-tail share and Gini from the histogram of exposure counts and the tail's slots."""
    histogram = dict(exposure)
    items, (tail_slots, slots) = sum(histogram.values()), tail
    return [(SECTION, "exposure", "catalogue_coverage", round(1 - histogram.get(0, 0) / items, 6) if items else 0.0),
            (SECTION, "exposure", "long_tail_share", round(tail_slots / slots, 6) if slots else 0.0),
            (SECTION, "exposure", "gini", round(gini(histogram), 6)),
            (SECTION, "exposure", "histogram", {str(k): v for k, v in sorted(histogram.items())}),
            (SECTION, "exposure", "head_threshold", threshold)]


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    pairs = list(pairs)
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


class Exposure(beam.PTransform):
    """``{"ranked": (query, Ranked), "items": fused items, "interactions": events}`` -> catalogue coverage
    (share of items recommended at least once), long-tail share (of recommendation slots going to items
    outside the most-interacted HEAD_SHARE of the catalogue), exposure Gini and the histogram of exposure
    counts. Holds per item one count in a shuffle, then histograms of counts."""

    def expand(self, inputs: dict) -> beam.PCollection:
        shown = (inputs["ranked"]
                 | "Shown" >> beam.FlatMap(lambda qr: [(str(i), 1) for i in qr[1].item_ids])
                 | "ShownPerItem" >> beam.CombinePerKey(sum))
        popular = (inputs["interactions"]
                   | "Touched" >> beam.Map(lambda e: (e["item_id"], 1))
                   | "TouchedPerItem" >> beam.CombinePerKey(sum))
        ids = inputs["items"] | "Ids" >> beam.Map(lambda i: (i["item_id"], None))
        per_item = ({"id": ids, "shown": shown, "popular": popular}
                    | "PerItem" >> beam.CoGroupByKey()
                    | "Catalogue" >> beam.FlatMap(
                        lambda kv: [(sum(kv[1]["shown"]), sum(kv[1]["popular"]))] if kv[1]["id"] else []))
        threshold = beam.pvalue.AsSingleton(
            per_item
            | "Popularity" >> beam.Map(lambda ep: (ep[1], 1))
            | "PopularityCounts" >> beam.CombinePerKey(sum)
            | "PopularityHistogram" >> beam.combiners.ToList()  # as many as distinct counts
            | "Threshold" >> beam.Map(lambda pairs: head_threshold(dict(pairs))))
        exposure = (per_item
                    | "Exposure" >> beam.Map(lambda ep: (ep[0], 1))
                    | "ExposureCounts" >> beam.CombinePerKey(sum)
                    | "ExposureHistogram" >> beam.combiners.ToList())  # as many as distinct counts
        tail = (per_item
                | "TailSlots" >> beam.Map(lambda ep, t: (ep[0] if ep[1] < t else 0, ep[0]), threshold)
                | "SumSlots" >> beam.CombineGlobally(_sum_pairs))
        return (per_item.pipeline
                | "Once" >> beam.Create([None])
                | "Figures" >> beam.FlatMap(_exposure_figures, beam.pvalue.AsSingleton(exposure),
                                            beam.pvalue.AsSingleton(tail), threshold))


CHURN_SCALE = 10**9  # churn per user in fixed point: integer sums are the same in any order


def _churn(element: tuple) -> list[tuple[int, int]]:
    _, grouped = element
    tonight, before = list(grouped["tonight"]), list(grouped["before"])
    if not tonight or not before:
        return []
    now = set(tonight[0])
    return [(round((1.0 - len(now & set(before)) / len(now)) * CHURN_SCALE), 1)]


def _churn_figures(acc: tuple[int, int]) -> list[tuple]:
    total, users = acc
    mean = round(total / CHURN_SCALE / users, 6) if users else None
    return [(SECTION, "churn", "users", users)] + ([(SECTION, "churn", "mean", mean)] if users else [])


class Churn(beam.PTransform):
    """``{"tonight": (user, Ranked), "before": (user, item) rows of the previous night}`` -> the mean share of
    a user's recommendations that are new tonight, over the users recommended both nights, and how many
    such users there are."""

    def expand(self, inputs: dict) -> beam.PCollection:
        tonight = inputs["tonight"] | "Tonight" >> beam.Map(lambda qr: (qr[0], [str(i) for i in qr[1].item_ids]))
        joined = {"tonight": tonight, "before": inputs["before"]} | "ByUser" >> beam.CoGroupByKey()
        return (joined
                | "Churn" >> beam.FlatMap(_churn)
                | "Sum" >> beam.CombineGlobally(_sum_pairs)
                | "Figures" >> beam.FlatMap(_churn_figures))


def _key(user_id: str) -> str:
    return hashlib.sha256(user_id.encode()).hexdigest()


def _sample(_: None, users: list, ranked: list, history: dict, titles: dict, thumbnails: dict) -> Iterable[tuple]:
    out = []
    for user in sorted(users, key=_key):
        r = next((r for q, r in ranked if q == user), None)
        if r is None:  # every item seen, or dead-lettered: no ranking to show
            continue
        seen = [item for _, item in sorted(history.get(user, []), reverse=True)]
        out.append({"user_id": user,
                    "history": [{"item_id": i, "title": titles.get(i, "")} for i in seen],
                    "recommendations": [
                        {"item_id": str(i), "title": titles.get(str(i), ""), "score": round(float(s), 6),
                         "contributions": {m: round(float(c), 6) for m, c in zip(r.modalities, cs) if c == c}}
                        for i, s, cs in zip(r.item_ids, r.scores, r.contributions)]})
    yield SECTION, "samples", "users", out
    yield SECTION, "samples", "thumbnails", dict(sorted(thumbnails.items()))


def _thumbnail(element: tuple[str, dict]) -> Iterator[tuple[str, str]]:
    """``(item_id, data: URI of a small JPEG)``; an image that does not decode gets none (the encode stage
    dead-letters it)."""
    from mmfuse.models.base import InputError
    from mmfuse.models.image import thumbnail
    item_id, item = element
    try:
        yield item_id, "data:image/jpeg;base64," + base64.b64encode(thumbnail(item["image"])).decode()
    except InputError:
        pass


class Samples(beam.PTransform):
    """A few users (the same ones night after night: the smallest hashes of their ids) with their latest
    history items and their recommendations, by title, and thumbnails of those items' images where the
    catalog names image files (``fetch_images``: a ``media.FetchMedia`` for them; inline image bytes are not
    carried this far). Holds only those users' rows and items."""

    def __init__(self, n: int, history: int, title: Callable[[tuple], str],
                 fetch_images: beam.PTransform | None = None):
        super().__init__()
        self._n, self._history, self._title, self._fetch = n, history, title, fetch_images

    def expand(self, inputs: dict) -> beam.PCollection:
        ranked, title = inputs["ranked"], self._title
        # Chosen among the users of the interactions, not of the rankings: a side input made downstream of
        # the interactions and read where they are made would wait on itself.
        users = (inputs["interactions"]
                 | "Users" >> beam.Map(lambda e: e["user_id"])
                 | "DistinctUsers" >> beam.Distinct()
                 | "Few" >> beam.combiners.Top.Of(self._n, key=_key, reverse=True))
        chosen = beam.pvalue.AsSingleton(users)
        picked = ranked | "TheirRankings" >> beam.Filter(lambda qr, u: qr[0] in u, chosen)
        history = (inputs["interactions"]
                   | "TheirEvents" >> beam.Filter(lambda e, u: e["user_id"] in u, chosen)
                   | "Event" >> beam.Map(lambda e: (e["user_id"], (e["timestamp"], e["item_id"])))
                   | "Latest" >> beam.combiners.Top.PerKey(self._history))
        wanted = ({"r": picked | "RecItems" >> beam.FlatMap(lambda qr: [str(i) for i in qr[1].item_ids]),
                   "h": history | "HistItems" >> beam.FlatMap(lambda kv: [i for _, i in kv[1]])}.values()
                  | "AllItems" >> beam.Flatten()
                  | "Unique" >> beam.Distinct())
        rows = ({"row": inputs["catalog"] | "TitleAndImage" >> beam.Map(
                    lambda kv: (kv[0], (title(kv), kv[1].get("image_uri")))),
                 "wanted": wanted | "Wanted" >> beam.Map(lambda i: (i, None))}
                | "RowsOfWanted" >> beam.CoGroupByKey()
                | "TheirRows" >> beam.FlatMap(
                    lambda kv: [(kv[0], next(iter(kv[1]["row"]), ("", None)))] if kv[1]["wanted"] else []))
        titles = rows | "TheirTitles" >> beam.MapTuple(lambda item, row: (item, row[0]))
        thumbnails = ranked.pipeline | "NoImages" >> beam.Create([])
        if self._fetch is not None:
            files = rows | "TheirImages" >> beam.FlatMap(
                lambda kv: [(kv[0], {"image": None, "image_uri": kv[1][1], "source": kv[0]})] if kv[1][1] else [])
            # A file that cannot be read was dead-lettered by the encode stage already: none is shown here.
            thumbnails = (files | "FetchImages" >> self._fetch).ok | "Thumbnails" >> beam.FlatMap(_thumbnail)
        return (ranked.pipeline
                | "Once" >> beam.Create([None])
                | "Assemble" >> beam.FlatMap(_sample, chosen, beam.pvalue.AsList(picked), beam.pvalue.AsDict(history),
                                             beam.pvalue.AsDict(titles), beam.pvalue.AsDict(thumbnails)))
