"""The local engine: Beam's Python FnApiRunner, in memory by default, multi-process on request.

Named explicitly because Beam's plain ``DirectRunner`` first tries the Prism runner, whose binary it
downloads at run time (impossible offline). ``--direct_running_mode=multi_processing
--direct_num_workers=N`` runs N real SDK worker processes over the Fn API, as Dataflow and Flink do.
"""
from __future__ import annotations

from apache_beam.runners.portability.fn_api_runner import FnApiRunner

NAMES = ("directrunner", "fnapirunner", "inmemoryrunner")


def is_local(name: str | None) -> bool:
    """Whether ``--runner`` names the local engine (or nothing). Beam accepts a name in any case, with or
    without "Runner" (``direct``), so every such spelling must come here rather than reach Prism."""
    return name is None or name.lower() in NAMES or f"{name.lower()}runner" in NAMES


def runner() -> FnApiRunner:
    return FnApiRunner()
