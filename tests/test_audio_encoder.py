"""Audio decoding and the two audio encoders; the musicnn port is checked against the original TF1 graph."""
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from examples import datasets
from mmfuse.models.audio import MfccAudioEncoder, MusicnnAudioEncoder, decode_audio
from mmfuse.models.base import InputError

FIXTURE = Path(__file__).parent / "fixtures" / "musicnn_golden.npz"
MUSIC = datasets.root() / "music"
FSDD = datasets.root() / "fsdd" / "recordings"
needs_musicnn = pytest.mark.skipif(importlib.util.find_spec("musicnn") is None,
                                   reason="musicnn weights not installed (pip install --no-deps musicnn==0.1.0)")


def encode(audio: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    y = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.stack([y] * channels, axis=1)


@pytest.fixture(scope="module")
def musicnn():
    return MusicnnAudioEncoder()


@pytest.fixture(scope="module")
def golden():
    return np.load(FIXTURE)


@needs_musicnn
@pytest.mark.slow
def test_port_matches_original_graph(musicnn, golden):
    synthetic = golden["synthetic_codes"].astype(np.float32) / 32
    np.testing.assert_allclose(musicnn.embed_patches(synthetic), golden["synthetic_penultimate"], atol=1e-4)
    music = golden["music_patches"].astype(np.float32)
    np.testing.assert_allclose(musicnn.embed_patches(music), golden["music_penultimate"], atol=1e-4)


@needs_musicnn
@pytest.mark.slow
@pytest.mark.skipif(not MUSIC.is_dir(), reason="no music data set ($MMFUSE_DATA)")
def test_preprocess_reproduces_fixture_patches(musicnn, golden):
    name, start_s, length_s = golden["music_source"]
    info = sf.info(MUSIC / name)
    y, sr = sf.read(MUSIC / name, start=int(float(start_s) * info.samplerate),
                    frames=int(float(length_s) * info.samplerate), dtype="float32")
    patches = musicnn.preprocess(encode(y, sr, "WAV", "FLOAT"))
    np.testing.assert_allclose(patches, golden["music_patches"].astype(np.float32), atol=5e-3)  # fixture is float16


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", None), ("OGG", "VORBIS"),
                                         pytest.param("MP3", None, marks=pytest.mark.skipif(
                                             "MP3" not in sf.available_formats(), reason="no MP3 in libsndfile"))])
def test_decode_formats_stereo_8k(fmt, subtype):
    y = decode_audio(encode(tone(4.0, 8000, channels=2), 8000, fmt, subtype))
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 4 * 16000) <= 1200  # MP3 adds encoder delay and padding
    assert 0.3 < np.abs(y).max() < 0.7


def test_short_clip_is_padded_and_silence_is_valid():
    y = decode_audio(encode(tone(0.5, 8000), 8000, "WAV"))
    assert len(y) == 48000 and np.abs(y[:7000]).max() > 0.3 and not y[9000:].any()
    assert not decode_audio(encode(np.zeros(1000), 16000, "WAV")).any()


class CountingReader(io.FileIO):
    """A file that counts the bytes read from it."""
    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        self.read_bytes += len(data)
        return data

    def readinto(self, buffer):
        n = super().readinto(buffer)
        self.read_bytes += n or 0
        return n


def test_long_clip_is_capped_to_evenly_spaced_windows_read_from_the_file_in_parts(tmp_path):
    """A long recording costs its windows: from a file, only they are read (a one-hour WAV is never held)."""
    sr, n = 8000, 10 * 60 * 8000
    path = tmp_path / "long.wav"
    sf.write(path, np.arange(n) / n, sr, subtype="PCM_16")  # a ramp: each sample tells where it came from
    with CountingReader(path) as f:
        y = decode_audio(f, sr=16000, max_windows=10, window_s=3.0)
    assert f.read_bytes < path.stat().st_size / 10  # 30 s of 600 s, plus the header
    assert y.tobytes() == decode_audio(path.read_bytes(), sr=16000, max_windows=10, window_s=3.0).tobytes()
    assert len(y) == 10 * 3 * 16000
    middles = y[24000::48000]
    expected = (np.linspace(0, n - 24000, 10).astype(int) + 12000) / n
    np.testing.assert_allclose(middles, expected, atol=1e-3)


def test_bad_inputs_raise_with_reason():
    wav = encode(tone(1.0, 8000), 8000, "WAV")
    ogg = encode(tone(1.0, 8000), 8000, "OGG")
    cases = {
        "empty_audio": [b"", encode(np.zeros((0, 1)), 8000, "WAV")],
        "corrupt_audio": [wav[:30], ogg[:100] + bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8)),
                          encode(np.array([0.0, np.nan, 0.1]), 8000, "WAV", "FLOAT")],
        "unsupported_format": [bytes.fromhex("ffd8ffe000104a4649460001") + bytes(500), b"plain text, no audio"],
    }
    for reason, values in cases.items():
        for value in values:
            with pytest.raises(InputError) as err:
                decode_audio(value)
            assert err.value.reason == reason, (reason, value[:12])


@pytest.mark.skipif(not MUSIC.is_dir(), reason="no music data set ($MMFUSE_DATA)")
def test_real_music_ogg_decodes():
    path = sorted(MUSIC.glob("*.ogg"))[0]
    y = decode_audio(path.read_bytes())
    assert np.isfinite(y).all() and len(y) >= 48000 and np.abs(y).max() > 0.01


@needs_musicnn
@pytest.mark.slow
def test_musicnn_vectors(musicnn):
    clips = [encode(tone(s, 22050), 22050, "OGG") for s in (1.0, 7.0)]
    inputs = [musicnn.preprocess(c) for c in clips]
    assert [len(p) for p in inputs] == [1, 2]
    out = musicnn.encode_batch(inputs)
    assert out.shape == (2, 200) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out[1], musicnn.embed_patches(inputs[1]).mean(axis=0), atol=1e-5)
    assert musicnn.identifier.startswith("musicnn-MTT@")


@pytest.mark.skipif(not FSDD.is_dir(), reason="no FSDD data set ($MMFUSE_DATA)")
def test_mfcc_vectors_differ_between_digits():
    enc = MfccAudioEncoder()
    out = enc.encode_batch([enc.preprocess((FSDD / f"{d}_george_0.wav").read_bytes()) for d in (1, 7)])
    assert out.shape == (2, enc.dim) == (2, 160) and out.dtype == np.float32 and np.isfinite(out).all()
    assert np.abs(out[0] - out[1]).max() > 1.0
    assert enc.identifier.startswith("mfcc-40-delta@v1")


def test_errors_name_the_format_never_the_content():
    with pytest.raises(InputError) as err:
        decode_audio(b"DB_PASSWORD=hunter2\n")
    assert "20 bytes: text" in str(err.value) and "hunter2" not in str(err.value)
