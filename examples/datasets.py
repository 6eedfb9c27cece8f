"""Where the public data sets the examples, benchmarks and tests read are kept.

``$MMFUSE_DATA`` names a folder holding ``movielens/`` (ml-latest-small/ and posters/), ``fsdd/``
(recordings/) and ``music/``. Without it, a ``data/`` folder of that shape inside any folder beside the
checkout is used (a data mount shared by several checkouts), when there is one.
"""
from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def root() -> Path:
    if os.environ.get("MMFUSE_DATA"):
        return Path(os.environ["MMFUSE_DATA"])
    beside = sorted(p / "data" for p in _CHECKOUT.parent.iterdir()
                    if p != _CHECKOUT and (p / "data" / "movielens").is_dir())
    return beside[0] if beside else _CHECKOUT / "data"
