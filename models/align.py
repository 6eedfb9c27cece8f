"""Learned alignment and fusion: one vector space for every modality, including a collaborative one.

Each content modality gets a projection head (z-score, then linear or a small MLP) into ``dim``; the
collaborative modality (``cf``) is a closed-form vector from interactions (``models.collaborative``), fixed
while the heads learn and given to the model as an input, so the model's size does not depend on the
catalogue; items without interactions have none. Fusion weights the unit-length aligned vectors of the
modalities an item has (mean, fixed weights, or a learned gate) and renormalises. Training combines two
InfoNCE losses with in-batch negatives: CLIP-style between every pair of modalities an item has, and between a
user's history (the mean of the fused vectors of earlier items, which is how user vectors are made downstream)
and the item that came next. Modalities are dropped at random while training, so an item missing one still
lands in the same space. What was tuned by hand on one data set (the cf popularity tilt, the fusion) is chosen
on the fit's own validation split. Only ``keras.ops``: it runs on any Keras backend. Nothing here knows about
Beam.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import keras
import numpy as np
from keras import layers, ops

from mmfuse.models import collaborative
from mmfuse.models import evaluation as ev
from mmfuse.models.base import settle
from mmfuse.models.catalog import CF, Catalog  # noqa: F401 - part of this module's interface
from mmfuse.models.fusion import CONFIG_FILE, fixed_logits, fuse  # noqa: F401 - part of this module's interface

if TYPE_CHECKING:
    from mmfuse.models.pca import PcaAligner

_ANCHORS = collaborative.ANCHORS  # the config's field "collaborative" hides the module inside the class body
MODEL_FILE = "alignment.keras"
FORMAT = 2  # artifacts of another format are refitted, never reused (format 1 held a learned cf table)
PAD_ITEMS = 256
KIND = "contrastive"


@keras.saving.register_keras_serializable("mmfuse")
class Standardize(layers.Layer):
    """Elementwise z-score with statistics fixed at fit time (stored as weights, so saved with the model)."""

    def build(self, input_shape: tuple) -> None:
        d = input_shape[-1]
        self.mean = self.add_weight(shape=(d,), initializer="zeros", trainable=False, name="mean")
        self.scale = self.add_weight(shape=(d,), initializer="ones", trainable=False, name="scale")

    def call(self, x: Any) -> Any:
        return (x - self.mean) * self.scale


@keras.saving.register_keras_serializable("mmfuse")
class AlignmentModel(keras.Model):
    """Inputs: ``{m: (n, d_m)}`` per content modality (zeros where absent), ``mask`` (n, M) presence in
    ``modalities`` order, and with ``collaborative`` ``cf`` (n, dim) unit vectors (zeros where absent).
    Output: ``{"aligned": (n, M, dim) unit vectors, "weights": (n, M), "fused": (n, dim), "parts": ...}``.

    With ``collaborative``, content heads write only cf's ``content_dim - 1`` leading coordinates (its largest
    eigen-directions) and its popularity coordinate (the last): content cannot predict cf's fine directions,
    and a head free to write them fills them with what it remembers of its training items, which new items
    then carry as noise."""

    def __init__(self, dims: dict, dim: int = 64, hidden: int = 256, collaborative: bool = False,
                 fusion: str = "attention", logits: Sequence[float] | None = None, temperature: float = 0.1,
                 content_dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.dims, self.dim, self.hidden, self.collaborative = dict(dims), dim, hidden, collaborative
        self.content_dim = min(content_dim or dim, dim) if collaborative else dim
        self.fusion, self.temperature = fusion, temperature
        self.modalities = list(self.dims) + ([CF] if collaborative else [])
        self.logits = None if logits is None else [float(v) for v in logits]
        self.standardize = {m: Standardize(name=f"z_{m}") for m in self.dims}
        self.heads = {m: keras.Sequential(([layers.Dense(hidden, activation="gelu")] if hidden else [])
                                          + [layers.Dense(self.content_dim)], name=f"head_{m}") for m in self.dims}
        if fusion == "attention":  # a score per (item, modality) from the aligned vector, plus a modality bias
            self.gate = keras.Sequential([layers.Dense(32, activation="tanh"), layers.Dense(1)], name="gate")
            self.gate_bias = self.add_weight(shape=(len(self.modalities),), initializer="zeros", name="gate_bias")

    def set_statistics(self, stats: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Fix the z-score (mean, std) of each content modality."""
        for m, (mean, std) in stats.items():
            self.standardize[m].build((None, len(mean)))
            self.standardize[m].set_weights([mean.astype(np.float32), (1.0 / np.maximum(std, 1e-6)).astype(np.float32)])

    def call(self, inputs: Mapping[str, Any]) -> dict:
        mask = ops.cast(inputs["mask"], "float32")
        vectors = [self._placed(self.heads[m](self.standardize[m](inputs[m]))) for m in self.dims]
        if self.collaborative:
            vectors.append(ops.cast(inputs[CF], "float32"))
        aligned = ops.stack(vectors, axis=1)
        aligned = aligned / ops.sqrt(ops.maximum(ops.sum(aligned * aligned, axis=-1, keepdims=True), 1e-24))
        aligned = aligned * mask[..., None]
        if self.fusion == "attention":
            logits = ops.squeeze(self.gate(aligned), -1) + self.gate_bias
        else:
            logits = ops.zeros_like(mask) + ops.convert_to_tensor(np.asarray(self.logits, np.float32))
        fused, weights, parts = fuse(aligned, mask, logits)
        return {"aligned": aligned, "weights": weights, "fused": fused, "parts": parts}

    def _placed(self, head: Any) -> Any:
        """A head's output in the space: its last coordinate is popularity's, the others cf's leading ones."""
        if self.content_dim == self.dim:
            return head
        return ops.concatenate([ops.pad(head[:, :-1], [[0, 0], [0, self.dim - self.content_dim]]), head[:, -1:]],
                               axis=-1)

    def compute_loss(self, x: Mapping[str, Any] | None = None, y: Any = None, y_pred: Mapping[str, Any] | None = None,
                     sample_weight: Any = None, training: bool = True) -> Any:
        """Contrastive loss between modalities of the batch's first items (``contrast`` marks the real
        ones among them) plus the interaction loss between each user's ``history`` (indices into the batch,
        -1 padded) and ``target``."""
        contrast = ops.cast(x["contrast"], "float32")
        n = ops.shape(contrast)[0]  # only these rows enter the (n x n) contrastive logits: they dominate a step
        present = ops.cast(x["mask"], "float32")  # (items, M); padding rows have no modality
        # Every pair of modalities at once, (P, n, n) logits in one batched product: a loop over pairs makes
        # a graph P times as large, and tracing it costs each fit seconds.
        pairs = np.array([(a, b) for a in range(len(self.modalities))
                          for b in range(a + 1, len(self.modalities))], np.int32).reshape(-1, 2)
        contrastive = 0.0
        if len(pairs):
            aligned = ops.transpose(y_pred["aligned"][:n], (1, 0, 2))  # (M, n, d)
            mask = ops.transpose(present[:n]) * contrast[None, :]      # (M, n)
            left, right = ops.take(aligned, pairs[:, 0], axis=0), ops.take(aligned, pairs[:, 1], axis=0)
            valid = ops.take(mask, pairs[:, 0], axis=0) * ops.take(mask, pairs[:, 1], axis=0)
            logits = ops.matmul(left, ops.transpose(right, (0, 2, 1))) / self.temperature
            both = _info_nce(logits, valid) + _info_nce(ops.transpose(logits, (0, 2, 1)), valid)
            contrastive = ops.sum(both) / (2 * len(pairs))
        fused = y_pred["fused"]
        history = x["history"]
        taken = ops.cast(history >= 0, "float32")
        users = ops.sum(ops.take(fused, ops.maximum(history, 0), axis=0) * taken[..., None], axis=1)
        users = users / ops.sqrt(ops.maximum(ops.sum(users * users, axis=-1, keepdims=True), 1e-24))
        # (B,) row of each user's next item, scored against every real item of the step: close to the whole
        # catalogue, so popular items are not over-used as negatives the way
        # in-batch targets alone would use them.
        targets = x["target"]
        logits = ops.matmul(users, ops.transpose(fused)) / self.temperature
        logits = ops.where(ops.sum(present, axis=-1)[None, :] > 0, logits, -1e9)
        per_user = ops.logsumexp(logits, axis=-1) - ops.take_along_axis(logits, targets[:, None], 1)[:, 0]
        interaction = ops.sum(per_user) / ops.maximum(ops.cast(ops.shape(targets)[0], "float32"), 1.0)
        return contrastive + interaction

    def get_config(self) -> dict:
        return {**super().get_config(), "dims": self.dims, "dim": self.dim, "hidden": self.hidden,
                "collaborative": self.collaborative, "fusion": self.fusion, "logits": self.logits,
                "temperature": self.temperature, "content_dim": self.content_dim}


