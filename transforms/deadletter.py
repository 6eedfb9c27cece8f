"""Dead letters: every record a stage cannot use, with enough said that a person can fix it."""
from __future__ import annotations

import pyarrow as pa

DEAD = "dead"  # tag of every stage's dead-letter output

SCHEMA = pa.schema([
    ("stage", pa.string()),    # where it was refused, e.g. "catalog", "media:image", "encode:text"
    ("key", pa.string()),      # item_id / user_id, or the source row when there is no usable key
    ("error", pa.string()),    # short error class, e.g. "duplicate_item_id"
    ("message", pa.string()),  # what is wrong and what was done about it
    ("source", pa.string()),   # file#row the record came from
])


MAX_CHARS = 500  # of a message or key: a bad record's values are echoed capped, never whole


def _capped(text: str) -> str:
    return text if len(text) <= MAX_CHARS else f"{text[:MAX_CHARS]}... ({len(text)} characters)"


def dead_letter(stage: str, key: str | None, error: str, message: str, source: str | None) -> dict:
    return {"stage": stage, "key": _capped(key if key else (source or "")), "error": error,
            "message": _capped(message), "source": source or ""}
