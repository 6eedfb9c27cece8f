"""The evaluation protocol (docs/evaluation.md): metrics on hand-checked cases, the splits, the
baselines, and the reference figures on MovieLens-small with posters."""
import importlib.util
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from examples import movielens
from mmfuse.models import evaluation as ev
from tests.conftest import shared


def _inter(pairs, n_users, n_items, timestamps=None) -> ev.Interactions:
    """Interactions from (user, item) index pairs; by default each pair is one second later than the last."""
    user, item = (np.array(c, dtype=np.int64) for c in zip(*pairs))
    ts = np.arange(len(pairs)) if timestamps is None else timestamps
    return ev.Interactions(user=user, item=item, timestamp=np.asarray(ts, np.int64),
                           weight=np.ones(len(pairs), np.float32),
                           user_ids=np.array([f"u{u}" for u in range(n_users)]),
                           item_ids=np.array([f"i{i}" for i in range(n_items)]))


# 50 items, 4 users. Users 0 and 2 rank by index (item 0 best), user 1 the reverse (item 49 best).
N_ITEMS = 50
TRAIN = _inter([(0, 0), (1, 5), (2, 49), (3, 2)], 4, N_ITEMS)
TEST = _inter([(0, 1), (0, 3), (0, 49), (1, 45), (1, 0)] + [(2, i) for i in range(12)], 4, N_ITEMS)
SCORES = np.array([N_ITEMS - np.arange(N_ITEMS), np.arange(N_ITEMS)] * 2, dtype=np.float32)


def test_metrics_by_hand():
    # User 0: training item 0 is dropped, so the ranking is 1, 2, ..., 49: hits at ranks 1 and 3; item 49 is
    #   out of the top 20. Recall 2/3. DCG = 1 + 1/log2(4) = 1.5; ideal over min(3, K) = 3:
    #   1 + 1/log2(3) + 1/2 = 2.1309298; NDCG = 0.7039180 (at K = 10 and 20).
    # User 1: training item 5 is dropped; ranking 49, 48, ...: item 45 at rank 5, item 0 last. Recall 1/2.
    #   DCG = 1/log2(6) = 0.3868528; ideal over 2: 1 + 1/log2(3) = 1.6309298; NDCG = 0.2371973.
    # User 2: 12 test items 0..11 ranked first. Recall@10 = 10/12, recall@20 = 1. NDCG = 1 at both K: the
    #   ideal DCG is over min(12, 10) = 10 items at K = 10 (over 12 it would fall below 1).
    # User 3 has no test items and is not averaged.
    # Coverage: top 20s are {1..20}, {49..30} and {0..19}: 41 of 50 items.
    expected = {"recall@10": (2 / 3 + 1 / 2 + 10 / 12) / 3,  # 0.6666667
                "recall@20": (2 / 3 + 1 / 2 + 1) / 3,  # 0.7222222
                "ndcg@10": (0.7039180 + 0.2371973 + 1) / 3,  # 0.6470384
                "ndcg@20": (0.7039180 + 0.2371973 + 1) / 3,
                "coverage@20": 41 / 50}
    for batch_size in (1, 256):
        assert ev.evaluate(SCORES, TRAIN, TEST, batch_size) == pytest.approx(expected, abs=1e-6)
    assert ev.evaluate(lambda users: SCORES[users], TRAIN, TEST) == pytest.approx(expected, abs=1e-6)


def test_training_items_are_excluded():
    # Without the exclusion, user 0's hits would sit at ranks 2 and 4 behind training item 0.
    alone = ev.evaluate(SCORES, TRAIN.subset(TRAIN.user == 0), TEST.subset(TEST.user == 0))
    assert alone["recall@10"] == pytest.approx(2 / 3)
    assert alone["ndcg@10"] == pytest.approx(1.5 / 2.1309298)
    assert alone["coverage@20"] == pytest.approx(20 / 50)  # items 1..20: training item 0 is never shown


def test_unscorable_items_are_never_recommended():
    # Only items 49 and 1 have scores; item 3 (NaN) and the rest (-inf) fill the top 20 but are not shown:
    # user 0 gets 2 of its 3 test items, and coverage is 2/50.
    scores = np.full((4, N_ITEMS), -np.inf, np.float32)
    scores[:, [1, 49]] = 1.0
    scores[:, 3] = np.nan
    result = ev.evaluate(scores, TRAIN, TEST.subset(TEST.user == 0))
    assert result["recall@20"] == pytest.approx(2 / 3)
    assert result["coverage@20"] == pytest.approx(2 / 50)