def _info_nce(logits: Any, valid: Any) -> Any:
    """Per pair (leading axis), the mean over valid rows of cross-entropy with the diagonal as the label;
    invalid columns are excluded. ``logits`` (P, n, n), ``valid`` (P, n)."""
    logits = ops.where(valid[:, None, :] > 0, logits, -1e9)
    per_row = ops.logsumexp(logits, axis=-1) - ops.diagonal(logits, axis1=-2, axis2=-1)
    return ops.sum(per_row * valid, axis=-1) / ops.maximum(ops.sum(valid, axis=-1), 1.0)


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """Everything a fit depends on; stored with the artifact."""

    dim: int | None = None  # None: chosen on validation among ``dims`` with the cf modality, else DEFAULT_DIM
    dims: tuple = (64, 128, 256)  # the candidates (DIMS, or those affordable_dims allows)
    hidden: int = 256  # 0: linear heads
    content_dim: int = 64  # with cf: the coordinates content heads write (AlignmentModel)
    fusion: str = "auto"  # "auto": chosen on validation among attention and cf at fixed weights (see CF_WEIGHTS)
    fusion_weights: dict = dataclasses.field(default_factory=dict)
    collaborative: bool = True  # a cf modality for items with interactions
    cf_beta: float | None = None  # how far popularity tilts cf vectors; None: chosen on validation among CF_BETAS
    cf_anchors: int = _ANCHORS  # items of the dense EASE step; the others are folded in
    temperature: float = 0.1
    modality_dropout: float = 0.3
    history: int = 30  # most recent earlier items forming a training user's history
    users_per_batch: int = 1024  # each step embeds every item its examples touch: big batches amortise it
    epochs: int = 40
    max_seconds: float = 600.0  # training time of the probe and of the refit, each at most half of it
    patience: int = 3
    learning_rate: float = 5e-3
    select_users: int = 2000  # validation users that score each choice made on validation
    seed: int = 0


