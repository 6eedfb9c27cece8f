"""A user's own model for a modality: a Keras ``.keras`` file or a TensorFlow SavedModel, local or ``gs://``.

Input contract (what the model receives, batched):
- ``text``: a 1-D string tensor, one text per item (joined as for the default text model).
- ``image``: float32 (N, S, S, 3) RGB values in 0..255, the image decoded as for the default model, its
  short side resized to S and centre-cropped (S = ``image_size``, default 224). The model normalises.
- ``audio_*``: float32 (N, 48000): 3 s windows of mono 16 kHz audio (long clips: evenly spaced windows,
  short ones zero-padded); the item's vector is the mean over its windows.
It must return one float vector per input, (N, D). A SavedModel is called through its ``serving_default``
signature, which must have exactly one input and one output.

Trust: a ``.keras`` file is loaded with Keras's safe mode (no code in the file runs). A SavedModel is a
TensorFlow graph, which can read and write files on the worker: it runs only when the job is told to trust
custom models. Either may be pinned to its ``digest``; a model whose files changed is then refused.
"""
from __future__ import annotations

import functools
import hashlib
import posixpath
import tempfile
from typing import Any, Sequence

import numpy as np

from mmfuse.models.audio import decode_audio
from mmfuse.models.base import Encoder, InputError
from mmfuse.models.image import decode_image, resize_crop

WINDOW = 48000  # 3 s at 16 kHz


def _tf():
    import tensorflow as tf
    return tf


def _files(path: str) -> list[str]:
    gfile = _tf().io.gfile
    if not gfile.isdir(path):
        return [path]
    return sorted(posixpath.join(root, f) for root, _, files in gfile.walk(path) for f in files)


def digest(path: str) -> str:
    """``sha256:<hex>`` of a model: of the file's bytes (what ``sha256sum`` prints), or for a SavedModel
    folder, of each file's relative path and sha256 in path order."""
    files, gfile = _files(path), _tf().io.gfile
    if files == [path]:
        return "sha256:" + hashlib.sha256(gfile.GFile(path, "rb").read()).hexdigest()
    h = hashlib.sha256()
    for file in files:
        h.update(f"{posixpath.relpath(file, path)}\n{hashlib.sha256(gfile.GFile(file, 'rb').read()).hexdigest()}\n"
                 .encode())
    return "sha256:" + h.hexdigest()


def is_saved_model(path: str) -> bool:
    return not path.rstrip("/").endswith(".keras")


class CustomEncoder(Encoder):
    def __init__(self, modality: str, source: str, path: str, image_size: int = 224, max_windows: int = 10,
                 pinned: str | None = None):
        if source not in ("text", "image", "audio"):
            raise ValueError(f"custom encoders read text, image or audio, not {source!r}")
        self.modality, self.source, self.path = modality, source, path.rstrip("/")
        self.image_size, self.max_windows, self.pinned = image_size, max_windows, pinned
        self.dim = 0  # known once the model has run

    def check_pinned(self) -> None:
        """Raises ValueError when the model's digest differs from the pinned one."""
        if self.pinned is not None and (found := digest(self.path)) != self.pinned:
            raise ValueError(f"{self.path} has digest {found}, not the pinned {self.pinned}: refused")

    @functools.cached_property
    def identifier(self) -> str:
        h = hashlib.sha256()
        for file in _files(self.path):
            h.update(_tf().io.gfile.GFile(file, "rb").read())
        return f"custom:{posixpath.basename(self.path)}@{h.hexdigest()[:12]}"

    @functools.cached_property
    def _call(self):
        """Loaded on first use, after the pinned digest is checked (on the worker: files can change after the
        job was submitted); ``.keras`` files are copied locally first (Keras reads only local files)."""
        self.check_pinned()
        tf = _tf()
        if self.path.endswith(".keras"):
            import keras
            with tempfile.TemporaryDirectory(prefix="mmfuse-model-") as folder:
                local = posixpath.join(folder, posixpath.basename(self.path))
                tf.io.gfile.copy(self.path, local)
                model = keras.saving.load_model(local, compile=False, safe_mode=True)
            return lambda x: model.predict_on_batch(x)
        signature = tf.saved_model.load(self.path).signatures["serving_default"]
        [(name, spec)] = signature.structured_input_signature[1].items()
        return lambda x: next(iter(signature(**{name: tf.constant(x, dtype=spec.dtype)}).values())).numpy()

    def preprocess(self, value: Any) -> Any:
        if self.source == "text":
            if not isinstance(value, str) or not value.strip():
                raise InputError("empty_text", "text is empty or not a string")
            return value
        if self.source == "image":
            return resize_crop(decode_image(value), self.image_size, self.image_size).astype(np.float32)
        y = decode_audio(value, 16000, self.max_windows, 3.0)  # at least one window long
        n = len(y) // WINDOW
        return y[: n * WINDOW].reshape(n, WINDOW)

    def encode_batch(self, inputs: Sequence[Any]) -> np.ndarray:
        if not len(inputs):
            return np.empty((0, self.dim), np.float32)
        if self.source == "text":
            out = self._call(np.asarray(list(inputs), dtype=object))
        elif self.source == "image":
            out = self._call(np.stack(inputs))
        else:
            ends = np.cumsum([len(w) for w in inputs])[:-1]
            out = np.stack([v.mean(axis=0) for v in np.split(np.asarray(self._call(np.concatenate(inputs))), ends)])
        out = np.asarray(out, np.float32)
        self.dim = out.shape[-1]
        return out
