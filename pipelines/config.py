"""The options of a job, parsed and checked once into small frozen configs that the stages receive.

``Config.parse`` is the only reader of ``PipelineOptions`` in mmfuse: every unusable value is a
``ContractError`` before anything is built, and the stages see typed fields, never the raw options bag.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from apache_beam.options.pipeline_options import PipelineOptions

from mmfuse.pipelines import options as o
from mmfuse.pipelines.alerts import AlertConfig
from mmfuse.transforms.contract import CatalogColumns, ContractError, InteractionColumns
from mmfuse.transforms.users import Weighting


def names(value: str) -> tuple[str, ...]:
    """``a, b,,c`` -> ``("a", "b", "c")``."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def pairs(value: str, option: str, kind: Callable[[str], float] = float, positive: bool = False) -> dict:
    """``NAME:NUMBER,...`` -> ``{name: number}``, numbers of ``kind`` (and > 0 with ``positive``)."""
    out = {}
    for part in names(value):
        name, _, text = part.partition(":")
        try:
            number = kind(text)
        except ValueError:
            number = None
        if not name or number is None or not math.isfinite(number) or (positive and number <= 0):
            what = "POSITIVE_" if positive else ""
            raise ContractError(f"{option}: expected NAME:{what}{'INTEGER' if kind is int else 'NUMBER'} items, "
                                f"got {part!r}")
        out[name] = number
    return out


@dataclasses.dataclass(frozen=True)
class RunConfig:
    catalog: str | None
    interactions: str | None
    output: str | None
    run_date: str
    max_media_bytes: int
    max_dead_fraction: float
    media_roots: tuple[str, ...]
    pseudonym_key: bytes | None  # None: user ids are written as read
    keep_days: int | None
    alert: AlertConfig = AlertConfig()

    def require(self, *fields: str) -> None:
        missing = [f"--{n}" for n in fields if not getattr(self, n)]
        if missing:
            raise ContractError(f"missing required option(s): {' '.join(missing)}")


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    modalities: tuple[str, ...]  # empty: every modality the catalog has columns for
    previous: str                # a run folder, "auto" or "none"
    batch_sizes: dict
    text_template: str
    text_max_tokens: int
    audio_max_windows: int
    custom_encoders: dict        # {modality: (path, pinned digest or None)}
    trust_custom_models: bool
    custom_image_size: int
    accelerator: str             # Beam resource hint for the model steps; "" for none
    precision: str               # auto, float32 or bfloat16 (resolve.precision settles auto per encoder)


@dataclasses.dataclass(frozen=True)
class AlignSettings:
    """The alignment options (``models.align.AlignConfig`` is made from them where Keras may load)."""
    kind: str  # contrastive or pca
    dim: int | None  # None: chosen by the fit
    fusion: str
    fusion_weights: dict
    collaborative: bool
    cf_beta: float | None
    cf_anchors: int
    fit_events: int
    fit_items: int
    fit_minutes: float
    dim_budget_tflop: float  # a chosen dim keeps the exact top-k within this work
    epochs: int
    seed: int
    refit_days: int | None  # 0: refit every night; None: never while an artifact can be reused


@dataclasses.dataclass(frozen=True)
class RecommendConfig:
    top_k: int
    similar_k: int
    weighting: Weighting
    popular_days: float
    user_batch_size: int
    item_shard_size: int


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunConfig
    catalog: CatalogColumns
    interactions: InteractionColumns
    encode: EncodeConfig
    align: AlignSettings
    recommend: RecommendConfig

    @staticmethod
    def parse(options: PipelineOptions) -> Config:
        return Config(_run(options), _catalog(options), _interactions(options), _encode(options),
                      _align(options), _recommend(options))


def _run(options: PipelineOptions) -> RunConfig:
    from mmfuse.transforms.media import default_root
    from mmfuse.transforms.privacy import load_key
    run, privacy = options.view_as(o.RunOptions), options.view_as(o.PrivacyOptions)
    if not 0 <= run.max_dead_fraction <= 1:
        raise ContractError(f"--max_dead_fraction={run.max_dead_fraction}: must be between 0 and 1")
    roots = names(run.media_roots) or ((default_root(run.catalog),) if run.catalog else ())
    key = load_key(privacy.pseudonym_key_file) if privacy.pseudonymize_user_ids else None
    a = options.view_as(o.AlertOptions)
    for name, value in (("churn_above", a.alert_churn_above), ("coverage_below", a.alert_coverage_below),
                        ("dead_fraction_above", a.alert_dead_fraction_above)):
        if value is not None and not 0 <= value <= 1:
            raise ContractError(f"--alert_{name}={value}: must be between 0 and 1")
    alert = AlertConfig(a.alert_churn_above, a.alert_coverage_below, a.alert_dead_fraction_above)
    return RunConfig(run.catalog, run.interactions, run.output, run.run_date, run.max_media_bytes,
                     run.max_dead_fraction, roots, key, options.view_as(o.NightlyOptions).keep_days, alert)


