"""Recommend: user vectors, each user's top-k unseen items and each item's most similar items.

Called by the nightly job after fusion with the fused ``items`` (dicts with ``item_id``, ``vector``,
``weights``, ``parts``) and the valid interactions; writes three datasets:

- ``users``: user_id, vector (null for fallback users), n_interactions (how many built the vector),
  fallback (True: no usable history, so the user gets the most popular recent items), history (the items
  of largest weight in the vector: item_id and weight, with vector = sum of weight x item vector), seen
  (every item the user interacted with: what their rankings exclude);
- ``recommendations``: user_id, rank (1 = best), item_id, score, contributions (modality -> its share of
  the score; they sum to the score), because (the ``topk.BECAUSE`` kept history items with the largest
  shares of the score, largest first: item_id and share). Fallback users' rows have score = the item's
  share of recent interactions, contributions ``{"popularity": score}`` and no ``because``;
- ``similar_items``: item_id, rank, similar_item_id, score, contributions (as above, for the item as query);
- ``popular``: rank, item_id, share: the fallback's list (the most popular recent items), so that a served
  night can answer users it has never seen.

Both rankings are exact (``transforms.topk``): no approximate index, ties broken by item id. A user who has
seen every item, or an item alone in the catalogue, gets no rows and a dead letter saying so.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.transforms.window import GlobalWindows

from mmfuse.models.ranking import Ranked
from mmfuse.pipelines.config import RecommendConfig
from mmfuse.pipelines.job import Job
from mmfuse.transforms import topk
from mmfuse.transforms.deadletter import dead_letter
from mmfuse.transforms.users import RecentPopular, UserVectors

if TYPE_CHECKING:
    from apache_beam.utils.windowed_value import WindowedValue

POPULARITY = "popularity"
_CONTRIBUTIONS = pa.map_(pa.string(), pa.float32())
USERS = pa.schema([("user_id", pa.string()), ("vector", pa.list_(pa.float32())),
                   ("n_interactions", pa.int64()), ("fallback", pa.bool_()),
                   ("history", pa.list_(pa.struct([("item_id", pa.string()), ("weight", pa.float32())]))),
                   ("seen", pa.list_(pa.string()))])
_BECAUSE = pa.list_(pa.struct([("item_id", pa.string()), ("share", pa.float32())]))
RECOMMENDATIONS = pa.schema([("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()),
                             ("score", pa.float32()), ("contributions", _CONTRIBUTIONS), ("because", _BECAUSE)])
SIMILAR_ITEMS = pa.schema([("item_id", pa.string()), ("rank", pa.int32()), ("similar_item_id", pa.string()),
                           ("score", pa.float32()), ("contributions", _CONTRIBUTIONS)])
POPULAR = pa.schema([("rank", pa.int32()), ("item_id", pa.string()), ("share", pa.float32())])


def recommend(job: Job, o: RecommendConfig, items: beam.PCollection, interactions: beam.PCollection) -> dict:
    """Write ``users``, ``recommendations`` and ``similar_items`` from fused items and interactions; returns
    the rankings ``(user, Ranked)``: ``personal`` (top-k of user vectors) and ``all`` (with the fallback's)."""
    job.report["weighting"] = dataclasses.asdict(o.weighting)  # how user vectors were made: a served night redoes it
    users = {"interactions": interactions, "items": items} | "UserVectors" >> UserVectors(o.weighting)
    personal, fallback = users | "Fallback?" >> beam.Partition(lambda u, _: int(u["fallback"]), 2)
    job.count("users", "users", personal=personal, fallback=fallback)
    job.write("users", users | "UserRows" >> beam.Map(_user_row), USERS)

    queries = personal | "UserQueries" >> beam.Map(lambda u: (u["user_id"], u["vector"], u["seen"], (
        [item for item, _ in u["history"]], [w for _, w in u["history"]])))
    ranked = {"queries": queries, "items": items} | "RecommendTopK" >> topk.TopK(
        o.top_k, o.user_batch_size, o.item_shard_size)
    allowed = items | "PopularAllowedIds" >> beam.Map(lambda i: i["item_id"])
    popular = ({"interactions": interactions, "allowed": allowed}
               | "PopularItems" >> RecentPopular(o.popular_days * 86400.0, o.top_k + 1000))
    job.write("popular", popular | "PopularRows" >> beam.FlatMap(
        lambda top: [{"rank": rank, "item_id": item, "share": share} for rank, (item, share) in enumerate(top, 1)]),
        POPULAR)
    popular_ranked = fallback | "PopularForFallback" >> beam.FlatMap(
        _popular, beam.pvalue.AsSingleton(popular, default_value=[]), o.top_k)
    all_ranked = (ranked, popular_ranked) | "AllRecommendations" >> beam.Flatten()
    _ranked_stage(job, "recommend", users | "RecommendUserIds" >> beam.Map(lambda u: u["user_id"]), all_ranked,
                  "nothing_to_recommend", "the user has seen every item that has a vector (a user without "
                  "usable history: every popular recent item)")
    job.write("recommendations", all_ranked | "RecommendationRows" >> beam.ParDo(_RankingTables(RECOMMENDATIONS)),
              RECOMMENDATIONS, tables=True)

    item_queries = items | "SimilarQueries" >> beam.Map(lambda i: (i["item_id"], i["vector"], [i["item_id"]]))
    similar = {"queries": item_queries, "items": items} | "SimilarTopK" >> topk.TopK(
        o.similar_k, o.user_batch_size, o.item_shard_size)
    _ranked_stage(job, "similar_items", items | "SimilarItemIds" >> beam.Map(lambda i: i["item_id"]), similar,
                  "no_other_items", "the catalogue has no other item with a vector")
    job.write("similar_items", similar | "SimilarRows" >> beam.ParDo(_RankingTables(SIMILAR_ITEMS)),
              SIMILAR_ITEMS, tables=True)
    return {"personal": ranked, "all": all_ranked}


def _ranked_stage(job: Job, stage: str, ids: beam.PCollection, ranked: beam.PCollection, error: str,
                  message: str) -> None:
    """Count the stage: every query id is ranked (out) or dead-lettered with why it got nothing."""
    joined = ({"id": ids | f"{stage} keys" >> beam.Map(lambda i: (i, None)),
               "ranked": ranked | f"{stage} ranked keys" >> beam.Keys() | f"{stage} ranked" >> beam.Map(
                   lambda i: (i, None))}
              | f"{stage} join" >> beam.CoGroupByKey())
    dead = joined | f"{stage} unranked" >> beam.FlatMap(
        lambda j: [] if j[1]["ranked"] else [dead_letter(stage, j[0], error, message, None)])
    job.stage(stage, ids, ranked, dead)


def _user_row(user: dict) -> dict:
    vector = user["vector"]
    return {"user_id": user["user_id"], "vector": None if vector is None else vector.tolist(),
            "n_interactions": user["n_interactions"], "fallback": user["fallback"],
            "history": [{"item_id": item, "weight": w} for item, w in user["history"]], "seen": list(user["seen"])}


def _popular(user: dict, popular: list, k: int):
    """The most popular recent items the user has not seen, as a ranking whose one contribution is
    popularity."""
    seen = set(user["seen"])
    best = [(item, share) for item, share in popular if item not in seen][:k]
    if best:
        scores = np.array([s for _, s in best], dtype=np.float32)
        yield user["user_id"], Ranked(user["user_id"], np.array([i for i, _ in best]), scores,
                                           (POPULARITY,), scores[:, None])


class _RankingTables(beam.DoFn):
    """``(query, Ranked)`` -> Arrow tables of about ``ROWS`` rows each, built column by column in the bundle
    that ranked them: rankings are most of a run's rows, and a dict per row cost more than the search."""

    ROWS = 65_536

    def __init__(self, schema: pa.Schema):
        super().__init__()
        self._schema = schema

    def start_bundle(self) -> None:
        self._held, self._rows = [], 0

    def process(self, ranked: tuple[str, Ranked]) -> Iterator[pa.Table]:
        self._held.append(ranked)
        self._rows += len(ranked[1].scores)
        if self._rows >= self.ROWS:
            yield self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self._held:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self) -> pa.Table:
        held, self._held, self._rows = self._held, [], 0
        return ranking_table(held, self._schema)