CF_BETAS = (0.25, 0.5, 0.75)
DIMS = AlignConfig.dims  # the shared space's dims chosen among (with cf's tilt, by cf's own validation figures)
DEFAULT_DIM = 64  # without the cf modality there is nothing cheap to choose the dim by


def affordable_dims(users: int, items: int, budget_flop: float) -> tuple[int, ...]:
    """The DIMS whose exact top-k (recommendations and similar items: 2 x dim x (users + items) x items
    FLOP) stays within ``budget_flop``; the smallest always."""
    return tuple(d for d in DIMS if d == DIMS[0] or 2.0 * d * (users + items) * items <= budget_flop)
CF_WEIGHTS = (0.5, 0.7, 0.85)  # "auto" fusion: cf's fixed weight; the content modalities share the rest
LEAD_SHARES = (0.65, 0.8)  # "auto" fusion: a leading content modality's share of the content weight
COLD_SHARE = 0.2  # validated items the probe never sees: the fusion choice scores them as new items


class Aligner:
    """A fitted alignment: the Keras model plus the cf vectors of the items it was fitted on."""

    def __init__(self, model: AlignmentModel, config: AlignConfig, metrics: dict,
                 cf: collaborative.CfTable | None = None):
        self.model, self.config, self.metrics, self.cf = model, config, metrics, cf
        self._settled = False

    @property
    def modalities(self) -> list[str]:
        return self.model.modalities

    @property
    def input_dims(self) -> dict[str, int]:
        return self.model.dims

    def inputs(self, item_ids: Sequence[str], features: Mapping[str, np.ndarray]) -> dict:
        """Model inputs for items whose ``features[m]`` rows are NaN where the modality is absent. An item's
        cf vector is ``features["cf"]`` (e.g. folded in by the pipeline) where given, else the fitted table's."""
        out, present = {}, []
        for m in list(self.model.dims) + ([CF] if self.model.collaborative else []):
            if m == CF:
                x = self.cf.lookup(item_ids)
                if CF in features:
                    x = np.where(np.isnan(x), np.asarray(features[CF], np.float32), x)
            else:
                x = np.asarray(features[m], np.float32)
            ok = ~np.isnan(x).any(1)
            out[m], present = np.where(ok[:, None], x, 0.0).astype(np.float32), present + [ok]
        out["mask"] = np.stack(present, 1).astype(np.float32)
        return out

    def apply(self, item_ids: Sequence[str], features: Mapping[str, np.ndarray], batch_size: int = 1024) -> dict:
        """``{"fused", "weights", "parts", "aligned", "mask"}`` as numpy arrays, in ``item_ids`` order."""
        inputs = self.inputs(item_ids, features)
        if not self._settled and len(item_ids):  # one and two copies of the first item: see ``base.settle``
            settle(self.model, *({k: np.repeat(v[:1], n, 0) for k, v in inputs.items()} for n in (1, 2)))
            self._settled = True
        chunks = []
        for start in range(0, len(item_ids), batch_size):
            part = {k: v[start:start + batch_size] for k, v in inputs.items()}
            chunks.append({k: np.asarray(v) for k, v in self.model.predict_on_batch(part).items()})
        out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        out["mask"] = inputs["mask"]
        return out

    def save(self, folder: str | Path) -> None:
        """The model without its optimizer state, the config and metrics, and the cf table."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        clean = AlignmentModel.from_config(self.model.get_config())
        clean(self.inputs([""], {m: np.zeros((1, d), np.float32) for m, d in self.model.dims.items()}))  # builds it
        clean.set_weights(self.model.get_weights())
        clean.save(folder / MODEL_FILE)
        if self.cf is not None:
            self.cf.save(folder)
        (folder / CONFIG_FILE).write_text(json.dumps({"kind": KIND, "format": FORMAT,
                                                      "config": dataclasses.asdict(self.config),
                                                      "modalities": self.modalities, "metrics": self.metrics},
                                                     indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> Aligner:
        folder = Path(folder)
        meta = json.loads((folder / CONFIG_FILE).read_text())
        model = keras.saving.load_model(folder / MODEL_FILE)
        cf = collaborative.CfTable.load(folder) if model.collaborative else None
        config = meta["config"]
        return cls(model, AlignConfig(**{**config, "dims": tuple(config.get("dims", DIMS))}), meta["metrics"], cf)


class _Batches(keras.utils.PyDataset):
    """Training steps: a batch of (history, next item) examples and the items they touch.

    Each step's items are the targets (deduplicated: the contrastive batch) followed by the history items,
    all of them negatives of the interaction loss; each item's modalities are dropped at random
    (keeping one) when training. One endless stream of ``steps`` steps per epoch: batch ``index`` is a pure
    function of (seed, epoch, step), epochs counted from 1 as Keras's log counts them, so it is reproducible
    and may be made ahead, and Keras keeps one iterator for the whole fit (a new iterator per epoch cost a
    small fit a fifth of its time).
    """

    def __init__(self, aligner: Aligner, catalog: Catalog, examples: tuple[np.ndarray, np.ndarray],
                 config: AlignConfig, train: bool):
        super().__init__()
        self.aligner, self.config, self.train = aligner, config, train
        self.inputs = aligner.inputs(catalog.item_ids, catalog.features)
        self.histories, self.targets = examples
        # A step's rows: its items, at least the contrastive ones, at most the catalogue (a small catalogue's
        # steps would otherwise be mostly padding).
        self.items = len(self.inputs["mask"])
        self.rows = min(config.users_per_batch, self.items)
        # Without any (history, next item) example (e.g. every user has one interaction) the steps walk the
        # catalog for the contrastive loss alone.
        self.steps = max(1, math.ceil((len(self.targets) or self.items) / config.users_per_batch))

    @property
    def num_batches(self) -> None:
        return None  # endless: fit is given steps_per_epoch

    def __getitem__(self, index: int) -> dict:
        c = self.config
        epoch, step = (index // self.steps + 1 if self.train else 0), index % self.steps
        rng = np.random.default_rng([c.seed, epoch, step, int(self.train)])
        n = len(self.targets) or len(self.inputs["mask"])
        order = np.random.default_rng([c.seed, epoch]).permutation(n) if self.train else np.arange(n)
        chosen = order[step * c.users_per_batch:(step + 1) * c.users_per_batch]
        if len(self.targets):
            targets, histories = self.targets[chosen], self.histories[chosen]
        else:
            targets, histories = np.sort(chosen), np.zeros((0, c.history), np.int64)
        unique_targets, target_slot = np.unique(targets, return_inverse=True)
        extra = np.setdiff1d(np.unique(histories[histories >= 0]), unique_targets)
        items = np.concatenate([unique_targets, extra])
        # Pad to a multiple of PAD_ITEMS or to the catalogue's size, and to at least the contrastive rows
        # (absent rows, outside the contrast set): few shapes, few retraces.
        size = max(self.rows, min(len(items) + (-len(items) % PAD_ITEMS), self.items))
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
                     contrast=(np.arange(self.rows) < len(unique_targets)).astype(np.float32))
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


class _TimeLimit(keras.callbacks.Callback):
    """Stops training at an epoch's end when one more epoch would end past ``seconds``. Fits are reproducible
    while this does not bind; when it does, the epochs trained are recorded with the artifact."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.stopped = seconds, False

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        elapsed = time.monotonic() - self.start
        if elapsed * (epoch + 2) / (epoch + 1) > self.seconds:
            self.model.stop_training = self.stopped = True


