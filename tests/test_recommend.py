"""pipelines.recommend: user vectors, recommendations and similar items, against numpy references, and
MovieLens end to end."""
from __future__ import annotations

from collections import defaultdict

import apache_beam as beam
import numpy as np
import pytest

from mmfuse.pipelines import ingest, recommend
from mmfuse.pipelines.job import execute
from tests.conftest import RUN_DATE, dataset, metrics

DAY = 86400
EVENT_WEIGHTS = {"view": 1.0, "purchase": 4.0}


def _run(tmp_path, build, *flags, catalog="unused"):
    """Run a job whose build makes its own inputs (``--catalog`` is required by every job, unused here)."""
    _, run = execute(build, [f"--output={tmp_path / 'out'}", f"--run_date={RUN_DATE}", f"--catalog={catalog}",
                             *flags])
    return run.final


def _random_world(seed=0, n_items=400, n_users=60, dim=12):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n_items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    share = rng.uniform(0.2, 0.8, n_items).astype(np.float32)
    items = [{"item_id": f"m{j}", "vector": vectors[j].tolist(), "weights": {"text": float(share[j]),
                                                                              "image": float(1 - share[j])},
              "parts": {"text": (share[j] * vectors[j]).tolist(), "image": ((1 - share[j]) * vectors[j]).tolist()}}
             for j in range(n_items)]
    interactions = []
    for u in range(n_users):
        for _ in range(rng.integers(1, 30)):
            interactions.append({"user_id": f"u{u}", "item_id": f"m{rng.integers(n_items)}",
                                 "timestamp": int(1.7e9 + rng.integers(0, 90 * DAY)),
                                 "event": ["view", "purchase", "click", None][rng.integers(4)],
                                 "weight": None if rng.random() < 0.3 else float(rng.integers(1, 6))})
    # A user whose only item has no vector (it is not among the fused items): the popularity fallback.
    interactions.append({"user_id": "cold", "item_id": "no-vector", "timestamp": int(1.7e9), "event": None,
                         "weight": None})
    return items, interactions, vectors


def _user_vector(events, items_by_id, half_life_s, last_n):
    """The documented user vector, computed independently in numpy."""
    events = sorted(events, key=lambda e: (e["timestamp"], e["item_id"]))[-last_n:]
    newest = events[-1]["timestamp"]
    total = np.zeros(len(next(iter(items_by_id.values()))), dtype=np.float64)
    for e in events:
        if e["item_id"] in items_by_id:
            w = EVENT_WEIGHTS.get(e["event"], 0.5) * (e["weight"] if e["weight"] is not None else 1.0)
            total += w * 0.5 ** ((newest - e["timestamp"]) / half_life_s) * items_by_id[e["item_id"]]
    return total / np.linalg.norm(total)


def _brute_force(query, vectors, ids, banned, k):
    scores = vectors @ query.astype(np.float32)
    scores[[ids.index(b) for b in banned if b in ids]] = -np.inf
    order = [j for j in np.lexsort((np.array(ids), -scores)) if scores[j] > -np.inf][:k]
    return [ids[j] for j in order], scores[order]


