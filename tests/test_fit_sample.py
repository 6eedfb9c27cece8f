"""The fit's bounded sample and the distributed cf fold-in, on Beam's local runner against plain Python/numpy."""
import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from mmfuse.models import collaborative
from mmfuse.transforms.foldin import FoldIn
from mmfuse.transforms.sample import FitItems, NewestEvents, seeded_fraction


def _collect(tmp_path, build, name="out"):
    """Run ``build(pipeline)`` on the FnApiRunner and return its one output element, through JSON."""
    out = tmp_path / f"{name}.json"
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = build(p) | beam.combiners.ToList() | beam.Map(lambda r: out.write_text(json.dumps(r)))
    return json.loads(out.read_text())


def _events(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    return [(int(t), f"u{u}", f"i{i}") for t, u, i in zip(rng.integers(0, 400, n), rng.integers(0, 90, n),
                                                           rng.zipf(1.5, n) % 700)]


@pytest.mark.slow
def test_newest_events_are_exactly_the_n_newest_ties_by_id(tmp_path):
    events = _events()
    for n in (300, 4999, 6000):  # the quantile cut binds, barely binds, and has nothing to cut
        got = _collect(tmp_path, lambda p, n=n: p | beam.Create(events) | NewestEvents(n), f"newest{n}")
        assert [tuple(e) for e in got[0]] == sorted(events, reverse=True)[:n]


@pytest.mark.slow
def test_fit_items_are_the_most_touched_then_a_seeded_sample(tmp_path):
    events = _events()
    rows = [{"item_id": f"i{i}", "x": [float(i)]} for i in range(1000)]
    counts = {}
    for e in events[:400]:
        counts[e[2]] = counts.get(e[2], 0) + 1
    ranked = sorted(counts, key=lambda i: (-counts[i], i))

    def build(n):
        return lambda p: p | "Rows" >> beam.Create(rows) | FitItems(p | "Events" >> beam.Create([events[:400]]), n, 7)
    few = _collect(tmp_path, build(20), "few")[0]
    assert [r["item_id"] for r in few] == ranked[:20]  # more touched items than room: the most touched
    many = _collect(tmp_path, build(300), "many")[0]
    ids = [r["item_id"] for r in many]
    assert ids[:len(ranked)] == ranked and len(set(ids)) == len(ids) <= 300
    others = ids[len(ranked):]
    assert others == sorted(others, key=lambda i: seeded_fraction(7, i)) and len(others) > 100
    assert many == _collect(tmp_path, build(300), "again")[0]  # reproducible


def test_fold_in_on_beam_equals_the_regression_in_numpy(tmp_path):
    rng = np.random.default_rng(1)
    users, items = rng.integers(0, 60, 900), rng.zipf(1.3, 900) % 80
    sample = users < 40  # the fit saw these users' interactions only
    factors = collaborative.Factors(users[sample], items[sample], 80, dim=6, anchors=12)
    vectors, solver = factors.table(0.5)
    held = np.flatnonzero(~np.isnan(vectors).any(1))
    table = collaborative.CfTable(np.array([f"i{j}" for j in held]), vectors[held], np.isin(held, factors.anchors),
                                  solver)
    folder = tmp_path / "artifact"
    folder.mkdir()
    table.save(folder)
    pairs = [(f"u{u}", f"i{j}") for u, j in zip(users, items)]

    def build(p):
        artifact = p | "Folder" >> beam.Create([str(folder)])
        return (p | beam.Create(pairs) | FoldIn(artifact, collaborative.CfTable.load)
                | beam.Map(lambda kv: (kv[0], kv[1].tolist())))
    got = dict(_collect(tmp_path, build))
    taken = np.zeros((60, 80))
    taken[users, items] = 1.0
    u = taken[:, factors.anchors] @ vectors[factors.anchors]
    outside = sorted(set(np.flatnonzero(taken.sum(0))) - set(held))
    assert sorted(got) == sorted(f"i{j}" for j in outside if (taken[:, j] * np.abs(u).sum(1)).any())
    for j in outside:
        expected = collaborative.fold_in(solver, (taken[:, j] @ u)[None, :])[0]
        assert np.allclose(got[f"i{j}"], expected, atol=1e-5)
