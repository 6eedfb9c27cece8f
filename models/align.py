"""Learned alignment and fusion: one vector space for every modality, including a collaborative one.

Each content modality gets a projection head (z-score, then linear or a small MLP) into ``dim``; the
collaborative modality (``cf``) is an item embedding learned from interactions, present only for items
seen in training. Fusion weights the unit-length aligned vectors of the modalities an item has (mean, fixed
weights, or a learned gate) and renormalises. Training combines two InfoNCE losses with in-batch
negatives: CLIP-style between every pair of modalities an item has, and between a user's history (the mean
of the fused vectors of earlier items, which is how user vectors are made downstream) and the item that
came next. Modalities are dropped at random while training, so an item missing one still lands in the
same space. Only ``keras.ops``: it runs on any Keras backend. Nothing here knows about Beam.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import keras
import numpy as np
from keras import layers, ops

from models import collaborative

CF = "cf"  # name of the collaborative modality
MODEL_FILE, CONFIG_FILE = "alignment.keras", "alignment.json"
PAD_ITEMS = 256
KIND = "contrastive"


def fuse(aligned, mask, logits):
    """Fuse (n, m, d) unit vectors over the present modalities (mask (n, m) of 0/1) with softmax(logits).

    Returns (fused (n, d) unit vectors, weights (n, m) summing to 1 over present modalities, parts (n, m, d)
    with sum over m == fused): part_m = w_m * aligned_m / |sum_k w_k * aligned_k|, so a score against the
    fused vector splits exactly into per-modality contributions. Items with no modality get zeros.
    """
    logits = ops.where(mask > 0, logits, -1e9)
    weights = ops.exp(logits - ops.max(logits, axis=-1, keepdims=True)) * mask  # softmax over present ones
    weights = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-12)
    raw = ops.sum(weights[..., None] * aligned, axis=1)
    norm = ops.maximum(ops.sqrt(ops.sum(raw * raw, axis=-1, keepdims=True)), 1e-12)
    return raw / norm, weights, weights[..., None] * aligned / norm[:, None, :]


def fixed_logits(modalities: Sequence[str], fusion: str, fusion_weights: Mapping[str, float]) -> np.ndarray:
    """Logits of the mean (all zero) or weighted fusion (log of each weight; 0 weight -> never used)."""
    if fusion == "mean":
        return np.zeros(len(modalities), np.float32)
    missing = set(modalities) - set(fusion_weights)
    if missing:
        raise ValueError(f"--fusion_weights has no weight for {sorted(missing)}")
    return np.log(np.maximum([float(fusion_weights[m]) for m in modalities], 1e-30)).astype(np.float32)


@keras.saving.register_keras_serializable("mmfuse")
class Standardize(layers.Layer):
    """Elementwise z-score with statistics fixed at fit time (stored as weights, so saved with the model)."""

    def build(self, input_shape):
        d = input_shape[-1]
        self.mean = self.add_weight(shape=(d,), initializer="zeros", trainable=False, name="mean")
        self.scale = self.add_weight(shape=(d,), initializer="ones", trainable=False, name="scale")

    def call(self, x):
        return (x - self.mean) * self.scale


@keras.saving.register_keras_serializable("mmfuse")
class AlignmentModel(keras.Model):
    """Inputs: ``{m: (n, d_m)}`` per content modality (zeros where absent), ``mask`` (n, M) presence in
    ``modalities`` order, ``cf`` (n,) int32 row of the item's collaborative vector (0: none).
    Output: ``{"aligned": (n, M, dim) unit vectors, "weights": (n, M), "fused": (n, dim), "parts": ...}``."""

    def __init__(self, dims: dict, dim: int = 64, hidden: int = 256, n_cf: int = 0, fusion: str = "attention",
                 logits: Sequence[float] | None = None, temperature: float = 0.1, fixed_cf: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.dims, self.dim, self.hidden, self.n_cf, self.fixed_cf = dict(dims), dim, hidden, n_cf, fixed_cf
        self.fusion, self.temperature = fusion, temperature
        self.modalities = list(self.dims) + ([CF] if n_cf else [])
        self.logits = None if logits is None else [float(v) for v in logits]
        self.standardize = {m: Standardize(name=f"z_{m}") for m in self.dims}
        self.heads = {m: keras.Sequential(([layers.Dense(hidden, activation="gelu")] if hidden else [])
                                          + [layers.Dense(dim)], name=f"head_{m}") for m in self.dims}
        if n_cf:
            self.cf_table = layers.Embedding(n_cf + 1, dim, name="cf_table", trainable=not fixed_cf)
        if fusion == "attention":  # a score per (item, modality) from the aligned vector, plus a modality bias
            self.gate = keras.Sequential([layers.Dense(32, activation="tanh"), layers.Dense(1)], name="gate")
            self.gate_bias = self.add_weight(shape=(len(self.modalities),), initializer="zeros", name="gate_bias")

    def set_statistics(self, stats: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Fix the z-score (mean, std) of each content modality."""
        for m, (mean, std) in stats.items():
            self.standardize[m].build((None, len(mean)))
            self.standardize[m].set_weights([mean.astype(np.float32), (1.0 / np.maximum(std, 1e-6)).astype(np.float32)])

    def call(self, inputs):
        mask = ops.cast(inputs["mask"], "float32")
        vectors = [self.heads[m](self.standardize[m](inputs[m])) for m in self.dims]
        if self.n_cf:
            vectors.append(self.cf_table(inputs["cf"]))
        aligned = ops.stack(vectors, axis=1)
        aligned = aligned / ops.maximum(ops.sqrt(ops.sum(aligned * aligned, axis=-1, keepdims=True)), 1e-12)
        aligned = aligned * mask[..., None]
        if self.fusion == "attention":
            logits = ops.squeeze(self.gate(aligned), -1) + self.gate_bias
        else:
            logits = ops.zeros_like(mask) + ops.convert_to_tensor(np.asarray(self.logits, np.float32))
        fused, weights, parts = fuse(aligned, mask, logits)
        return {"aligned": aligned, "weights": weights, "fused": fused, "parts": parts}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Contrastive loss between modalities of the batch's first items (``contrast`` marks the real
        ones among them) plus the interaction loss between each user's ``history`` (indices into the batch,
        -1 padded) and ``target``."""
        contrast = ops.cast(x["contrast"], "float32")
        n = ops.shape(contrast)[0]  # only these rows enter the (n x n) contrastive logits: they dominate a step
        present = ops.cast(x["mask"], "float32")  # (items, M); padding rows have no modality
        aligned, mask = y_pred["aligned"][:n], present[:n]
        total, pairs = 0.0, 0
        for a in range(len(self.modalities)):
            for b in range(a + 1, len(self.modalities)):
                valid = mask[:, a] * mask[:, b] * contrast
                logits = ops.matmul(aligned[:, a], ops.transpose(aligned[:, b])) / self.temperature
                total = total + _info_nce(logits, valid) + _info_nce(ops.transpose(logits), valid)
                pairs += 2
        fused = y_pred["fused"]
        history = x["history"]
        taken = ops.cast(history >= 0, "float32")
        users = ops.sum(ops.take(fused, ops.maximum(history, 0), axis=0) * taken[..., None], axis=1)
        users = users / ops.maximum(ops.sqrt(ops.sum(users * users, axis=-1, keepdims=True)), 1e-12)
        # (B,) row of each user's next item, scored against every real item of the step: close to the whole
        # catalogue, so popular items are not over-used as negatives the way
        # in-batch targets alone would use them.
        targets = x["target"]
        logits = ops.matmul(users, ops.transpose(fused)) / self.temperature
        logits = ops.where(ops.sum(present, axis=-1)[None, :] > 0, logits, -1e9)
        per_user = ops.logsumexp(logits, axis=-1) - ops.take_along_axis(logits, targets[:, None], 1)[:, 0]
        interaction = ops.sum(per_user) / ops.maximum(ops.cast(ops.shape(targets)[0], "float32"), 1.0)
        return (total / max(pairs, 1) if pairs else 0.0) + interaction

    def get_config(self):
        return {**super().get_config(), "dims": self.dims, "dim": self.dim, "hidden": self.hidden,
                "n_cf": self.n_cf, "fusion": self.fusion, "logits": self.logits, "temperature": self.temperature,
                "fixed_cf": self.fixed_cf}


def _info_nce(logits, valid):
    """Mean over valid rows of cross-entropy with the diagonal as the label; invalid columns are excluded."""
    logits = ops.where(valid[None, :] > 0, logits, -1e9)
    per_row = ops.logsumexp(logits, axis=-1) - ops.diagonal(logits)
    return ops.sum(per_row * valid) / ops.maximum(ops.sum(valid), 1.0)


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """Everything a fit depends on; stored with the artifact."""

    dim: int = 64
    hidden: int = 256  # 0: linear heads
    fusion: str = "attention"
    fusion_weights: dict = dataclasses.field(default_factory=dict)
    collaborative: bool = True  # a cf modality for items seen in training interactions
    cf_vectors: str = "learned"  # "learned" with the heads, or "ease": closed form (models.collaborative), held fixed
    cf_beta: float = 0.75  # "ease": how far popularity tilts the vectors (validation on MovieLens: 0.75 at dim 64, 0.5 at 256)
    temperature: float = 0.1
    modality_dropout: float = 0.3
    history: int = 30  # most recent earlier items forming a training user's history
    users_per_batch: int = 1024  # each step embeds every item its examples touch: big batches amortise it
    epochs: int = 40
    patience: int = 3
    learning_rate: float = 5e-3
    seed: int = 0


@dataclasses.dataclass
class Catalog:
    """Content vectors of ``item_ids`` per modality, NaN rows where an item lacks the modality."""

    item_ids: np.ndarray
    features: dict[str, np.ndarray]

    def present(self) -> np.ndarray:
        return np.stack([~np.isnan(self.features[m]).any(1) for m in self.features], 1)


class Aligner:
    """A fitted alignment: the Keras model plus what maps items onto its inputs (the cf vocabulary)."""

    def __init__(self, model: AlignmentModel, cf_items: Sequence[str], config: AlignConfig, metrics: dict):
        self.model, self.config, self.metrics = model, config, metrics
        self.cf_index = {item: i + 1 for i, item in enumerate(cf_items)}

    @property
    def modalities(self) -> list[str]:
        return self.model.modalities

    @property
    def input_dims(self) -> dict[str, int]:
        return self.model.dims

    def inputs(self, item_ids: Sequence[str], features: Mapping[str, np.ndarray]) -> dict:
        """Model inputs for items whose ``features[m]`` rows are NaN where the modality is absent."""
        out, present = {}, []
        for m in self.model.dims:
            x = np.asarray(features[m], np.float32)
            ok = ~np.isnan(x).any(1)
            out[m], present = np.where(ok[:, None], x, 0.0).astype(np.float32), present + [ok]
        cf = np.asarray([self.cf_index.get(i, 0) for i in item_ids], np.int32)
        if self.model.n_cf:
            present.append(cf > 0)
        out["cf"], out["mask"] = cf, np.stack(present, 1).astype(np.float32)
        return out

    def apply(self, item_ids: Sequence[str], features: Mapping[str, np.ndarray], batch_size: int = 1024) -> dict:
        """``{"fused", "weights", "parts", "aligned", "mask"}`` as numpy arrays, in ``item_ids`` order."""
        inputs = self.inputs(item_ids, features)
        chunks = []
        for start in range(0, len(item_ids), batch_size):
            part = {k: v[start:start + batch_size] for k, v in inputs.items()}
            chunks.append({k: np.asarray(v) for k, v in self.model.predict_on_batch(part).items()})
        out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        out["mask"] = inputs["mask"]
        return out

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save(folder / MODEL_FILE)
        cf_items = sorted(self.cf_index, key=self.cf_index.get)
        (folder / CONFIG_FILE).write_text(json.dumps({"kind": KIND, "config": dataclasses.asdict(self.config),
                                                      "cf_items": cf_items,
                                                      "modalities": self.modalities, "metrics": self.metrics},
                                                     indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> Aligner:
        folder = Path(folder)
        meta = json.loads((folder / CONFIG_FILE).read_text())
        model = keras.saving.load_model(folder / MODEL_FILE)
        return cls(model, meta["cf_items"], AlignConfig(**meta["config"]), meta["metrics"])


class _Batches(keras.utils.PyDataset):
    """Training steps: a batch of (history, next item) examples and the items they touch.

    Each step's items are the targets (deduplicated: the contrastive batch) followed by the history items,
    all of them negatives of the interaction loss; each item's modalities are dropped at random
    (keeping one) when training. Every step is a pure function of (seed, epoch, step): reproducible.
    """

    def __init__(self, aligner: Aligner, catalog: Catalog, examples: tuple[np.ndarray, np.ndarray],
                 config: AlignConfig, train: bool):
        super().__init__()
        self.aligner, self.config, self.train = aligner, config, train
        self.inputs = aligner.inputs(catalog.item_ids, catalog.features)
        self.histories, self.targets = examples
        self.epoch = 0

    def __len__(self):
        # Without any (history, next item) example (e.g. every user has one interaction) the steps walk the
        # catalog for the contrastive loss alone.
        n = len(self.targets) or len(self.inputs["mask"])
        return max(1, math.ceil(n / self.config.users_per_batch))

    def on_epoch_end(self):
        self.epoch += 1

    def __getitem__(self, step):
        c = self.config
        rng = np.random.default_rng([c.seed, self.epoch if self.train else 0, step, int(self.train)])
        n = len(self.targets) or len(self.inputs["mask"])
        order = np.random.default_rng([c.seed, self.epoch]).permutation(n) if self.train else np.arange(n)
        chosen = order[step * c.users_per_batch:(step + 1) * c.users_per_batch]
        if len(self.targets):
            targets, histories = self.targets[chosen], self.histories[chosen]
        else:
            targets, histories = np.sort(chosen), np.zeros((0, c.history), np.int64)
        unique_targets, target_slot = np.unique(targets, return_inverse=True)
        extra = np.setdiff1d(np.unique(histories[histories >= 0]), unique_targets)
        items = np.concatenate([unique_targets, extra])
        # Pad to a multiple of PAD_ITEMS, and to at least the contrastive rows (absent rows, outside the
        # contrast set): few shapes, few retraces.
        size = max(c.users_per_batch, len(items) + (-len(items) % PAD_ITEMS))
        items = np.concatenate([items, np.full(size - len(items), items[0])])
        slot = np.full(len(self.inputs["mask"]), -1, np.int64)
        slot[items[::-1]] = np.arange(len(items))[::-1]  # an item's first row (padding repeats items[0])
        history = np.where(histories >= 0, slot[np.maximum(histories, 0)], -1)
        batch = {k: v[items] for k, v in self.inputs.items()}
        if self.train and c.modality_dropout:
            batch["mask"] = _drop_modalities(batch["mask"], c.modality_dropout, rng)
        batch["mask"][len(unique_targets) + len(extra):] = 0.0
        if not len(self.targets):
            target_slot = np.zeros(0, np.int64)
        batch.update(history=history.astype(np.int32), target=target_slot.astype(np.int32),
                     contrast=(np.arange(c.users_per_batch) < len(unique_targets)).astype(np.float32))
        return batch


def _drop_modalities(mask: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Zero each present modality with probability ``p``, always keeping at least one per item."""
    keep = mask * (rng.random(mask.shape) >= p)
    lost = (keep.sum(1) == 0) & (mask.sum(1) > 0)
    choice = np.argmax(mask[lost] * rng.random(mask[lost].shape), axis=1)
    keep[np.flatnonzero(lost), choice] = 1.0
    return keep.astype(np.float32)


