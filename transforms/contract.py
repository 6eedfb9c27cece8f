"""The input data contract: which columns mean what, checked file by file and record by record.

Pure Python on plain dicts, so the rules are easy to test and the Beam steps stay thin. A whole-file
problem (not Parquet, required columns absent) raises :class:`ContractError` and stops the run before any
work starts; a record-level problem raises :class:`Invalid`, which the caller turns into a dead letter.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import posixpath
from typing import Any

UTC = dt.timezone.utc


class ContractError(Exception):
    """The input cannot be used at all; the message names the file and the problem."""


class Invalid(ValueError):
    """One record breaks the contract. ``error`` is a short class, the message says what to fix."""

    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error


@dataclasses.dataclass(frozen=True)
class CatalogColumns:
    item_id: str = "item_id"
    text: tuple[str, ...] = ("title", "description", "tags")
    image_bytes: str = "image_bytes"
    image_uri: str = "image_uri"
    audio_bytes: str = "audio_bytes"
    audio_uri: str = "audio_uri"
    vectors: tuple[tuple[str, int], ...] = ()  # declared precomputed vector modalities: (column, dim)
    updated_at: str = "updated_at"

    @property
    def content(self) -> tuple[str, ...]:
        return (*self.text, self.image_bytes, self.image_uri, self.audio_bytes, self.audio_uri,
                *(name for name, _ in self.vectors))

    @property
    def all(self) -> tuple[str, ...]:
        return (self.item_id, *self.content, self.updated_at)


@dataclasses.dataclass(frozen=True)
class InteractionColumns:
    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    event: str = "event"
    weight: str = "weight"

    @property
    def required(self) -> tuple[str, ...]:
        return (self.user_id, self.item_id, self.timestamp)

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.required, self.event, self.weight)


def check_catalog_schema(path: str, columns: set[str], spec: CatalogColumns) -> None:
    if spec.item_id not in columns:
        raise ContractError(f"{path}: catalog has no {spec.item_id!r} column (columns: {sorted(columns)})")
    if not columns & set(spec.content):
        raise ContractError(f"{path}: catalog has none of the content columns {list(spec.content)} "
                            f"(columns: {sorted(columns)}); set the column options to match your names")


def check_interactions_schema(path: str, columns: set[str], spec: InteractionColumns) -> None:
    missing = [c for c in spec.required if c not in columns]
    if missing:
        raise ContractError(f"{path}: interactions lack the required column(s) {missing} "
                            f"(columns: {sorted(columns)})")


def _id(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        raise Invalid(f"missing_{column}", f"{column} is null")
    if isinstance(value, int) and not isinstance(value, bool):  # integer ids (e.g. BigQuery's INT64)
        return str(value)
    if not isinstance(value, str):
        raise Invalid("wrong_type", f"{column} must be a string or an integer, got {type(value).__name__} "
                                    f"{value!r:.60}")
    if not value.strip():
        raise Invalid(f"empty_{column}", f"{column} is empty")
    return value


def _typed(row: dict, column: str, kinds: tuple[type, ...], what: str) -> Any:
    value = row.get(column)
    if value is not None and not isinstance(value, kinds):
        raise Invalid("wrong_type", f"{column} must be {what}, got {type(value).__name__} {value!r:.60}")
    return value


def _text(row: dict, column: str) -> str | list[str] | None:
    value = _typed(row, column, (str, list), "a string or a list of strings")
    if isinstance(value, list):
        value = [v for v in value if v is not None]  # a null element is dropped, not the whole item
        if not all(isinstance(v, str) for v in value):
            raise Invalid("wrong_type", f"{column} must be a list of strings, got {value!r:.60}")
        value = [v for v in value if v.strip()] or None
    elif isinstance(value, str) and not value.strip():
        value = None
    return value


def resolve_uri(uri: str, source_file: str) -> str:
    """A media URI as given, or resolved against the folder of the catalog file that names it."""
    if "://" in uri or uri.startswith("/"):
        return uri
    folder = posixpath.dirname(source_file)
    if "://" in folder:
        scheme, rest = folder.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, uri))}"
    return posixpath.normpath(posixpath.join(folder, uri))


def as_utc(value: Any, column: str) -> dt.datetime:
    """A timestamp, integer epoch seconds or an ISO-8601 string as an aware UTC datetime; naive timestamps
    are taken as UTC."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise Invalid("bad_timestamp", f"{column}={value!r:.60} is not an ISO-8601 timestamp") from None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return dt.datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise Invalid("bad_timestamp", f"{column}={value} is not a valid epoch second") from None
    if value is None:
        raise Invalid("bad_timestamp", f"{column} is null")
    raise Invalid("bad_timestamp", f"{column} must be a timestamp, integer seconds or an ISO-8601 string, "
                                   f"got {type(value).__name__} {value!r:.60}")


def catalog_item(row: dict, source_file: str, spec: CatalogColumns) -> dict:
    """One catalog row as a pipeline item; raises Invalid when it breaks the contract."""
    item_id = _id(row, spec.item_id)
    text = {c: v for c in spec.text if (v := _text(row, c)) is not None}
    media = {}
    for kind, bytes_col, uri_col in (("image", spec.image_bytes, spec.image_uri),
                                     ("audio", spec.audio_bytes, spec.audio_uri)):
        data = _typed(row, bytes_col, (bytes,), "binary")
        uri = _typed(row, uri_col, (str,), "a string")
        media[kind] = data
        media[f"{kind}_uri"] = resolve_uri(uri, source_file) if uri and data is None else None
    vectors = {}
    for name, _ in spec.vectors:
        value = _typed(row, name, (list,), "a list of floats")
        if value is not None:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise Invalid("wrong_type", f"{name} must be a list of floats, got {value!r:.60}")
            vectors[name] = value
    updated = row.get(spec.updated_at)
    return {"item_id": item_id, "text": text, **media, "vectors": vectors,
            "updated_at": None if updated is None else as_utc(updated, spec.updated_at)}


def interaction(row: dict, spec: InteractionColumns, not_after: dt.datetime) -> dict:
    """One interaction row, timestamp as epoch seconds; raises Invalid when it breaks the contract."""
    user_id = _id(row, spec.user_id)
    item_id = _id(row, spec.item_id)
    when = as_utc(row.get(spec.timestamp), spec.timestamp)
    if when.timestamp() < 0 or when > not_after:
        raise Invalid("bad_timestamp", f"{spec.timestamp}={when.isoformat()} is outside 1970-01-01 .. "
                                       f"{not_after.isoformat()} (the end of the run date)")
    event = _typed(row, spec.event, (str,), "a string")
    weight = _typed(row, spec.weight, (int, float), "a number")
    if weight is not None and (isinstance(weight, bool) or not math.isfinite(weight)):
        raise Invalid("bad_weight", f"{spec.weight}={weight!r} is not a finite number")
    if weight is not None and weight < 0:  # a user vector is a weighted mean of what the user took
        raise Invalid("bad_weight", f"{spec.weight}={weight!r} is negative")
    return {"user_id": user_id, "item_id": item_id, "timestamp": int(when.timestamp()),
            "event": event, "weight": None if weight is None else float(weight)}
