"""Alignment and fusion: missing modalities, the fusion arithmetic, reproducible fits, saved artifacts
that apply to new items exactly as the fitted model does, and the tf.Transform PCA against numpy."""
import dataclasses

import numpy as np
import pytest

from mmfuse.models import align
from mmfuse.transforms.pca import fit_in_memory

SMALL = align.AlignConfig(dim=8, hidden=16, epochs=3, users_per_batch=64, history=5, seed=3)


def _data(n_items=90, n_users=40, seed=0):
    """Items with text/image/audio vectors that share a hidden factor, and users who like one factor."""
    rng = np.random.default_rng(seed)
    factor = rng.integers(0, 4, n_items)
    centres = rng.normal(size=(4, 12))
    features = {m: (centres[factor] @ rng.normal(size=(12, d)) + 0.3 * rng.normal(size=(n_items, d))).astype(np.float32)
                for m, d in (("text", 10), ("image", 14), ("audio", 6))}
    users = np.repeat(np.arange(n_users), 12)
    items = np.array([rng.choice(np.flatnonzero(factor == u % 4), 12) for u in range(n_users)]).ravel()
    stamps = np.tile(np.arange(12), n_users) + 100 * users
    catalog = align.Catalog(np.array([f"i{i:03d}" for i in range(n_items)]), features)
    late = np.tile(np.arange(12) >= 10, n_users)
    return catalog, (users[~late], items[~late], stamps[~late]), (users[late], items[late], stamps[late])


@pytest.fixture(scope="module")
def fitted():
    catalog, train, val = _data()
    return catalog, train, val, align.fit(catalog, train, val, SMALL)


def _check_items(out, present):
    assert np.isfinite(out["fused"]).all()
    assert np.allclose(np.linalg.norm(out["fused"], axis=1), 1.0, atol=1e-5)
    assert np.allclose(out["weights"].sum(1), 1.0, atol=1e-5)
    assert (out["weights"][~present] == 0).all() and (out["weights"][present] > 0).all()
    assert np.allclose(out["parts"].sum(1), out["fused"], atol=1e-5)
    assert (out["parts"][~present] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["attention", "mean", "weighted"])
def test_each_missing_modality_in_turn(fitted, fusion):
    catalog, train, val, model = fitted
    if fusion != "attention":
        weights = {"text": 3.0, "image": 1.0, "audio": 1.0, align.CF: 2.0}
        model = align.fit(catalog, train, val, dataclasses.replace(SMALL, fusion=fusion, fusion_weights=weights))
    names = model.modalities
    assert names == ["text", "image", "audio", align.CF]
    for gone in ("text", "image", "audio"):
        features = dict(catalog.features, **{gone: np.full_like(catalog.features[gone], np.nan)})
        out = model.apply(catalog.item_ids, features)
        present = out["mask"] > 0
        assert not present[:, names.index(gone)].any()
        _check_items(out, present)
    # An item with only one modality (here: a new item with text only, so no cf either) gets that one, weight 1.
    lone = {m: np.full((1, v.shape[1]), np.nan, np.float32) for m, v in catalog.features.items()}
    lone["text"] = catalog.features["text"][:1]
    out = model.apply(["new"], lone)
    assert out["weights"][0].tolist() == [1.0, 0.0, 0.0, 0.0]
    _check_items(out, out["mask"] > 0)
    if fusion == "mean":  # two present modalities weigh the same
        both = model.apply(catalog.item_ids[:1], {m: v[:1] for m, v in catalog.features.items()})
        assert np.allclose(both["weights"][0], 0.25)
    if fusion == "weighted":  # 3:1:1:2 renormalised over the present ones
        both = model.apply(catalog.item_ids[:1], {m: v[:1] for m, v in catalog.features.items()})
        assert np.allclose(both["weights"][0], [3 / 7, 1 / 7, 1 / 7, 2 / 7], atol=1e-6)


