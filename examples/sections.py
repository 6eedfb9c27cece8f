"""Rewrite one generated section of a Markdown file, between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""
from __future__ import annotations

import sys
from pathlib import Path


def replace_section(doc: Path, name: str, body: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        sys.exit(f"{doc}: expected one {start} line followed by one {end} line")
    head, rest = text.split(start)
    doc.write_text(f"{head}{start}\n{body}\n{end}{rest.split(end)[1]}")
