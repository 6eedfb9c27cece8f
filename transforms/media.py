"""Fetch media that the catalog names by URI, so later steps see bytes whether inline or referenced."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.deadletter import DEAD, dead_letter


class _TooLarge(ValueError):
    pass


def _read(uri: str, limit: int) -> bytes:
    with FileSystems.open(uri, compression_type="uncompressed") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _TooLarge(f"larger than --max_media_bytes={limit}")
    return data


class FetchMedia(beam.PTransform):
    """Keyed items -> the same items with ``<kind>`` bytes read from ``<kind>_uri``.

    A missing, unreadable or too large file, or inline bytes over the size limit, dead-letter that modality
    (stage ``media:<kind>``); the item goes on without it, keeping its other modalities.
    """

    def __init__(self, kind: str, max_bytes: int):
        super().__init__()
        self._kind, self._max_bytes = kind, max_bytes

    def expand(self, items):
        kind, limit = self._kind, self._max_bytes
        stage = f"media:{kind}"
        uri_key = f"{kind}_uri"

        def fetch(element):
            item_id, item = element
            uri, inline = item.get(uri_key), item.get(kind)
            if uri is None and (inline is None or len(inline) <= limit):
                yield element
                return
            item = dict(item)
            try:
                if uri is None:
                    raise _TooLarge(f"{len(inline)} bytes, larger than --max_media_bytes={limit}")
                if not FileSystems.exists(uri):
                    raise FileNotFoundError("file not found")
                item[kind] = _read(uri, limit)
            except (OSError, ValueError) as e:
                error = ("missing_media" if isinstance(e, FileNotFoundError)
                         else "media_too_large" if isinstance(e, _TooLarge) else "unreadable_media")
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
                    stage, item_id, error, f"{kind} {uri or '(inline bytes)'}: {e}; the item goes on without its "
                    f"{kind}", item["source"]))
                item[kind] = item[uri_key] = None
            yield item_id, item

        return items | f"Fetch{kind.title()}" >> beam.FlatMap(fetch).with_outputs(DEAD, main="ok")


def has(kind: str):
    """Predicate: the keyed item has this modality's media (bytes or a URI still to read)."""
    return lambda element: element[1].get(kind) is not None or element[1].get(f"{kind}_uri") is not None
