"""Where the public data sets the examples, benchmarks and tests read are kept.

``$MMFUSE_DATA`` names a folder holding ``movielens/`` (ml-latest-small/ and posters/), ``fsdd/``
(recordings/) and ``music/``; without it, a ``shared/data`` folder beside the checkout is used when present.
"""
from __future__ import annotations

import os
from pathlib import Path

_BESIDE = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def root() -> Path:
    return Path(os.environ.get("MMFUSE_DATA") or _BESIDE)
