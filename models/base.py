"""The contract every encoder follows, so one Beam handler can serve them all.

An encoder splits its work in two: ``preprocess`` turns one raw value (text, bytes) into model input on
the CPU and raises :class:`InputError` for bad input, which the pipeline dead-letters; ``encode_batch``
runs the model on a list of preprocessed inputs. Keeping decoding out of the batch means one corrupt
file never fails a whole batch.
"""
from __future__ import annotations

import abc
from typing import Any, Sequence

import numpy as np


class InputError(ValueError):
    """A value this encoder cannot use (corrupt media, empty text). ``reason`` is a short error class."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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