@pytest.mark.slow
def test_collaborative_modality_only_for_trained_items(fitted):
    catalog, train, _, model = fitted
    out = model.apply(catalog.item_ids, catalog.features)
    has_cf = out["mask"][:, model.modalities.index(align.CF)] > 0
    assert np.array_equal(has_cf, np.isin(np.arange(len(catalog.item_ids)), train[1]))


@pytest.mark.slow
def test_same_seed_same_vectors_and_saved_artifact_applies_to_new_items(fitted, tmp_path):
    catalog, train, val, model = fitted
    again = align.fit(catalog, train, val, SMALL)
    first = model.apply(catalog.item_ids, catalog.features)["fused"]
    assert np.allclose(again.apply(catalog.item_ids, catalog.features)["fused"], first, atol=1e-5)
    other = align.fit(catalog, train, val, dataclasses.replace(SMALL, seed=4))
    assert not np.allclose(other.apply(catalog.item_ids, catalog.features)["fused"], first, atol=1e-3)

    model.save(tmp_path / "artifact")
    loaded = align.load(tmp_path / "artifact")
    assert loaded.metrics == model.metrics and loaded.modalities == model.modalities
    # A new item, alone in its batch, through the saved artifact = what the fitted model gives it among others.
    new_features = {m: np.concatenate([v, v[:1] * 0.5]) for m, v in catalog.features.items()}
    ids = np.append(catalog.item_ids, "brand-new")
    in_context = model.apply(ids, new_features)
    alone = loaded.apply(["brand-new"], {m: v[-1:] for m, v in new_features.items()})
    for key in ("fused", "weights", "parts"):
        assert np.allclose(alone[key][0], in_context[key][-1], atol=1e-6)
    assert alone["mask"][0, loaded.modalities.index(align.CF)] == 0  # never trained on: no cf vector


@pytest.mark.slow
def test_training_reduces_both_losses(fitted):
    metrics = fitted[3].metrics
    assert metrics["val_loss"][-1] < metrics["val_loss"][0] and metrics["loss"][-1] < metrics["loss"][0]


def test_examples_are_earlier_items_in_time_order():
    # User 0: items 5, 6, 7 at times 3, 1, 2 -> order 6, 7, 5; user 1: item 9 alone (no example).
    histories, targets, index = align.examples(np.array([0, 0, 0, 1]), np.array([5, 6, 7, 9]),
                                               np.array([3, 1, 2, 0]), history=2)
    assert targets.tolist() == [7, 5] and index.tolist() == [2, 0]
    assert histories.tolist() == [[-1, 6], [6, 7]]


@pytest.mark.slow
def test_pca_alignment_matches_numpy():
    catalog, _, _ = _data()
    features = dict(catalog.features)
    features["image"] = features["image"].copy()
    features["image"][::5] = np.nan  # tft.pca is fitted on the items that have the modality
    catalog = align.Catalog(catalog.item_ids, features)
    pca = fit_in_memory(catalog, dim=4)
    out = pca.apply(catalog.item_ids, catalog.features)
    for j, m in enumerate(pca.modalities):
        x = catalog.features[m]
        ok = ~np.isnan(x).any(1)
        z = (x[ok] - x[ok].mean(0)) / x[ok].std(0)
        _, vecs = np.linalg.eigh(np.cov(z, rowvar=False))
        y = z @ vecs[:, ::-1][:, :4]
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        # Components are defined up to sign: compare item-item cosines, which do not depend on it.
        assert np.allclose(out["aligned"][ok, j] @ out["aligned"][ok, j].T, y @ y.T, atol=1e-3)
    _check_items(out, out["mask"] > 0)


@pytest.mark.slow
def test_pca_pads_a_modality_with_fewer_dimensions_than_the_shared_space():
    catalog, _, _ = _data()  # audio has 6 dimensions, the shared space 8
    pca = fit_in_memory(catalog, dim=8)
    out = pca.apply(catalog.item_ids, catalog.features)
    assert out["aligned"].shape == (len(catalog.item_ids), 3, 8) and out["fused"].shape == (len(catalog.item_ids), 8)
    audio = out["aligned"][:, pca.modalities.index("audio")]
    assert np.allclose(audio[:, 6:], 0) and np.allclose(np.linalg.norm(audio, axis=1), 1, atol=1e-5)
    _check_items(out, out["mask"] > 0)


