"""Read PyTorch state dicts into numpy without torch, and without letting the file run code.

A ``.pth`` file is a pickle, and unpickling can call any importable function (``os.system`` included),
so weights are read by an unpickler that resolves only the few globals a state dict needs and refuses
every other one. Both of torch's formats are read: the legacy one (a sequence of pickles followed by the
raw storages) and the zip one (``archive/data.pkl`` plus one member per storage).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile
from os import PathLike
from typing import IO, Any, Sequence

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands in for a ``torch.*Storage`` class: only its element type matters."""
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    """A storage named by the pickle; its bytes come later (legacy) or from another zip member."""
    key: str
    dtype: np.dtype
    offset: int  # in elements, non-zero for a legacy view into a larger storage


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage: _StorageRef, storage_offset: int, size: Sequence[int], stride: Sequence[int],
                    *_ignored: Any) -> _TensorRef:
    """Replaces torch._utils._rebuild_tensor(_v2); requires_grad, hooks and metadata do not matter here."""
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves OrderedDict, the tensor rebuild functions and storage types; refuses any other global."""

    def __init__(self, file: IO[bytes]):
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
        raise pickle.UnpicklingError(
            f"refusing global {module}.{name}: a weights file may only reference tensors, storages "
            f"and OrderedDict")

    def persistent_load(self, pid: Any) -> _StorageRef:
        # legacy: ('storage', type, root_key, location, numel, view_metadata); zip: the first five.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.200}")
        key, dtype = str(pid[2]), pid[1].dtype
        view = pid[5] if len(pid) == 6 else None
        if self.storages.setdefault(key, _StorageRef(key, dtype, 0)).dtype != dtype:
            raise pickle.UnpicklingError(f"storage {key} is used with two element types")
        return _StorageRef(key, dtype, int(view[1])) if view else self.storages[key]


def load_state_dict(path: str | PathLike) -> collections.OrderedDict[str, np.ndarray]:
    """Tensor name -> numpy array (a copy, with torch's offset, size and stride applied)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] == b"PK\x03\x04":
        obj, storages = _load_zip(data)
    else:
        obj, storages = _load_legacy(io.BytesIO(data))
    if not isinstance(obj, dict) or not all(isinstance(v, _TensorRef) for v in obj.values()):
        raise pickle.UnpicklingError(f"{path} does not hold a state dict (name -> tensor)")
    return collections.OrderedDict((str(k), _to_array(t, storages)) for k, t in obj.items())


def _safe_load(f: IO[bytes]) -> Any:
    return RestrictedUnpickler(f).load()


def _load_legacy(f: io.BytesIO):
    try:
        magic, protocol, sys_info = _safe_load(f), _safe_load(f), _safe_load(f)
    except Exception as e:
        raise pickle.UnpicklingError(f"not a torch checkpoint: {e}") from e
    if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
        raise pickle.UnpicklingError(f"not a legacy torch checkpoint (magic {magic!r:.40}, "
                                     f"protocol {protocol!r:.40})")
    order = "<" if sys_info.get("little_endian", True) else ">"
    unpickler = RestrictedUnpickler(f)
    obj = unpickler.load()
    storages = {}
    for key in _safe_load(f):
        ref = unpickler.storages.get(str(key))
        if ref is None:
            raise pickle.UnpicklingError(f"storage {key} has bytes but no tensor")
        numel = int.from_bytes(f.read(8), "little" if order == "<" else "big")
        raw = f.read(numel * ref.dtype.itemsize)
        if len(raw) != numel * ref.dtype.itemsize:
            raise pickle.UnpicklingError(f"checkpoint truncated inside storage {key}")
        storages[ref.key] = np.frombuffer(raw, ref.dtype.newbyteorder(order))
    return obj, storages


def _load_zip(data: bytes):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise pickle.UnpicklingError("zip checkpoint without exactly one */data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        order = "<"
        if prefix + "byteorder" in zf.namelist():
            order = "<" if zf.read(prefix + "byteorder").strip() == b"little" else ">"
        unpickler = RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])))
        obj = unpickler.load()
        storages = {key: np.frombuffer(zf.read(f"{prefix}data/{key}"), ref.dtype.newbyteorder(order))
                    for key, ref in unpickler.storages.items()}
    return obj, storages


def _to_array(t: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    buf = storages.get(t.storage.key)
    if buf is None:
        raise pickle.UnpicklingError(f"storage {t.storage.key} has no bytes")
    start = t.storage.offset + t.offset
    last = start + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if (len(t.size) != len(t.stride) or start < 0 or min(t.stride + t.size, default=0) < 0
            or (all(t.size) and last >= len(buf))):
        raise pickle.UnpicklingError(f"tensor (offset {start}, size {t.size}, stride {t.stride}) "
                                     f"lies outside its storage of {len(buf)} elements")
    if not all(t.size):
        return np.zeros(t.size, buf.dtype.newbyteorder("="))
    view = np.lib.stride_tricks.as_strided(
        buf[start:], t.size, [s * buf.itemsize for s in t.stride], writeable=False)
    return np.ascontiguousarray(view, dtype=buf.dtype.newbyteorder("="))