def _catalog(options: PipelineOptions) -> CatalogColumns:
    c = options.view_as(o.CatalogOptions)
    vectors = pairs(c.vector_columns, "--vector_columns (declare each column as NAME:DIM)", int, positive=True)
    return CatalogColumns(item_id=c.item_id_column, text=names(c.text_columns),
                          image_bytes=c.image_bytes_column, image_uri=c.image_uri_column,
                          audio_bytes=c.audio_bytes_column, audio_uri=c.audio_uri_column,
                          vectors=tuple(vectors.items()), updated_at=c.updated_at_column)


def _interactions(options: PipelineOptions) -> InteractionColumns:
    i = options.view_as(o.InteractionOptions)
    return InteractionColumns(user_id=i.user_id_column, item_id=i.interaction_item_id_column,
                              timestamp=i.timestamp_column, event=i.event_column, weight=i.weight_column)


def _custom_encoders(value: str) -> dict:
    """``{modality: (path, pinned digest or None)}`` from ``MODALITY=PATH[@sha256:HEX],...``."""
    out = {}
    for part in names(value):
        modality, sep, path = part.partition("=")
        path, pin, hexdigest = path.rpartition("@sha256:") if "@sha256:" in path else (path, "", "")
        if not sep or not path or (pin and len(hexdigest) != 64):
            raise ContractError(f"--custom_encoders: expected MODALITY=PATH[@sha256:64 HEX DIGITS] items, "
                                f"got {part!r}")
        out[modality] = (path, f"sha256:{hexdigest.lower()}" if pin else None)
    return out


def _encode(options: PipelineOptions) -> EncodeConfig:
    e = options.view_as(o.EncodeOptions)
    return EncodeConfig(names(e.modalities), e.previous, pairs(e.batch_sizes, "--batch_sizes", int, positive=True),
                        e.text_template, e.text_max_tokens, e.audio_max_windows,
                        _custom_encoders(e.custom_encoders), e.trust_custom_models, e.custom_image_size,
                        e.encode_accelerator, e.precision)


def _align(options: PipelineOptions) -> AlignSettings:
    a = options.view_as(o.AlignOptions)
    fusion = a.fusion or ("auto" if a.align == "contrastive" else "mean")
    if fusion in ("attention", "auto") and a.align != "contrastive":
        raise ContractError(f"--fusion={fusion} is learned: it needs --align=contrastive")
    weights = pairs(a.fusion_weights, "--fusion_weights")
    if fusion == "weighted" and not weights:
        raise ContractError("--fusion=weighted needs --fusion_weights")
    if any(w < 0 for w in weights.values()):
        raise ContractError(f"--fusion_weights must not be negative, got {a.fusion_weights}")
    if a.cf_beta is not None and not 0.0 <= a.cf_beta < 1.0:
        raise ContractError(f"--cf_beta must be in [0, 1), got {a.cf_beta}")
    if a.dim is not None and a.dim < 2:
        raise ContractError(f"--dim must be at least 2, got {a.dim}")
    for name in ("fit_events", "fit_items", "cf_anchors", "fit_minutes", "dim_budget_tflop"):
        if getattr(a, name) <= 0:
            raise ContractError(f"--{name} must be positive, got {getattr(a, name)}")
    return AlignSettings(a.align, a.dim, fusion, weights, a.collaborative == "true" and a.align == "contrastive",
                         a.cf_beta, a.cf_anchors, a.fit_events, a.fit_items, a.fit_minutes, a.dim_budget_tflop,
                         a.align_epochs, a.seed,
                         o.REFIT_DAYS[a.refit])


def _recommend(options: PipelineOptions) -> RecommendConfig:
    r = options.view_as(o.RecommendOptions)
    for name in ("top_k", "similar_k", "user_batch_size", "item_shard_size"):
        if getattr(r, name) < 1:
            raise ContractError(f"--{name} must be a positive integer, got {getattr(r, name)}")
    if r.recency_half_life_days < 0 or r.last_n_interactions < 0 or r.popular_days <= 0:
        raise ContractError("--recency_half_life_days and --last_n_interactions must be >= 0, --popular_days > 0")
    weighting = Weighting(pairs(r.event_weights, "--event_weights"), r.default_event_weight, r.use_rating == "true",
                          r.recency_half_life_days * 86400.0, r.last_n_interactions)
    return RecommendConfig(r.top_k, r.similar_k, weighting, r.popular_days, r.user_batch_size, r.item_shard_size)
