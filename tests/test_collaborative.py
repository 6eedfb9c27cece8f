"""Closed-form collaborative vectors (issue 4): what their geometry must show, and the alignment keeping them fixed."""
import dataclasses

import numpy as np
import pytest

from models import align, collaborative
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


def test_too_many_items_or_a_bad_dim_is_refused_and_a_small_catalogue_is_padded():
    with pytest.raises(ValueError, match="learned cf"):
        collaborative.ease_vectors(np.zeros(1, int), np.zeros(1, int), collaborative.MAX_ITEMS + 1, 8)
    with pytest.raises(ValueError, match="dim"):
        collaborative.ease_vectors(np.zeros(1, int), np.zeros(1, int), 3, 1)
    users, items = _two_groups()
    small = collaborative.ease_vectors(users, items, 20, dim=32, l2=5.0)
    assert small.shape == (20, 32) and np.allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
    full = collaborative.ease_vectors(users, items, 20, dim=21, l2=5.0)
    assert np.array_equal(small[:, :20], full[:, :20]) and not small[:, 20:31].any()


def test_alignment_keeps_the_closed_form_vectors_fixed(tmp_path):
    catalog, train, val = _data()
    config = dataclasses.replace(SMALL, cf_vectors="ease", cf_beta=0.6)
    fitted = align.fit(catalog, train, val, config)
    cf_items = np.unique(train[1])
    expected = collaborative.ease_vectors(train[0], np.searchsorted(cf_items, train[1]), len(cf_items), SMALL.dim,
                                          beta=0.6)
    out = fitted.apply(catalog.item_ids, catalog.features)
    j = fitted.modalities.index(align.CF)
    assert np.allclose(out["aligned"][cf_items, j], expected, atol=1e-6)
    assert not out["mask"][np.setdiff1d(np.arange(len(catalog.item_ids)), cf_items), j].any()
    fitted.save(tmp_path / "alignment")  # the frozen table is saved and applies as fitted
    again = align.load(tmp_path / "alignment").apply(catalog.item_ids, catalog.features)
    assert np.allclose(again["fused"], out["fused"], atol=1e-6) and again["weights"].shape == out["weights"].shape


def test_pipeline_options_choose_closed_form_vectors():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.align import settings
    from transforms.contract import ContractError
    kind, config = settings(PipelineOptions(["--cf_vectors=ease", "--cf_beta=0.5", "--dim=32"]))
    assert (kind, config.cf_vectors, config.cf_beta, config.dim) == ("contrastive", "ease", 0.5, 32)
    assert settings(PipelineOptions([]))[1].cf_vectors == "learned"
    with pytest.raises(ContractError, match="cf_beta"):
        settings(PipelineOptions(["--cf_vectors=ease", "--cf_beta=1.5"]))