@pytest.mark.slow
def test_choices_are_made_on_validation_and_saved(tmp_path):
    catalog, train, val = _data()
    fitted = align.fit_and_refit(catalog, train, val, dataclasses.replace(SMALL, dim=None))
    chosen = fitted.metrics["chosen_on_validation"]
    best = lambda figures, key="ndcg@20": max(figures, key=lambda name: figures[name][key])  # noqa: E731
    assert sorted(chosen["cf"]) == sorted(f"dim={d} cf_beta={b}" for d in align.DIMS for b in align.CF_BETAS)
    assert best(chosen["cf"]) == f"dim={fitted.config.dim} cf_beta={fitted.config.cf_beta}"
    assert fitted.apply(catalog.item_ids, catalog.features)["fused"].shape == (len(catalog.item_ids), fitted.config.dim)
    candidates = align._fusions(fitted.modalities)
    assert set(chosen["fusion"]) == set(candidates) and len(candidates) == 1 + 3 * 7  # 3 content modalities
    leading = {"cf": 0.7, "text": 0.24, "image": 0.03, "audio": 0.03}
    assert candidates["weighted cf 0.7 text 0.8"] == pytest.approx(leading)
    for figures in chosen["fusion"].values():  # warm and cold validation figures of each candidate
        assert figures["warm + cold ndcg@20"] == pytest.approx(figures["ndcg@20"] + figures["cold ndcg@20"], abs=2e-4)
    chosen_name = best(chosen["fusion"], "warm + cold ndcg@20")
    if chosen_name == "attention":
        assert fitted.config.fusion == fitted.model.fusion == "attention"
    else:
        assert fitted.model.fusion == "weighted" and fitted.config.fusion_weights == candidates[chosen_name]
    fitted.save(tmp_path)
    assert align.load(tmp_path).config == fitted.config  # the choices travel with the artifact


@pytest.mark.slow
def test_training_time_is_bounded():
    catalog, train, val = _data()
    fitted = align.fit(catalog, train, val, dataclasses.replace(SMALL, epochs=40, patience=40, max_seconds=1e-3))
    assert fitted.metrics["stopped_by_time"] and len(fitted.metrics["loss"]) == 1
    assert not align.fit(catalog, train, val, SMALL).metrics["stopped_by_time"]


def test_fusion_splits_each_vector_into_its_modalities_parts():
    """The arithmetic every artifact fuses with: weights renormalise over the present modalities, the parts
    sum to the unit fused vector, and an item with nothing present gets zeros."""
    rng = np.random.default_rng(0)
    aligned = rng.normal(size=(4, 3, 5)).astype(np.float32)
    aligned /= np.linalg.norm(aligned, axis=-1, keepdims=True)
    mask = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0]], np.float32)
    logits = np.broadcast_to(align.fixed_logits(["text", "image", "cf"], "weighted",
                                                {"text": 0.2, "image": 0.3, "cf": 0.5}), mask.shape)
    fused, weights, parts = (np.asarray(x) for x in align.fuse(aligned * mask[..., None], mask, logits))
    np.testing.assert_allclose(weights[0], [0.2, 0.3, 0.5], atol=1e-6)
    np.testing.assert_allclose(weights[1], [0.2 / 0.7, 0, 0.5 / 0.7], atol=1e-6)
    np.testing.assert_allclose(weights[2], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(parts.sum(1), fused, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fused[:3], axis=1), 1.0, atol=1e-6)
    assert not fused[3].any() and not weights[3].any()
    for weights in align._fusions(["text", "image", "cf"]).values():
        assert weights is None or np.isclose(sum(weights.values()), 1.0)
