"""Which encoder serves which modality, and which raw input it reads.

Factories, not instances: Beam pickles them to workers, where each process builds its own encoder.
Encoders build their networks lazily (on the first ``encode_batch``), so making one just to preprocess
or to read its ``identifier`` is cheap.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from mmfuse.models.base import Encoder


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    source: str  # the item field it reads: "text", "image" or "audio"
    make: Callable[..., Encoder]
    batch_size: int


def _text(**kw) -> Encoder:
    from mmfuse.models.text import MiniLMTextEncoder
    return MiniLMTextEncoder(**kw)


def _image(**kw) -> Encoder:
    from mmfuse.models.image import MobileNetV2ImageEncoder
    return MobileNetV2ImageEncoder(**kw)


def _mfcc(**kw) -> Encoder:
    from mmfuse.models.audio import MfccAudioEncoder
    return MfccAudioEncoder(**kw)


def _musicnn(**kw) -> Encoder:
    from mmfuse.models.audio import MusicnnAudioEncoder
    return MusicnnAudioEncoder(**kw)


MODALITIES = {
    "text": ModalitySpec("text", _text, 64),
    "image": ModalitySpec("image", _image, 32),
    "audio_mfcc": ModalitySpec("audio", _mfcc, 32),
    "audio_musicnn": ModalitySpec("audio", _musicnn, 8),
}


def _custom(modality: str, path: str, **kw) -> Encoder:
    from mmfuse.models.custom import CustomEncoder
    return CustomEncoder(modality, MODALITIES[modality].source, path, **kw)


def factory(modality: str, custom_path: str | None = None, **kwargs) -> Callable[[], Encoder]:
    """A picklable no-argument factory for one modality's encoder, or for the user's model at ``custom_path``."""
    if custom_path:
        return functools.partial(_custom, modality, custom_path, **kwargs)
    return functools.partial(MODALITIES[modality].make, **kwargs)