def test_cold_metrics_rank_only_held_out_items():
    # Held out: items 1 and 3; item 0, scored best, is not among them and must not push them down.
    # User 0: item 3 ranks first among {3, 1}: recall 1, NDCG 1. User 1: item 1 ranks second: recall 1,
    # NDCG = 1/log2(3) = 0.6309298. Means: recall 1, NDCG 0.8154649.
    scores = np.array([[9, 1, 0, 2], [9, 1, 0, 2]], np.float32)
    test = _inter([(0, 3), (1, 1)], 2, 4)
    assert ev.evaluate_cold(scores, test, np.array([1, 3])) == pytest.approx(
        {"recall@20": 1.0, "ndcg@20": 0.8154649}, abs=1e-6)


def test_from_table_filters_items_and_users():
    # u1 keeps 4 interactions on catalogued items (its "x" row is dropped): below 5, so u1 goes.
    table = pa.table({
        "user_id": ["u0"] * 5 + ["u1"] * 5,
        "item_id": ["b", "a", "c", "a", "b", "a", "b", "c", "a", "x"],
        "timestamp": pa.array(list(range(10)), pa.timestamp("s", tz="UTC")),
    })
    inter = ev.Interactions.from_table(table, items=["c", "b", "a"])
    assert list(inter.user_ids) == ["u0"] and list(inter.item_ids) == ["c", "b", "a"]
    assert inter.item.tolist() == [1, 2, 0, 2, 1]  # indices follow the given item order
    assert inter.timestamp.tolist() == [0, 1, 2, 3, 4] and inter.weight.tolist() == [1.0] * 5
    epoch = table.set_column(2, "timestamp", pa.array(list(range(10)), pa.int64()))
    assert ev.Interactions.from_table(epoch, items=["c", "b", "a"]).timestamp.tolist() == [0, 1, 2, 3, 4]


def test_warm_split_by_time_ties_by_item():
    # User 0: 10 interactions, timestamps 5 1 3 3 9 9 2 8 7 9 on items 0..9. By time, then item:
    # 1 6 2 3 0 8 7 4 5 9; the last 20% (2) are items 5 and 9 (items 4, 5, 9 tie at 9).
    # Users 1, 2, 3 have 5, 7 and 14 interactions in time order: floor(20%) = 1, 1, 2 (at least 1).
    pairs = [(0, i) for i in range(10)] + [(1, i) for i in range(5)] + [(2, i) for i in range(7)] + \
        [(3, i) for i in range(14)]
    ts = [5, 1, 3, 3, 9, 9, 2, 8, 7, 9] + list(range(5)) + list(range(7)) + list(range(14))
    inter = _inter(pairs, 4, 14, ts)
    train, test = ev.warm_split(inter)
    got = {u: sorted(test.item[test.user == u].tolist()) for u in range(4)}
    assert got == {0: [5, 9], 1: [4], 2: [6], 3: [12, 13]}
    assert len(train) + len(test) == len(inter)

    fit, val = ev.validation_split(train)
    # User 0's 8 training interactions: floor(0.8) = 0, so at least one: the latest, item 4.
    assert sorted(val.item[val.user == 0].tolist()) == [4]
    def pairs_of(x):
        return set(zip(x.user.tolist(), x.item.tolist()))

    assert pairs_of(fit) | pairs_of(val) == pairs_of(train)
    assert not pairs_of(val) & pairs_of(test) and not pairs_of(fit) & pairs_of(test)
    assert all((val.user == u).sum() >= 1 for u in range(4))


def test_cold_split_holds_out_a_fifth_of_the_items():
    rng = np.random.default_rng(1)
    inter = _inter([(u, i) for u in range(6) for i in rng.choice(23, 8, replace=False)], 6, 23)
    train, test, held_out = ev.cold_split(inter)
    assert len(held_out) == round(0.2 * 23) == 5
    assert held_out.tolist() == sorted(np.random.default_rng(0).choice(23, 5, replace=False).tolist())
    assert not np.isin(train.item, held_out).any() and np.isin(test.item, held_out).all()
    assert len(train) + len(test) == len(inter)


