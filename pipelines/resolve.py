"""What a run settles before its pipeline is built: the modalities to encode and each one's encoder and
vector length, custom models checked, and the previous complete run a night builds on. Stages share these
decisions; none of them runs a transform."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from mmfuse.models.base import native_bfloat16
from mmfuse.models.registry import MODALITIES, factory
from mmfuse.pipelines.config import Config, EncodeConfig
from mmfuse.transforms.contract import CatalogColumns, ContractError
from mmfuse.transforms.runs import is_complete, latest_complete

if TYPE_CHECKING:
    from mmfuse.models.base import Encoder


def choose_modalities(asked: tuple[str, ...], spec: CatalogColumns, columns: set[str]) -> list[str]:
    """The asked-for modalities, or every one the catalog has columns for."""
    sources = {"text": bool(columns & set(spec.text)),
               "image": bool(columns & {spec.image_bytes, spec.image_uri}),
               "audio": bool(columns & {spec.audio_bytes, spec.audio_uri})}
    available = [m for m, s in MODALITIES.items() if sources[s.source]] + [n for n, _ in spec.vectors]
    unknown = [m for m in asked if m not in MODALITIES and m not in dict(spec.vectors)]
    if unknown:
        raise ContractError(f"--modalities: unknown {unknown}; known: {list(MODALITIES)} and declared "
                            f"--vector_columns {[n for n, _ in spec.vectors]}")
    return [m for m in available if m in asked] if asked else available


def previous_run(config: Config) -> str | None:
    run, choice = config.run, config.encode.previous
    if choice == "none":
        return None
    if choice == "auto":
        return latest_complete(run.output, run.run_date)
    if not is_complete(choice):
        raise ContractError(f"--previous={choice}: not a complete run (no _SUCCESS)")
    return choice.rstrip("/")


def encoder_factory(opts: EncodeConfig, modality: str) -> Callable[[], Encoder]:
    """The modality's default encoder, or the user's own model named by ``--custom_encoders``, with its settings."""
    custom = opts.custom_encoders
    windows = {"max_windows": opts.audio_max_windows}
    if modality in custom:
        path, pinned = custom[modality]
        settings = {"image": {"image_size": opts.custom_image_size}, "audio_mfcc": windows, "audio_musicnn": windows}
        return factory(modality, path, pinned=pinned, **settings.get(modality, {}))
    settings = {"text": {"max_length": opts.text_max_tokens, "precision": precision(opts, "text")},
                "image": {"precision": precision(opts, "image")}, "audio_mfcc": windows, "audio_musicnn": windows}
    return factory(modality, None, **settings.get(modality, {}))


def precision(opts: EncodeConfig, modality: str) -> str:
    """``--precision`` for one built-in encoder, settled where the job is launched: auto is bfloat16 for text
    where the hardware runs it natively, float32 otherwise (images' vectors move too far: docs/encoders.md)."""
    if opts.precision != "auto":
        return opts.precision
    return "bfloat16" if modality == "text" and (opts.accelerator or native_bfloat16()) else "float32"


def check_custom_encoders(opts: EncodeConfig) -> None:
    """Before anything runs: known modalities, SavedModels only when trusted, pinned digests matching."""
    custom = opts.custom_encoders
    unknown = set(custom) - set(MODALITIES)
    if unknown:
        raise ContractError(f"--custom_encoders: unknown modalities {sorted(unknown)}; known: {list(MODALITIES)}")
    if not custom:
        return
    from mmfuse.models.custom import is_saved_model  # loads Keras: only when there are custom models
    for modality, (path, _) in custom.items():
        if is_saved_model(path) and not opts.trust_custom_models:
            raise ContractError(f"--custom_encoders: {modality}={path} is a SavedModel, whose graph can read and "
                                "write files on the workers; pass --trust_custom_models to run it (and pin it: "
                                "PATH@sha256:DIGEST)")
        try:
            encoder_factory(opts, modality)().check_pinned()
        except ValueError as e:
            raise ContractError(f"--custom_encoders: {e}") from None


def modality_dims(config: Config, modalities: list[str]) -> dict[str, int]:
    """Each modality's vector length, known before anything runs (custom encoders' only after they run)."""
    declared = dict(config.catalog.vectors)
    dims = {m: declared[m] if m in declared else encoder_factory(config.encode, m)().dim for m in modalities}
    unknown = sorted(m for m, d in dims.items() if not d)
    if unknown:
        raise ContractError(f"the vector length of {unknown} (custom encoders) is unknown before they run: "
                            f"use --align=contrastive, which learns it from the data")
    return dims
