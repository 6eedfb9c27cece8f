"""Fetch media that the catalog names by URI, so later steps see bytes whether inline or referenced.

A catalog is data from outside, and a URI in it could name any file the worker can read. Media are read
only under the media roots (``--media_roots``; by default the catalog's own folder), after resolving the
real path (symlinks and ``..`` included), and only from regular files: a FIFO or a device could block a
worker forever or stream without end.

Images are read whole (a decoder needs all of them), up to ``--max_media_bytes``. A file read in parts
(audio: its decoder seeks to the few windows it keeps) is checked the same way but only hashed here, in
chunks, and handed on as a :class:`MediaFile` that its reader opens: a one-hour recording is never held
whole, and costs one streamed pass for its hash plus the windows decoded.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import stat
from typing import BinaryIO, Callable, Iterable, Iterator, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from mmfuse.transforms.deadletter import DEAD, dead_letter


class _Refused(ValueError):
    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return os.path.realpath(path[len("file://"):] if path.startswith("file://") else path)


def roots(paths: Iterable[str]) -> tuple[str, ...]:
    """Media roots as compared: local ones as real paths, others normalised, each ending with a separator."""
    out = []
    for path in paths:
        if _is_local(path):
            out.append(os.path.join(_local(path), ""))
        else:
            scheme, rest = path.split("://", 1)
            out.append(f"{scheme}://{posixpath.normpath(rest).strip('/')}/")
    return tuple(out)


def default_root(catalog: str) -> str:
    """The catalog's own folder: the path itself when it is a folder, else the folder of the file, or of the
    glob's first wildcard."""
    head = catalog
    for i, c in enumerate(catalog):
        if c in "*?[":
            return posixpath.dirname(catalog[:i])
    if _is_local(head):
        return head if os.path.isdir(_local(head)) else os.path.dirname(_local(head))
    return head if not head.endswith(".parquet") else posixpath.dirname(head)


CHUNK = 1 << 20  # bytes hashed at a time


class MediaFile(NamedTuple):
    """A file checked where the catalog named it, for a reader that reads only the parts it needs: its
    checked name (a real local path, or a normalised object name), size and SHA-256."""
    name: str
    size: int
    sha256: str

    def open(self) -> BinaryIO:
        """The file, opened for seekable binary reading."""
        if _is_local(self.name):
            return open(self.name, "rb")
        return FileSystems.open(self.name, compression_type="uncompressed")


@contextlib.contextmanager
def _open(uri: str, allowed: tuple[str, ...]):
    """``(name, file)`` for a regular file under ``allowed``; raises _Refused or OSError."""
    if not _is_local(uri):
        scheme, rest = uri.split("://", 1)
        name = f"{scheme}://{posixpath.normpath(rest)}"
        if not name.startswith(allowed):
            raise _Refused("media_outside_roots", "is outside --media_roots")
        if not FileSystems.exists(name):
            raise FileNotFoundError("file not found")
        with FileSystems.open(name, compression_type="uncompressed") as f:
            yield name, f
        return
    real = _local(uri)
    if not real.startswith(allowed):
        raise _Refused("media_outside_roots", "is outside --media_roots")
    # Opened without blocking (a FIFO would wait for a writer) and checked on the open file itself.
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _Refused("not_a_regular_file", "is not a regular file")
    with os.fdopen(fd, "rb") as f:
        yield real, f


def _read(uri: str, limit: int, allowed: tuple[str, ...]) -> bytes:
    """The bytes of a regular file under ``allowed``, at most ``limit``."""
    with _open(uri, allowed) as (_, f):
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _Refused("media_too_large", f"is larger than --max_media_bytes={limit}")
    return data


def _reference(uri: str, allowed: tuple[str, ...]) -> MediaFile:
    """A regular file under ``allowed``, hashed a chunk at a time."""
    digest, size = hashlib.sha256(), 0
    with _open(uri, allowed) as (name, f):
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return MediaFile(name, size, digest.hexdigest())


class FetchMedia(beam.PTransform):
    """Keyed items -> the same items with ``<kind>`` bytes read from ``<kind>_uri`` (with ``in_parts``, a
    :class:`MediaFile` for a reader that seeks: no size limit, as the file is never held).

    A missing, unreadable or too large file, one outside ``media_roots`` or not a regular file, and inline
    bytes over the size limit dead-letter that modality (stage ``media:<kind>``); the item goes on without
    it, keeping its other modalities.
    """

    def __init__(self, kind: str, max_bytes: int, media_roots: Iterable[str], in_parts: bool = False):
        super().__init__()
        self._kind, self._max_bytes, self._roots, self._in_parts = kind, max_bytes, roots(media_roots), in_parts

    def expand(self, items: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        kind, limit, allowed = self._kind, self._max_bytes, self._roots
        fetch_file = _reference if self._in_parts else lambda uri, allowed: _read(uri, limit, allowed)
        stage = f"media:{kind}"
        uri_key = f"{kind}_uri"

        def fetch(element: tuple[str, dict]) -> Iterator[tuple[str, dict] | beam.pvalue.TaggedOutput]:
            item_id, item = element
            uri, inline = item.get(uri_key), item.get(kind)
            if uri is None and (inline is None or len(inline) <= limit):
                yield element
                return
            item = dict(item)
            try:
                if uri is None:
                    raise _Refused("media_too_large", f"is {len(inline)} bytes, larger than "
                                                      f"--max_media_bytes={limit}")
                item[kind] = fetch_file(uri, allowed)
            except (OSError, _Refused) as e:
                if isinstance(e, _Refused):
                    error, what = e.error, f"{uri or '(inline bytes)'} {e}"
                elif isinstance(e, FileNotFoundError):
                    error, what = "missing_media", f"{uri}: file not found"
                else:
                    error, what = "unreadable_media", f"{uri}: {e.strerror or type(e).__name__}"
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
                    stage, item_id, error, f"{kind} {what}; the item goes on without its {kind}", item["source"]))
                item[kind] = item[uri_key] = None
            yield item_id, item

        return items | f"Fetch{kind.title()}" >> beam.FlatMap(fetch).with_outputs(DEAD, main="ok")


def has(kind: str) -> Callable[[tuple[str, dict]], bool]:
    """Predicate: the keyed item has this modality's media (bytes or a URI still to read)."""
    return lambda element: element[1].get(kind) is not None or element[1].get(f"{kind}_uri") is not None