def test_baselines_small():
    # Users: u0 {0, 1}, u1 {0, 1}, u2 {1, 2}. Cosine: (0,1) = 2/sqrt(2*3) = 0.8164966, (1,2) = 1/sqrt(3),
    # (0,2) = 0. With k = 1 each item keeps its nearest: 0 -> 1, 1 -> 0, 2 -> 1. u2's scores = rows 1 + 2:
    # item 0: 0.8164966, item 1: 0.5773503, item 2: 0.
    train = _inter([(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (2, 2)], 3, 3)
    knn = ev.ItemKNN(k=1).fit(train)
    assert knn.score(np.array([2]))[0] == pytest.approx([0.8164966, 0.5773503, 0.0], abs=1e-6)
    assert ev.MostPopular().fit(train).score(np.array([0, 2])).tolist() == [[2, 3, 1]] * 2

    rand = ev.Random(seed=3).fit(train)
    assert np.array_equal(rand.score(np.array([2, 0]))[::-1], rand.score(np.array([0, 2])))
    assert rand.score(np.array([0])).dtype == np.float32


def test_content_knn():
    # Items: a = (1, 0), b = (0, 2), c = (1, 1), d missing (NaN). A user who trained on a and d has user
    # vector (1, 0) (d is left out): cosines a 1, b 0, c 1/sqrt(2); d is never recommended (-inf).
    vectors = np.array([[1, 0], [0, 2], [1, 1], [np.nan, np.nan]], np.float32)
    train = _inter([(0, 0), (0, 3)], 1, 4)
    expected = [1.0, 0.0, 0.7071068, -np.inf]
    assert ev.ContentKNN(vectors).fit(train).score(np.array([0]))[0] == pytest.approx(expected)
    masked = np.nan_to_num(vectors)
    assert ev.ContentKNN(masked, mask=[True, True, True, False]).fit(train).score(
        np.array([0]))[0] == pytest.approx(expected)
    aligned = train.align(["i2", "zz", "i0"], np.array([[1, 1], [5, 5], [1, 0]]))
    assert np.array_equal(aligned[[0, 2]], [[1, 0], [1, 1]]) and np.isnan(aligned[[1, 3]]).all()


def test_non_personalised_content_baselines():
    # Items a = (1, 0), b = (0, 2), c = (1, 1), d missing. Training: u0 a, a; u1 b. The prior's one user vector
    # is the mean over interactions, (2/3, 2/3); scores against unit items: a, b 2/3, c 0.9428090; d never
    # recommended.
    vectors = np.array([[1, 0], [0, 2], [1, 1], [np.nan, np.nan]], np.float32)
    train = _inter([(0, 0), (0, 0), (1, 1)], 2, 4)
    prior = ev.ContentPrior(vectors).fit(train).score(np.array([1, 0]))
    assert prior[0] == pytest.approx([2 / 3, 2 / 3, 0.9428090, -np.inf]) and np.array_equal(prior[0], prior[1])
    # On a line, a = (1, 0), b = (2, 0), c = (3, 0): a has 1 interaction, b 3, so log(1 + count) is x log 2 on
    # the known items a, b. Without a penalty the regression recovers it and predicts c (held out: known =
    # False) from its content, log 8; d stays unrankable.
    line = np.array([[1, 0], [2, 0], [3, 0], [np.nan, np.nan]], np.float32)
    counts = _inter([(0, 0), (0, 1), (1, 1), (1, 1)], 2, 4)
    regressor = ev.PopularityRegressor(line, known=[True, True, False, True], penalty=0.0).fit(counts)
    assert regressor.score(np.array([0, 1]))[1] == pytest.approx([np.log(2), np.log(4), np.log(8), -np.inf], abs=1e-5)
    # Every item known: c's 0 interactions pull the fit down (which is why the cold split hides its items).
    assert ev.PopularityRegressor(line, known=[True] * 4, penalty=0.0).fit(counts).scores[2] < np.log(8) - 0.5
    fit, val = _inter([(0, 0), (1, 0), (2, 1)], 3, 4), _inter([(0, 2), (1, 2)], 3, 4)
    assert ev.PopularityRegressor.tune_penalty(vectors, np.ones(4, bool), fit, val, (0.0, 10.0)) in (0.0, 10.0)


def test_cross_modal_recall_counts_own_target_in_top_k():
    rng = np.random.default_rng(0)
    text = rng.standard_normal((200, 8))
    same = ev.cross_modal_recall(text, 3 * text + 0.01 * rng.standard_normal((200, 8)))
    assert same == {"recall@10": 1.0, "chance": 10 / 200, "items": 200}
    # Unrelated spaces: about chance (10 / 200), far below an aligned one.
    assert ev.cross_modal_recall(text, rng.standard_normal((200, 8)))["recall@10"] < 0.15
    # Hand-made: item 0 finds its own target first; item 1's own target (-0.1 by cosine) loses to item 0's (0).
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    t = np.array([[1.0, 0.0], [1.0, -0.1]])
    assert ev.cross_modal_recall(q, t, k=1)["recall@1"] == 0.5


def test_als_is_seeded_and_tuned_on_validation():
    rng = np.random.default_rng(0)
    inter = _inter([(u, i) for u in range(30) for i in rng.choice(40, 10, replace=False)], 30, 40)
    train, _ = ev.warm_split(inter)
    fit, val = ev.validation_split(train)
    users = np.arange(30)
    first, second = (ev.ALS(factors=4, iterations=3, seed=1).fit(train).score(users) for _ in range(2))
    assert np.array_equal(first, second) and first.shape == (30, 40)
    grid = {"factors": [2, 4], "regularization": [0.1], "alpha": [1.0], "iterations": [2]}
    best, trials = ev.tune(fit, val, grid)
    assert len(trials) == 2 and best == max(trials, key=lambda t: t[1]["ndcg@20"])[0]


@pytest.mark.slow
def test_movielens_reference_figures(tmp_path):
    """EVALUATION.md's warm-split figures on MovieLens-small with posters (about 20 s on 2 cores)."""
    paths = movielens.convert(shared("movielens"), tmp_path, posters_only=True)
    items = pq.read_table(paths["catalog"], columns=["item_id"])["item_id"].to_pylist()
    inter = ev.Interactions.from_table(pq.read_table(paths["interactions"]), items)
    assert (inter.n_users, inter.n_items, len(inter)) == (597, 2947, 58461)
    train, test = ev.warm_split(inter)
    fit, val = ev.validation_split(train)

    start = time.perf_counter()
    best, _ = ev.tune(fit, val)
    results = {name: ev.evaluate(model.fit(train).score, train, test) for name, model in [
        ("popular", ev.MostPopular()), ("item_knn", ev.ItemKNN()), ("als", ev.ALS(**best)), ("random", ev.Random())]}
    print(f"tuned ALS {best}; {time.perf_counter() - start:.1f} s;", results)

    def close(name, recall, ndcg, tol):
        assert results[name]["recall@20"] == pytest.approx(recall, abs=tol)
        assert results[name]["ndcg@20"] == pytest.approx(ndcg, abs=tol)

    close("popular", 0.120, 0.117, 0.01)
    close("item_knn", 0.154, 0.145, 0.02)
    close("als", 0.198, 0.166, 0.02)
    assert results["als"]["recall@20"] > results["item_knn"]["recall@20"]
    assert results["random"]["recall@20"] < 0.02
    assert set(results["als"]) == {"recall@10", "recall@20", "ndcg@10", "ndcg@20", "coverage@20"}

    cold_train, cold_test, held_out = ev.cold_split(inter)
    cold_random = ev.evaluate_cold(ev.Random().fit(cold_train).score, cold_test, held_out)
    assert cold_random == pytest.approx({"recall@20": 0.033, "ndcg@20": 0.038}, abs=0.01)


def test_scoring_written_lists_is_the_protocol():
    """Top-20 lists scored by ``score_lists`` give the protocol's figures for the scores they came from."""
    rng = np.random.default_rng(3)
    n_users, n_items = 40, 300
    scores = rng.normal(size=(n_users, n_items)).astype(np.float32)
    test_rows = [(u, i) for u in range(n_users) for i in rng.choice(n_items, rng.integers(1, 30), replace=False)]
    names = np.array([f"i{i}" for i in range(n_items)])
    test = ev.Interactions(user=np.array([u for u, _ in test_rows]), item=np.array([i for _, i in test_rows]),
                           timestamp=np.zeros(len(test_rows), np.int64), weight=np.ones(len(test_rows), np.float32),
                           user_ids=np.array([f"u{u}" for u in range(n_users)]), item_ids=names)
    empty = test.subset(np.zeros(len(test_rows), bool))
    expected = ev.evaluate(scores, empty, test)
    lists = {f"u{u}": names[np.argsort(-scores[u], kind="stable")[:20]].tolist() for u in range(n_users)}
    held = {f"u{u}": {f"i{i}" for v, i in test_rows if v == u} for u in range(n_users)}
    got = ev.score_lists(lists, held, n_items)
    assert got["users"] == n_users
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.slow
def test_method_comparison_on_every_modality_with_the_nightly_column_names(demo, demo_night, tmp_path, capsys,
                                                                         monkeypatch):
    """The comparison reads the night's embeddings whatever modalities they hold and the inputs under their own
    column names (the nightly job's options), and marks the row the nightly defaults correspond to."""
    import json

    from mmfuse.pipelines import evaluate
    catalog, interactions = tmp_path / "catalog.parquet", tmp_path / "interactions.parquet"
    pq.write_table(_renamed(pq.read_table(demo["catalog"]), {"item_id": "sku"}), catalog)
    pq.write_table(_renamed(pq.read_table(demo["interactions"]), {"user_id": "customer", "item_id": "sku",
                                                                  "timestamp": "when", "weight": "rating"}),
                   interactions)
    methods = "popular,text,image,audio_mfcc,features,contrastive_cf,prior,popularity_regressor"
    args = [f"--catalog={catalog}", f"--interactions={interactions}", f"--embeddings={demo_night}",
            f"--output={tmp_path / 'eval'}", "--item_id_column=sku", "--user_id_column=customer",
            "--interaction_item_id_column=sku", "--timestamp_column=when", "--weight_column=rating",
            "--align_epochs=2"]  # the fits' quality is examples/movielens_eval.py's business
    assert evaluate.main([*args, f"--methods={methods}"]) == 0
    results = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert list(results["warm"]) == methods.split(",")
    assert list(results["cold"]) == methods.split(",")[1:]  # most popular cannot rank unseen items
    for split in ("warm", "cold"):
        for method, metrics in results[split].items():
            assert 0.0 <= metrics["recall@20"] <= 1.0 and 0.0 <= metrics["ndcg@20"] <= 1.0, (split, method)
    assert results["details"]["warm/prior"]["vectors"] == evaluate.DEFAULT
    table = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "content kNN: audio_mfcc" in table and "nightly default" in table
    assert results["sizes"]["users"] > 0 and results["sizes"]["items"] == pq.read_metadata(catalog).num_rows
    capsys.readouterr()
    assert evaluate.main([*args, "--methods=popular,musicnn"]) == 2
    assert "unknown methods ['musicnn']" in capsys.readouterr().err
    # without the evaluate extra, ALS is refused before any fit runs, in one line
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "implicit" else real(name, *a))
    assert evaluate.main([*args, "--methods=popular,als"]) == 2
    assert "pip install 'mmfuse[evaluate]'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_comparison_reads_splits_and_scores_without_keras(demo, demo_night):
    """Only the fit workers load Keras and TensorFlow; the comparison's own process reads, splits and scores
    without them, so their seconds of start-up are not spent three times over on the fits' cores."""
    code = ("import sys; from mmfuse.pipelines import evaluate; from mmfuse.models import evaluation as ev; "
            f"inter, catalog = evaluate.load({str(demo['catalog'])!r}, {str(demo['interactions'])!r}, "
            f"{str(demo_night)!r}); train, test = ev.warm_split(inter); "
            "figures = ev.evaluate(ev.ContentKNN(catalog.features['text']).fit(train).score, train, test); "
            "print(figures['recall@20'] > 0, sorted({'keras', 'tensorflow'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "True []"


def _renamed(table: pa.Table, names: dict) -> pa.Table:
    return table.rename_columns([names.get(n, n) for n in table.column_names])
