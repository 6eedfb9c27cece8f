"""The contract every encoder follows, so one Beam handler can serve them all.

An encoder splits its work in two: ``preprocess`` turns one raw value (text, bytes) into model input on
the CPU and raises :class:`InputError` for bad input, which the pipeline dead-letters; ``encode_batch``
runs the model on a list of preprocessed inputs. Keeping decoding out of the batch means one corrupt
file never fails a whole batch.
"""
from __future__ import annotations

import abc
import contextlib
import functools
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np


class InputError(ValueError):
    """A value this encoder cannot use (corrupt media, empty text). ``reason`` is a short error class."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_SIGNATURES = ((b"\x89PNG", "PNG image"), (b"\xff\xd8\xff", "JPEG image"), (b"GIF8", "GIF image"),
               (b"BM", "BMP image"), (b"II*\x00", "TIFF image"), (b"MM\x00*", "TIFF image"),
               (b"RIFF", "RIFF container"), (b"fLaC", "FLAC audio"), (b"OggS", "Ogg container"),
               (b"ID3", "MP3 audio"), (b"%PDF", "PDF document"), (b"PK\x03\x04", "ZIP archive"),
               (b"\x1f\x8b", "gzip data"), (b"\x7fELF", "ELF executable"))


def describe_bytes(data: bytes) -> str:
    """What some bytes look like, in words, for error messages: the content itself never goes into a dead
    letter (an unreadable "image" may be a secrets file)."""
    head = bytes(data[:512])
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if head and text is not None and sum(c.isprintable() or c.isspace() for c in text) >= 0.95 * len(text):
        return "text"
    return "binary data of no known format"


def settle(model: Any, *examples: Any) -> None:
    """Runs ``model.predict_on_batch`` on ``examples``, inputs that differ in every dimension a batch can
    vary in, so that every later batch runs the one graph traced for any shape, whatever ran before it.

    Keras on TensorFlow traces predict's graph for the first batch's exact shapes, then a shape-relaxed one
    once a dimension changes; the two give floats up to 1.5e-7 apart, so without this a batch's vectors
    depended on which batch its worker happened to run first (on JAX each shape compiles alone: harmless).
    """
    for example in examples:
        model.predict_on_batch(example)


PRECISIONS = ("float32", "bfloat16")


@contextlib.contextmanager
def computing_in(precision: str) -> Iterator[None]:
    """Keras layers built inside compute in ``precision``; their weights stay float32 (Keras's mixed
    precision, ``mixed_bfloat16``), and encoders return float32 vectors either way."""
    import keras
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def with_precision(identifier: str, precision: str) -> str:
    """An encoder's identifier for ``precision``: bfloat16 vectors are other vectors, so a change of precision
    re-encodes instead of reusing (float32 keeps the plain identifier)."""
    return identifier if precision == "float32" else f"{identifier}/{precision}"


@functools.cache
def native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU multiplies bfloat16 matrices natively (AMX or AVX512-BF16); elsewhere oneDNN
    emulates them, slower than float32."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("amx_bf16", "avx512_bf16"))


class Encoder(abc.ABC):
    """One modality's model. Subclasses load their weights once, in ``__init__``."""

    modality: str  # column name in the embeddings dataset, e.g. "text"
    dim: int  # length of every vector encode_batch returns
    # For inputs padded per batch (token ids): batching inputs whose len() // length_bucket agree wastes
    # little padding. 0: the cost does not depend on length.
    length_bucket: int = 0

    @property
    @abc.abstractmethod
    def identifier(self) -> str:
        """Stable id: model name plus a digest of its weights, recorded with the embeddings."""

    @abc.abstractmethod
    def preprocess(self, value: Any) -> Any:
        """Decode one raw value into model input; raise InputError when it cannot be used."""

    @abc.abstractmethod
    def encode_batch(self, inputs: Sequence[Any]) -> np.ndarray:
        """Embed preprocessed inputs: float32 array of shape (len(inputs), dim)."""
