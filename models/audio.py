"""Audio encoders: MFCC statistics (no weights, always available) and musicnn (MagnaTagATune) embeddings.

Both share :func:`decode_audio`, which bounds the cost of any file: a long recording is reduced to a few
evenly spaced windows before it is resampled, so a one-hour file costs what 30 s of audio costs.
"""
from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Sequence

import librosa
import numpy as np
import soundfile as sf

from mmfuse.models.base import Encoder, InputError, describe_bytes, settle
from mmfuse.models.weights import digest, package_file

if TYPE_CHECKING:
    import keras


def _sniff(data: bytes) -> str | None:
    """Container named by the leading bytes; None when it is no audio format we decode."""
    head = bytes(data[:12])
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        return "OGG"
    # ID3 tag, or an MPEG audio frame sync with its layer bits set (which excludes ADTS AAC)
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06):
        return "MP3"
    return None


def decode_audio(data: bytes | bytearray | memoryview | BinaryIO, sr: int = 16000, max_windows: int = 10,
                 window_s: float = 3.0) -> np.ndarray:
    """Decode WAV/AIFF/FLAC/OGG/MP3 (bytes, or a seekable binary file) to float32 mono at ``sr``, at least
    ``window_s`` long (zero-padded).

    A clip longer than ``max_windows * window_s`` keeps only ``max_windows`` evenly spaced windows of
    ``window_s``, concatenated; only those frames are read (seek) and resampled, so the cost is bounded and
    a file is never read whole. Silence is valid; raises InputError "empty_audio", "unsupported_format" or
    "corrupt_audio".
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = io.BytesIO(data)
    elif not all(hasattr(data, a) for a in ("read", "seek", "tell")):
        raise InputError("unsupported_format", f"expected audio bytes or a file, got {type(data).__name__}")
    head, size = data.read(512), data.seek(0, io.SEEK_END)
    data.seek(0)
    if not head:
        raise InputError("empty_audio", "no audio bytes")
    fmt = _sniff(head)
    if fmt is None:
        raise InputError("unsupported_format", f"not WAV/AIFF/FLAC/OGG/MP3 ({size} bytes: {describe_bytes(head)})")
    if fmt not in sf.available_formats():
        raise InputError("unsupported_format", f"libsndfile {sf.__libsndfile_version__} cannot decode {fmt}")
    try:
        with sf.SoundFile(data) as f:
            native, win = f.samplerate, int(round(window_s * f.samplerate))
            if f.frames > max_windows * win:
                chunks = []
                for start in np.linspace(0, f.frames - win, max_windows).astype(int):
                    f.seek(start)
                    chunks.append(f.read(win, dtype="float32", always_2d=True))
            else:
                chunks = [f.read(dtype="float32", always_2d=True)]
    except RuntimeError as e:  # soundfile.LibsndfileError included
        raise InputError("corrupt_audio", f"{fmt}: {e}") from e
    if sum(len(c) for c in chunks) == 0:
        raise InputError("empty_audio", f"{fmt} file holds no audio frames (empty or truncated)")
    if not all(np.isfinite(c).all() for c in chunks):
        raise InputError("corrupt_audio", "non-finite samples")
    out_win = int(round(window_s * sr))
    mono = [librosa.resample(c.mean(axis=1), orig_sr=native, target_sr=sr, res_type="soxr_hq") for c in chunks]
    if len(chunks) > 1:  # resampled windows may be off by a sample: keep each exactly window_s long
        mono = [librosa.util.fix_length(m, size=out_win) for m in mono]
    y = np.concatenate(mono)
    return np.pad(y, (0, max(0, out_win - len(y)))).astype(np.float32, copy=False)


_MFCC = dict(n_mfcc=40, n_fft=512, hop_length=256, n_mels=64)


class MfccAudioEncoder(Encoder):
    """40 MFCCs and their deltas, mean and standard deviation over time: a cheap timbre fingerprint."""

    modality = "audio_mfcc"
    dim = 160

    def __init__(self, sr: int = 16000, max_windows: int = 10, window_s: float = 3.0):
        self.sr, self.max_windows, self.window_s = sr, max_windows, window_s

    @property
    def identifier(self) -> str:
        p = _MFCC
        return (f"mfcc-40-delta@v1:sr{self.sr}-fft{p['n_fft']}-hop{p['hop_length']}-mels{p['n_mels']}"
                f"-{self.max_windows}x{self.window_s:g}s")

    def preprocess(self, value: bytes) -> np.ndarray:
        y = decode_audio(value, self.sr, self.max_windows, self.window_s)
        m = librosa.feature.mfcc(y=y, sr=self.sr, **_MFCC)
        feats = np.concatenate([m, librosa.feature.delta(m)])
        return np.concatenate([feats.mean(axis=1), feats.std(axis=1)]).astype(np.float32)

    def encode_batch(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(inputs).astype(np.float32) if len(inputs) else np.empty((0, self.dim), np.float32)


PATCH_FRAMES, N_MELS = 187, 96  # musicnn's 3 s input at 16 kHz, hop 256


def _tf1_name(scope: str, i: int) -> str:
    """tf.compat.v1.layers naming: the i-th layer of a kind is "scope", "scope_1", ..."""
    return scope if i == 0 else f"{scope}_{i}"


def _musicnn_penultimate():
    """Keras 3 rebuild of musicnn's ``build_musicnn`` (MTT, 64 mid-end filters), up to the 200-d penultimate.

    Layers carry the TF1 variable scopes of the original graph (creation order), so the checkpoint loads
    by name. keras.ops only, so it runs on any Keras backend. The 50-tag logits layer is left out.
    """
    import keras
    from keras import layers, ops

    def bn(i: int) -> layers.BatchNormalization:
        return layers.BatchNormalization(epsilon=1e-3, name=_tf1_name("batch_normalization", i))

    def conv_max(i: int, x: Any, filters: int, kernel: tuple[int, int], padding: str) -> Any:
        # conv, relu, BN, then max over all frequency bins
        x = layers.Conv2D(filters, kernel, padding=padding, activation="relu", name=_tf1_name("conv2d", i))(x)
        return ops.max(bn(i + 1)(x), axis=2)

    spec = keras.Input((PATCH_FRAMES, N_MELS))
    x = bn(0)(ops.expand_dims(spec, -1))
    padded = ops.pad(x, [[0, 0], [3, 3], [0, 0], [0, 0]])  # timbral filters: 'same' in time, 'valid' in freq
    front = [conv_max(0, padded, 204, (7, 38), "valid"), conv_max(1, padded, 204, (7, 67), "valid"),
             conv_max(2, x, 51, (128, 1), "same"), conv_max(3, x, 51, (64, 1), "same"),
             conv_max(4, x, 51, (32, 1), "same")]
    mid = [ops.concatenate(front, axis=-1)]  # (B, T, 561); a (7, 561) 2-D conv on it is a 1-D conv
    for i in (5, 6, 7):
        y = bn(i + 1)(layers.Conv1D(64, 7, padding="same", activation="relu", name=_tf1_name("conv2d", i))(mid[-1]))
        mid.append(y if i == 5 else y + mid[-1])  # residual connections after the first
    feats = ops.concatenate(mid, axis=-1)  # (B, T, 753)
    pooled = layers.Flatten()(ops.stack([ops.max(feats, axis=1), ops.mean(feats, axis=1)], axis=-1))
    out = bn(10)(layers.Dense(200, activation="relu", name="dense")(bn(9)(pooled)))
    return keras.Model(spec, out, name="musicnn_mtt_penultimate")


def _load_tf1_checkpoint(model: keras.Model, folder: Path) -> None:
    """Copy the model tensors of a TF1 checkpoint into same-named Keras variables (optimiser state is ignored).

    ``NewCheckpointReader("<dir>/")`` reads the unnamed ``.index``/``.data`` pair directly; the folder's
    ``checkpoint`` file points at its author's machine, so ``tf.train.load_checkpoint`` cannot be used.
    """
    import tensorflow as tf

    reader = tf.compat.v1.train.NewCheckpointReader(str(folder) + "/")
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([reader.get_tensor(f"{layer.name}/{v.name}").reshape(v.shape) for v in layer.weights])


class MusicnnAudioEncoder(Encoder):
    """musicnn MTT_musicnn: the 200-d penultimate layer per 3 s patch, averaged over a clip's patches."""

    modality = "audio_musicnn"
    dim = 200

    def __init__(self, max_windows: int = 10, chunk: int = 16):
        folder = package_file("musicnn", "MTT_musicnn")
        # patches per forward pass: bounds peak memory (on CPU 32 patches take ~0.4 GB beyond the model)
        self.max_windows, self.chunk = max_windows, chunk
        self._folder = folder
        self._identifier = f"musicnn-MTT@{digest(*sorted(folder.glob('.data-*')))}:{max_windows}x3s"

    @functools.cached_property
    def _model(self):
        """Built on first use, so an encoder made only to compute spectrograms costs no network."""
        model = _musicnn_penultimate()
        _load_tf1_checkpoint(model, self._folder)
        settle(model, *(np.zeros((n, PATCH_FRAMES, N_MELS), np.float32) for n in (1, 2)))
        return model

    @property
    def identifier(self) -> str:
        return self._identifier

    def preprocess(self, value: bytes) -> np.ndarray:
        """(n_patches, 187, 96) log-mel patches, non-overlapping as in musicnn's extractor (the tail is dropped).

        Kept in float32: the original's float16 cast overflows to inf on loud music.
        """
        y = decode_audio(value, 16000, self.max_windows, 3.0)
        mel = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=256, n_mels=N_MELS).T
        rep = np.log10(10000 * mel + 1).astype(np.float32)
        n = len(rep) // PATCH_FRAMES  # >= 1: decode_audio pads to 3 s (188 frames)
        return rep[: n * PATCH_FRAMES].reshape(n, PATCH_FRAMES, N_MELS)

    def embed_patches(self, patches: np.ndarray) -> np.ndarray:
        """Penultimate embedding of each patch, run in chunks of ``chunk`` patches."""
        return np.concatenate([np.asarray(self._model.predict_on_batch(patches[i:i + self.chunk]))
                               for i in range(0, len(patches), self.chunk)]).astype(np.float32)

    def encode_batch(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        if not len(inputs):
            return np.empty((0, self.dim), np.float32)
        per_patch = self.embed_patches(np.concatenate(inputs))
        ends = np.cumsum([len(p) for p in inputs])[:-1]
        return np.stack([e.mean(axis=0) for e in np.split(per_patch, ends)])