def examples(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray,
             history: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(histories (n, history) item rows, -1 padded; targets (n,); each target's index in the inputs): every
    interaction after a user's first, with the ``history`` most recent earlier items of that user (time
    order, ties by item)."""
    order = np.lexsort((item, timestamp, user))
    user, item = user[order], item[order]
    start = np.r_[True, user[1:] != user[:-1]]
    first = np.maximum.accumulate(np.where(start, np.arange(len(user)), 0))
    rows = np.flatnonzero(~start)
    offsets = rows[:, None] - np.arange(history, 0, -1)[None, :]
    valid = offsets >= first[rows][:, None]
    return np.where(valid, item[np.maximum(offsets, 0)], -1), item[rows], order[rows]


def fit(catalog: Catalog, train: tuple[np.ndarray, np.ndarray, np.ndarray],
        validation: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        config: AlignConfig = AlignConfig(), log_dir: str | None = None) -> Aligner:
    """Fit the alignment on ``catalog`` and interactions given as (user, item row, timestamp) arrays.

    ``validation`` interactions come after each user's training ones; the loss on them (histories from
    train + validation in time order) drives early stopping. Returns the best epoch's weights.
    """
    keras.utils.set_random_seed(config.seed)
    dims = {m: catalog.features[m].shape[1] for m in catalog.features}
    cf_items = (np.unique(train[1]) if config.collaborative else np.array([], np.int64))
    logits = None if config.fusion == "attention" else fixed_logits(
        list(dims) + ([CF] if len(cf_items) else []), config.fusion, config.fusion_weights).tolist()
    fixed_cf = bool(len(cf_items)) and config.cf_vectors == "ease"
    model = AlignmentModel(dims, config.dim, config.hidden, len(cf_items), config.fusion, logits, config.temperature,
                           fixed_cf)
    present = catalog.present()
    model.set_statistics({m: (np.nanmean(catalog.features[m][present[:, j]], 0), np.nanstd(catalog.features[m][present[:, j]], 0))
                          for j, m in enumerate(dims)})
    aligner = Aligner(model, catalog.item_ids[cf_items].tolist(), config, {})
    data = _Batches(aligner, catalog, examples(*train, config.history)[:2], config, train=True)
    callbacks, val = [], None
    if validation is not None:
        both = tuple(np.concatenate([a, b]) for a, b in zip(train, validation))
        histories, targets, index = examples(*both, config.history)
        later = index >= len(train[0])
        val = _Batches(aligner, catalog, (histories[later], targets[later]), config, train=False)
        callbacks.append(keras.callbacks.EarlyStopping(patience=config.patience, restore_best_weights=True))
    if log_dir:
        callbacks.append(keras.callbacks.TensorBoard(log_dir))
    if fixed_cf:
        rows = np.searchsorted(cf_items, train[1])
        model.cf_table.build((None,))
        model.cf_table.set_weights([np.r_[np.zeros((1, config.dim), np.float32),
                                          collaborative.ease_vectors(train[0], rows, len(cf_items), config.dim,
                                                                      beta=config.cf_beta)]])
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    history = model.fit(data, validation_data=val, epochs=config.epochs, callbacks=callbacks, verbose=0, shuffle=False)
    aligner.metrics = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    return aligner


def fit_and_refit(catalog: Catalog, train: tuple[np.ndarray, np.ndarray, np.ndarray],
                  validation: tuple[np.ndarray, np.ndarray, np.ndarray],
                  config: AlignConfig = AlignConfig(), log_dir: str | None = None) -> Aligner:
    """Find the number of epochs by early stopping on ``validation`` (interactions after ``train``), then
    refit on both for that many epochs: the most recent interactions are the most telling, so they are
    not left out of the model that is kept."""
    both = tuple(np.concatenate([a, b]) for a, b in zip(train, validation))
    if not (examples(*both, config.history)[2] >= len(train[0])).any():  # nothing to stop early on
        final = fit(catalog, both, None, config, log_dir)
        final.metrics = {"epochs": config.epochs, "loss": final.metrics["loss"]}
        return final
    probe = fit(catalog, train, validation, config, log_dir)
    epochs = int(np.argmin(probe.metrics["val_loss"])) + 1
    final = fit(catalog, both, None, dataclasses.replace(config, epochs=epochs))
    final.metrics = {"epochs": epochs, "best_val_loss": float(min(probe.metrics["val_loss"])),
                     "probe": probe.metrics, "loss": final.metrics["loss"]}
    return final


def load(folder: str | Path):
    """The fitted alignment in a local folder, learned or statistical: both have ``apply`` and ``modalities``."""
    kind = json.loads((Path(folder) / CONFIG_FILE).read_text())["kind"]
    if kind == KIND:
        return Aligner.load(folder)
    from models.pca import PcaAligner
    return PcaAligner(folder)
