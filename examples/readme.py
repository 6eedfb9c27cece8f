"""Rewrite one generated section of the README, between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""
from __future__ import annotations

import sys
from pathlib import Path


def replace_section(readme: Path, name: str, body: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        sys.exit(f"{readme}: expected one {start} line followed by one {end} line")
    head, rest = text.split(start)
    readme.write_text(f"{head}{start}\n{body}\n{end}{rest.split(end)[1]}")