def cf_table(catalog: Catalog, factors: collaborative.Factors, beta: float,
             dim: int | None = None) -> collaborative.CfTable:
    """The cf vectors of the catalog items that have interactions, for one popularity tilt (and ``dim``, at
    most the factors' own)."""
    vectors, solver = factors.table(beta, dim)
    rows = np.flatnonzero(~np.isnan(vectors).any(1))
    return collaborative.CfTable(catalog.item_ids[rows], vectors[rows], np.isin(rows, factors.anchors), solver)


def fit(catalog: Catalog, train: tuple[np.ndarray, np.ndarray, np.ndarray],
        validation: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        config: AlignConfig = AlignConfig(), log_dir: str | None = None,
        cf: collaborative.CfTable | None = None) -> Aligner:
    """Fit the alignment on ``catalog`` and interactions given as (user, item row, timestamp) arrays.

    ``validation`` interactions come after each user's training ones; the loss on them (histories from
    train + validation in time order) drives early stopping. ``cf``: the cf vectors (default: from ``train``,
    tilted by ``config.cf_beta``, 0.75 when unset). ``fusion="auto"`` trains the attention gate. Returns the
    best epoch's weights; training stops after ``config.epochs`` or ``config.max_seconds``.
    """
    keras.utils.set_random_seed(config.seed)
    config = dataclasses.replace(config, dim=config.dim or DEFAULT_DIM)
    dims = {m: catalog.features[m].shape[1] for m in catalog.features if m != CF}
    if config.collaborative and cf is None:
        factors = collaborative.Factors(train[0], train[1], len(catalog.item_ids), config.dim, config.cf_anchors)
        cf = cf_table(catalog, factors, 0.75 if config.cf_beta is None else config.cf_beta)
    fusion = "attention" if config.fusion == "auto" else config.fusion
    logits = None if fusion == "attention" else fixed_logits(
        list(dims) + ([CF] if config.collaborative else []), fusion, config.fusion_weights).tolist()
    model = AlignmentModel(dims, config.dim, config.hidden, config.collaborative, fusion, logits, config.temperature,
                           config.content_dim)
    present = catalog.present()[:, [list(catalog.features).index(m) for m in dims]]
    model.set_statistics({m: (np.nanmean(catalog.features[m][present[:, j]], 0),
                              np.nanstd(catalog.features[m][present[:, j]], 0)) for j, m in enumerate(dims)})
    aligner = Aligner(model, config, {}, cf if config.collaborative else None)
    content = Catalog(catalog.item_ids, {m: catalog.features[m] for m in dims})
    data = _Batches(aligner, content, examples(*train, config.history)[:2], config, train=True)
    limit = _TimeLimit(config.max_seconds)
    callbacks, val = [limit], None
    if validation is not None:
        both = tuple(np.concatenate([a, b]) for a, b in zip(train, validation))
        histories, targets, index = examples(*both, config.history)
        later = index >= len(train[0])
        val = _Batches(aligner, content, (histories[later], targets[later]), config, train=False)
        callbacks.append(keras.callbacks.EarlyStopping(patience=config.patience, restore_best_weights=True))
    if log_dir:
        callbacks.append(keras.callbacks.TensorBoard(log_dir))
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    # Variables made now, not in the first step: TensorFlow traces a step that creates variables twice.
    model(data[0])
    model.optimizer.build(model.trainable_variables)
    history = model.fit(data, steps_per_epoch=data.steps, validation_data=val,
                        validation_steps=val.steps if val else None, epochs=config.epochs, callbacks=callbacks,
                        verbose=0, shuffle=False)
    aligner.metrics = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    aligner.metrics["stopped_by_time"] = limit.stopped
    return aligner