@pytest.mark.slow
def test_recommend_equals_numpy_reference(tmp_path):
    items, interactions, vectors = _random_world()
    ids = [i["item_id"] for i in items]

    def build(job, config):
        recommend.recommend(job, config.recommend, job.pipeline | "Items" >> beam.Create(items),
                            job.pipeline | "Interactions" >> beam.Create(interactions))

    k, half_life_days, last_n = 7, 20.0, 15
    run = _run(tmp_path, build, f"--top_k={k}", "--similar_k=5", "--event_weights=view:1,purchase:4",
               "--default_event_weight=0.5", f"--recency_half_life_days={half_life_days}",
               f"--last_n_interactions={last_n}", "--user_batch_size=16", "--item_shard_size=150")
    report = metrics(run)
    assert report["users"]["users"] == {"personal": 60, "fallback": 1}
    assert report["stages"]["recommend"] == {"in": 61, "out": 61, "dead": 0}
    assert report["stages"]["similar_items"] == {"in": 400, "out": 400, "dead": 0}

    history = defaultdict(list)
    for e in interactions:
        history[e["user_id"]].append(e)
    items_by_id = dict(zip(ids, vectors))
    users = {r["user_id"]: r for r in dataset(run, "users").to_pylist()}
    recs = defaultdict(list)
    for r in sorted(dataset(run, "recommendations").to_pylist(), key=lambda r: (r["user_id"], r["rank"])):
        recs[r["user_id"]].append(r)
    for user, events in history.items():
        seen = {e["item_id"] for e in events}
        assert not seen & {r["item_id"] for r in recs[user]}
        if user == "cold":
            assert users[user]["fallback"] and users[user]["vector"] is None
            assert [r["contributions"] for r in recs[user]][0] == [("popularity", recs[user][0]["score"])]
            continue
        want = _user_vector(events, items_by_id, half_life_days * DAY, last_n)
        assert not users[user]["fallback"]
        newest = sorted(events, key=lambda e: (e["timestamp"], e["item_id"]))[-last_n:]
        assert users[user]["n_interactions"] == sum(e["item_id"] in items_by_id for e in newest)
        np.testing.assert_allclose(users[user]["vector"], want, atol=1e-5)
        kept = users[user]["history"]  # every history item here (fewer than users.HISTORY)
        assert {h["item_id"] for h in kept} == {e["item_id"] for e in newest}
        np.testing.assert_allclose(sum(h["weight"] * items_by_id[h["item_id"]] for h in kept
                                       if h["item_id"] in items_by_id), want, atol=1e-5)
        want_ids, want_scores = _brute_force(np.array(users[user]["vector"]), vectors, ids, seen, k)
        assert [r["item_id"] for r in recs[user]] == want_ids and [r["rank"] for r in recs[user]] == list(
            range(1, k + 1))
        np.testing.assert_allclose([r["score"] for r in recs[user]], want_scores, atol=1e-5)
        for r in recs[user]:
            assert dict(r["contributions"]).keys() == {"text", "image"}
            assert sum(c for _, c in r["contributions"]) == pytest.approx(r["score"], abs=1e-5)

    similar = defaultdict(list)
    for r in sorted(dataset(run, "similar_items").to_pylist(), key=lambda r: (r["item_id"], r["rank"])):
        similar[r["item_id"]].append(r["similar_item_id"])
    for j in range(0, 400, 37):
        assert similar[ids[j]] == _brute_force(vectors[j], vectors, ids, {ids[j]}, 5)[0]


@pytest.mark.slow
def test_fallback_recommends_popular_recent_unseen_items(tmp_path):
    recent = int(1.7e9) + 100 * DAY
    items = [{"item_id": f"p{j}", "vector": [1.0, float(j)], "weights": {"cf": 1.0}, "parts": {"cf": [1.0, float(j)]}}
             for j in range(5)]
    events = ([{"user_id": f"fan{n}", "item_id": "p3", "timestamp": recent - n, "event": None, "weight": None}
               for n in range(3)]
              + [{"user_id": f"fan{n}", "item_id": "p1", "timestamp": recent - n, "event": None, "weight": None}
                 for n in range(2)]
              + [{"user_id": "old", "item_id": "p4", "timestamp": recent - 90 * DAY, "event": None, "weight": None}
                 for _ in range(9)]  # popular long ago: outside the 30-day window
              + [{"user_id": "new", "item_id": "p3", "timestamp": recent, "event": "view", "weight": 0.0}])

    def build(job, config):
        recommend.recommend(job, config.recommend, job.pipeline | "Items" >> beam.Create(items),
                            job.pipeline | "Interactions" >> beam.Create(events))

    run = _run(tmp_path, build, "--top_k=3")
    new = sorted((r for r in dataset(run, "recommendations").to_pylist() if r["user_id"] == "new"),
                 key=lambda r: r["rank"])
    user = [u for u in dataset(run, "users").to_pylist() if u["user_id"] == "new"][0]
    assert user["fallback"] and user["n_interactions"] == 0  # its one interaction weighs zero
    # p3 is the most popular recent item but "new" has seen it; p4 was popular only long ago.
    assert [r["item_id"] for r in new] == ["p1"]


