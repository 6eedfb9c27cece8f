"""Closed-form collaborative vectors: what their geometry must show, and the alignment keeping them fixed."""
import dataclasses

import numpy as np
import pytest

from mmfuse.models import align, collaborative
from tests.test_align import SMALL, _data


def _two_groups(seed=0):
    """40 users: the first 20 take items 0-9, the others items 10-19; items 0 and 10 are taken by every user of
    their group, the rest by about half."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(40):
        base = 0 if u < 20 else 10
        chosen = [base] + [base + j for j in range(1, 10) if rng.random() < 0.5]
        users += [u] * len(chosen)
        items += chosen
    return np.array(users), np.array(items)


def test_vectors_are_unit_deterministic_and_group_items_by_their_users():
    users, items = _two_groups()
    x = collaborative.ease_vectors(users, items, 20, dim=6, l2=5.0)
    assert x.shape == (20, 6) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(x, collaborative.ease_vectors(users[::-1], items[::-1], 20, dim=6, l2=5.0))
    cosine = x @ x.T
    same = np.add.outer(np.arange(20) // 10, np.arange(20) // 10) != 1
    np.fill_diagonal(same, False)
    across = np.add.outer(np.arange(20) // 10, np.arange(20) // 10) == 1
    assert cosine[same].mean() > cosine[across].mean() + 0.2
    # The popularity coordinate: the item every user of a group took leans furthest toward it.
    assert x[0, -1] == x[:10, -1].max() and x[10, -1] == x[10:, -1].max()


def test_history_scores_are_the_symmetric_ease_weights_at_full_rank():
    # Every positive eigenvalue kept and no popularity tilt: a user's history vectors summed score each item with
    # the symmetric EASE weights (their positive part, between unit vectors): what the closed form stands for.
    users, items = _two_groups(1)
    x = collaborative.ease_vectors(users, items, 20, dim=21, l2=5.0, beta=0.0).astype(np.float64)
    matrix = np.zeros((40, 20))
    matrix[users, items] = 1.0
    p = np.linalg.inv(matrix.T @ matrix + 5.0 * np.eye(20))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    w, v = np.linalg.eigh((b + b.T) / 2)
    positive = (v * np.maximum(w, 0.0)) @ v.T
    norms = np.sqrt(np.diag(positive))
    assert np.allclose(matrix @ x @ x.T, matrix @ (positive / np.outer(norms, norms)), atol=1e-4)


def test_a_bad_dim_is_refused_and_a_small_catalogue_is_padded():
    with pytest.raises(ValueError, match="dim"):
        collaborative.ease_vectors(np.zeros(1, int), np.zeros(1, int), 3, 1)
    users, items = _two_groups()
    small = collaborative.ease_vectors(users, items, 20, dim=32, l2=5.0)
    assert small.shape == (20, 32) and np.allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
    full = collaborative.ease_vectors(users, items, 20, dim=21, l2=5.0)
    assert np.array_equal(small[:, :20], full[:, :20]) and not small[:, 20:31].any()


def test_items_beyond_the_anchors_are_folded_in_by_ridge_regression():
    users, items = _two_groups(2)
    factors = collaborative.Factors(users, items, 22, dim=6, anchors=8)  # items 20, 21: no interactions
    vectors, solver = factors.table(beta=0.5)
    counts = np.bincount(items, minlength=22)
    assert len(factors.anchors) == 8 and set(factors.anchors) <= set(np.argsort(-counts, kind="stable")[:8])
    assert np.isnan(vectors[20:]).all() and np.isfinite(vectors[:20]).all()
    anchors = np.zeros((40, 22))
    anchors[users, items] = 1.0
    taken = anchors.copy()
    anchors[:, np.setdiff1d(np.arange(22), factors.anchors)] = 0.0
    expected_anchors = collaborative.ease_vectors(*np.nonzero(anchors[:, factors.anchors]), 8, dim=6, beta=0.5)
    assert np.allclose(vectors[factors.anchors], expected_anchors, atol=1e-5)
    u = anchors[:, factors.anchors] @ vectors[factors.anchors]  # each user's summed anchor vectors
    x = (taken[:, factors.rest].T @ u) @ np.linalg.inv(u.T @ u + collaborative.FOLD_L2 * np.eye(6)).T
    assert np.allclose(vectors[factors.rest], x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-5)
    assert np.allclose(solver, np.linalg.inv(u.T @ u + collaborative.FOLD_L2 * np.eye(6)), rtol=1e-4)
    # Folded-in items still sit with their group.
    same = [j for j in factors.rest if j < 10]
    if same:
        assert (vectors[same] @ vectors[factors.anchors[factors.anchors < 10]].mean(0)
                > vectors[same] @ vectors[factors.anchors[factors.anchors >= 10]].mean(0)).all()


@pytest.mark.slow
def test_alignment_keeps_the_closed_form_vectors_fixed_and_saves_them(tmp_path):
    catalog, train, val = _data()
    config = dataclasses.replace(SMALL, cf_beta=0.6, content_dim=5)
    fitted = align.fit(catalog, train, val, config)
    expected, _ = collaborative.Factors(train[0], train[1], len(catalog.item_ids), SMALL.dim).table(0.6)
    out = fitted.apply(catalog.item_ids, catalog.features)
    j = fitted.modalities.index(align.CF)
    # content heads write cf's 4 leading coordinates and its popularity one (the last), nothing between
    content = np.delete(out["aligned"], j, axis=1)
    assert not content[..., 4:SMALL.dim - 1].any() and content[..., :4].any() and content[..., -1].any()
    cf_items = np.unique(train[1])
    assert np.allclose(out["aligned"][cf_items, j], expected[cf_items], atol=1e-6)
    assert not out["mask"][np.setdiff1d(np.arange(len(catalog.item_ids)), cf_items), j].any()
    fitted.save(tmp_path / "alignment")  # the table is saved beside the model and applies as fitted
    assert sorted(p.name for p in (tmp_path / "alignment").iterdir()) == [
        "alignment.json", "alignment.keras", "cf.parquet", "cf_solver.npy"]
    assert "cf_items" not in (tmp_path / "alignment" / "alignment.json").read_text()
    again = align.load(tmp_path / "alignment").apply(catalog.item_ids, catalog.features)
    assert np.allclose(again["fused"], out["fused"], atol=1e-6) and again["weights"].shape == out["weights"].shape
    # A folded-in cf vector given with an item the table does not hold is used; the table's own win.
    given = np.tile(expected[cf_items[:1]], (len(catalog.item_ids), 1))
    with_given = fitted.apply(catalog.item_ids, {**catalog.features, align.CF: given})
    assert with_given["mask"][:, j].all()
    assert np.allclose(with_given["aligned"][cf_items, j], expected[cf_items], atol=1e-6)


def test_pipeline_options_set_the_caps_and_leave_choices_to_validation():
    from apache_beam.options.pipeline_options import PipelineOptions

    from mmfuse.pipelines.align import align_config
    from mmfuse.pipelines.config import Config
    from mmfuse.transforms.contract import ContractError

    def settings(options):
        a = Config.parse(options).align
        return a.kind, align_config(a)

    kind, config = settings(PipelineOptions(["--cf_beta=0.5", "--dim=32", "--fit_minutes=2", "--cf_anchors=500"]))
    assert (kind, config.cf_beta, config.dim, config.max_seconds, config.cf_anchors) == (
        "contrastive", 0.5, 32, 120.0, 500)
    default = settings(PipelineOptions([]))[1]
    assert (default.cf_beta, default.dim, default.fusion, default.collaborative) == (None, None, "auto", True)
    assert settings(PipelineOptions(["--align=pca"]))[1].dim == align.DEFAULT_DIM
    # the dims a fit may choose keep the night's exact top-k (2 x dim x (users + items) x items) in budget
    budget = Config.parse(PipelineOptions([])).align.dim_budget_tflop * 1e12
    assert align.affordable_dims(20_000, 100_000, budget) == align.DIMS == (64, 128, 256)
    assert align.affordable_dims(200_000, 1_000_000, budget) == (64,)
    assert align.affordable_dims(100_000, 500_000, budget) == (64, 128)
    with pytest.raises(ContractError, match="cf_beta"):
        settings(PipelineOptions(["--cf_beta=1.5"]))
    with pytest.raises(ContractError, match="fit_events"):
        settings(PipelineOptions(["--fit_events=0"]))
    with pytest.raises(ContractError, match="needs --align=contrastive"):
        settings(PipelineOptions(["--align=pca", "--fusion=auto"]))