def _validation_metrics(vectors: np.ndarray, train: tuple, validation: tuple, config: AlignConfig,
                        cold: np.ndarray | None = None) -> dict:
    """The protocol's metrics of item ``vectors`` (NaN: never recommended) on up to ``select_users``
    validation users (seeded): user vector = mean of their training items' vectors, as downstream. With
    ``cold`` (item rows), the cold metrics: users rank only those items, and their interactions with them
    are left out of the training side, as if the items were new."""
    if cold is not None:
        train = tuple(a[~np.isin(train[1], cold)] for a in train)
        validation = tuple(a[np.isin(validation[1], cold)] for a in validation)
    users = np.unique(validation[0])
    if len(users) > config.select_users:
        users = np.sort(np.random.default_rng(config.seed).choice(users, config.select_users, replace=False))
    index = np.full(max(train[0].max(initial=0), validation[0].max(initial=0)) + 1, -1)
    index[users] = np.arange(len(users))

    def interactions(x: tuple) -> ev.Interactions:
        keep = index[x[0]] >= 0
        return ev.Interactions(user=index[x[0][keep]], item=x[1][keep], timestamp=x[2][keep],
                               weight=np.ones(keep.sum(), np.float32), user_ids=users.astype(str),
                               item_ids=np.arange(len(vectors)).astype(str))
    seen, held = interactions(train), interactions(validation)
    scores = ev.ContentKNN(vectors).fit(seen).score
    return ev.evaluate_cold(scores, held, cold) if cold is not None else ev.evaluate(scores, seen, held)