def _text_items_build(embeddings: list[dict]):
    """Recommendations from text vectors alone, read from a nightly run's ``embeddings``."""
    def build(job, config):
        items_in, _ = ingest.read_catalog(job, config)
        interactions = ingest.read_interactions(job, config, items_in)
        items = (job.pipeline
                 | "TextItems" >> beam.Create([{"item_id": r["item_id"], "vector": r["text"], "weights": {"text": 1.0},
                                                "parts": {"text": r["text"]}} for r in embeddings if r["text"]]))
        recommend.recommend(job, config.recommend, items, interactions)
    return build


def check_movielens(run_dir, catalog_rows: list[dict], sequel_first: bool = True, same_genre: float = 0.8) -> None:
    """What a person can verify on MovieLens outputs, without knowing the model: every user gets 20 ranked
    recommendations, every film's most similar films are mostly of a genre it has (share > ``same_genre``), and
    a franchise's sequel is among its 10 most similar films (the very first with ``sequel_first``: on fused
    vectors, films watched together, such as Toy Story and A Bug's Life, may come first)."""
    title = {r["item_id"]: r["title"] for r in catalog_rows}
    genres = {r["item_id"]: set((r["description"] or "").split(" | ")) for r in catalog_rows}
    recs = dataset(run_dir, "recommendations").to_pylist()
    per_user = defaultdict(list)
    for r in recs:
        per_user[r["user_id"]].append(r["rank"])
    assert len(per_user) == 610 and all(sorted(ranks) == list(range(1, 21)) for ranks in per_user.values())

    similar = defaultdict(list)
    for r in sorted(dataset(run_dir, "similar_items").to_pylist(), key=lambda r: (r["item_id"], r["rank"])):
        similar[r["item_id"]].append(r["similar_item_id"])
    by_title = {t: i for i, t in title.items()}
    franchises = [("Toy Story", "Toy Story (1995)", "Toy Story 2 (1999)"),
                  ("Godfather", "Godfather, The (1972)", "Godfather: Part II, The (1974)"),
                  ("Star Wars", "Star Wars: Episode IV - A New Hope (1977)",
                   "Star Wars: Episode V - The Empire Strikes Back (1980)"),
                  ("Harry Potter", "Harry Potter and the Chamber of Secrets (2002)",
                   "Harry Potter and the Prisoner of Azkaban (2004)")]
    for name, first, sequel in franchises:
        neighbours = [title[i] for i in similar[by_title[first]]]
        assert title[by_title[sequel]] in neighbours[:10], (first, neighbours)
        assert neighbours[0].startswith(name) or not sequel_first, (first, neighbours)
    shared_genre = [len(genres[i] & genres[j]) > 0 for i in list(similar)[::50] for j in similar[i][:10]]
    assert np.mean(shared_genre) > same_genre


@pytest.mark.slow
def test_movielens_recommendations_and_similar_items(movielens_night, tmp_path):
    import pyarrow.parquet as pq

    paths = movielens_night["paths"]
    embeddings = dataset(movielens_night["first"], "embeddings").select(["item_id", "text"]).to_pylist()
    run = _run(tmp_path, _text_items_build(embeddings), f"--interactions={paths['interactions']}",
               "--top_k=20", "--similar_k=20", catalog=paths["catalog"])
    check_movielens(run, pq.read_table(paths["catalog"]).to_pylist())
    assert metrics(run)["stages"]["recommend"] == {"in": 610, "out": 610, "dead": 0}