def ranking_table(rankings: list, schema: pa.Schema) -> pa.Table:
    """Rankings ``(query, Ranked)`` as rows of ``schema`` (query, rank, item, score, contributions[, because]);
    a contribution map holds the modalities the item has (NaN contributions are left out), a because list
    the history items a ranking names (none for rankings without history)."""
    lengths = np.array([len(r.scores) for _, r in rankings], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    modalities = sorted({m for _, r in rankings for m in r.modalities})
    contributions = np.full((int(starts[-1]), len(modalities)), np.nan, dtype=np.float32)
    for (_, r), lo, hi in zip(rankings, starts[:-1].tolist(), starts[1:].tolist()):
        contributions[lo:hi, [modalities.index(m) for m in r.modalities]] = r.contributions
    has = ~np.isnan(contributions)
    offsets = np.zeros(len(contributions) + 1, dtype=np.int32)
    np.cumsum(has.sum(axis=1), out=offsets[1:])
    names = np.broadcast_to(np.array(modalities, dtype=object), contributions.shape)[has]
    maps = pa.MapArray.from_arrays(pa.array(offsets), pa.array(names, pa.string()),
                                   pa.array(contributions[has], pa.float32()))
    columns = [
        pa.array(np.repeat(np.array([q for q, _ in rankings], dtype=object), lengths), pa.string()),
        pa.array((np.arange(starts[-1]) - np.repeat(starts[:-1], lengths) + 1).astype(np.int32)),
        pa.array(np.concatenate([r.item_ids for _, r in rankings]).astype(object), pa.string()),
        pa.array(np.concatenate([r.scores for _, r in rankings]).astype(np.float32)),
        maps.cast(schema.field(4).type)]
    if "because" in schema.names:
        columns.append(_because(rankings, int(starts[-1])))
    return pa.Table.from_arrays(columns, schema=schema)


def _because(rankings: list, rows: int) -> pa.Array:
    """The ``because`` lists of the rankings' rows: each row's named history items with their shares."""
    n = max((r.because_ids.shape[1] for _, r in rankings if r.because_ids is not None), default=0)
    ids, shares = np.full((rows, n), "", dtype=object), np.full((rows, n), np.nan, np.float32)
    start = 0
    for _, r in rankings:
        if r.because_ids is not None:
            ids[start:start + len(r.scores), :r.because_ids.shape[1]] = r.because_ids
            shares[start:start + len(r.scores), :r.because_ids.shape[1]] = r.because_shares
        start += len(r.scores)
    named = ~np.isnan(shares)
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(named.sum(axis=1), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.StructArray.from_arrays(
        [pa.array(ids[named], pa.string()), pa.array(shares[named], pa.float32())], ["item_id", "share"]))