def _choose(candidates: dict, score: Callable[[Any], dict[str, float]], key: str = "ndcg@20") -> tuple[str, dict]:
    """The candidate with the best validation ``key`` (ties: the first), and every candidate's figures."""
    figures = {name: {k: round(v, 4) for k, v in score(value).items()} for name, value in candidates.items()}
    return max(figures, key=lambda name: figures[name][key]), figures


def _fusions(names: list[str]) -> dict[str, dict | None]:
    """The "auto" fusion's candidates: attention, and cf at each of CF_WEIGHTS with the content modalities
    sharing the rest equally or one of them leading with each of LEAD_SHARES. (Shares in the ratio attention
    learned did worse on MovieLens: the gate leaned on posters, which rank new items worse than text.)"""
    content = [m for m in names if m != CF]
    shares = {"": {m: 1 / len(content) for m in content}}
    if len(content) > 1:
        shares.update({f" {lead} {s}": {m: s if m == lead else (1 - s) / (len(content) - 1) for m in content}
                       for lead in content for s in LEAD_SHARES})
    return {"attention": None, **{f"weighted cf {w}{label}": {CF: w, **{m: (1 - w) * x for m, x in share.items()}}
                                  for w in CF_WEIGHTS for label, share in shares.items()}}


def _cold_items(validation: tuple, seed: int) -> np.ndarray:
    """A seeded COLD_SHARE of the items that validation interactions touch (none when they are too few
    to spare: the rest must still drive early stopping)."""
    items = np.unique(validation[1])
    n = int(len(items) * COLD_SHARE)
    return np.sort(np.random.default_rng(seed).choice(items, n, replace=False)) if n >= 1 else items[:0]


def fit_and_refit(catalog: Catalog, train: tuple[np.ndarray, np.ndarray, np.ndarray],
                  validation: tuple[np.ndarray, np.ndarray, np.ndarray],
                  config: AlignConfig = AlignConfig(), log_dir: str | None = None) -> Aligner:
    """Choose on ``validation`` (interactions after ``train``) what was left open: the cf tilt (cf vectors
    alone), the number of epochs (early stopping) and the fusion (the probe's vectors, fused each way, by
    warm NDCG@20 plus cold NDCG@20 on a seeded COLD_SHARE of the validated items, which the probe never
    sees); then refit on all of it with those choices: the most recent interactions are the most telling,
    so they are not left out of the model that is kept. Training time: half of ``max_seconds`` for each fit."""
    half = dataclasses.replace(config, max_seconds=config.max_seconds / 2)
    both = tuple(np.concatenate([a, b]) for a, b in zip(train, validation))
    n_items, chosen = len(catalog.item_ids), {}
    if not (examples(*both, config.history)[2] >= len(train[0])).any():  # nothing to choose or stop early on
        final = fit(catalog, both, None, config, log_dir)
        final.config = dataclasses.replace(final.config, fusion=final.model.fusion,
                                           cf_beta=0.75 if config.cf_beta is None else config.cf_beta)
        final.metrics = {"epochs": len(final.metrics["loss"]), "loss": final.metrics["loss"],
                         "stopped_by_time": final.metrics["stopped_by_time"]}
        return final
    # The "auto" fusion is also scored on items the probe never sees (their content hidden, their
    # interactions left out), standing in for tomorrow's new items: content heads remember the items they
    # were trained on, so items seen in training would flatter whichever modality memorises best.
    choose_fusion = config.fusion == "auto" and config.collaborative
    cold = _cold_items(validation, config.seed) if choose_fusion else np.zeros(0, np.int64)
    is_cold = np.zeros(n_items, bool)
    is_cold[cold] = True
    seen, held = (tuple(a[~is_cold[x[1]]] for a in x) for x in (train, validation))
    known = catalog if not len(cold) else Catalog(
        catalog.item_ids, {m: np.where(is_cold[:, None], np.nan, v) for m, v in catalog.features.items()})
    cf = None
    if config.collaborative:
        # cf's own validation figures choose its tilt and the space's dim: closed form, so nine candidates
        # cost seconds, where each dim's contrastive fit would cost the whole fit's time
        dims = tuple(config.dims) if config.dim is None else (config.dim,)
        factors = collaborative.Factors(seen[0], seen[1], n_items, max(dims), config.cf_anchors)
        tables = {f"dim={d} cf_beta={b}": (d, b) for d in dims
                  for b in (CF_BETAS if config.cf_beta is None else (config.cf_beta,))}
        best, chosen["cf"] = _choose(tables, lambda db: _validation_metrics(
            cf_table(catalog, factors, db[1], db[0]).lookup(catalog.item_ids), seen, held, config))
        dim, beta = tables[best]
        half, cf = dataclasses.replace(half, dim=dim, cf_beta=beta), cf_table(catalog, factors, beta, dim)
    half = dataclasses.replace(half, dim=half.dim or DEFAULT_DIM)
    probe = fit(known, seen, held, half, log_dir, cf)
    epochs = int(np.argmin(probe.metrics["val_loss"])) + 1
    if choose_fusion:
        content = {m: v for m, v in catalog.features.items() if m != CF}  # cold items: content only
        out, names = probe.apply(catalog.item_ids, content), probe.modalities
        candidates = _fusions(names)

        def fused(weights: Mapping[str, float] | None) -> np.ndarray:
            logits = (np.log(np.maximum(out["weights"], 1e-30)) if weights is None
                      else np.broadcast_to(fixed_logits(names, "weighted", weights), out["mask"].shape))
            vectors = np.asarray(fuse(out["aligned"], out["mask"], logits)[0])
            return np.where(out["mask"].any(1, keepdims=True), vectors, np.nan)

        def score(weights: Mapping[str, float] | None) -> dict[str, float]:
            # warm figures on the items the probe saw, cold ones on those it did not
            vectors = fused(weights)
            warm = _validation_metrics(np.where(is_cold[:, None], np.nan, vectors), seen, held, config)
            new = (_validation_metrics(vectors, seen, validation, config, cold) if len(cold)
                   else {"recall@20": 0.0, "ndcg@20": 0.0})
            return {**warm, **{f"cold {k}": v for k, v in new.items()},
                    "warm + cold ndcg@20": warm["ndcg@20"] + new["ndcg@20"]}
        best, chosen["fusion"] = _choose(candidates, score, "warm + cold ndcg@20")
        half = dataclasses.replace(half, fusion="attention" if best == "attention" else "weighted",
                                   fusion_weights=candidates[best] or {})
    final = fit(catalog, both, None, dataclasses.replace(half, epochs=epochs))
    final.config = dataclasses.replace(half, max_seconds=config.max_seconds, epochs=config.epochs,
                                       fusion=half.fusion if half.fusion != "auto" else final.model.fusion)
    final.metrics = {"epochs": len(final.metrics["loss"]), "epochs_chosen": epochs,
                     "best_val_loss": float(min(probe.metrics["val_loss"])),
                     "stopped_by_time": probe.metrics["stopped_by_time"] or final.metrics["stopped_by_time"],
                     "chosen_on_validation": chosen, "probe": probe.metrics, "loss": final.metrics["loss"]}
    return final


def load(folder: str | Path) -> Aligner | PcaAligner:
    """The fitted alignment in a local folder, learned or statistical: both have ``apply`` and ``modalities``."""
    kind = json.loads((Path(folder) / CONFIG_FILE).read_text())["kind"]
    if kind == KIND:
        return Aligner.load(folder)
    from mmfuse.models.pca import PcaAligner
    return PcaAligner(folder)
