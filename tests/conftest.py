"""Shared fixtures: the generated demo data, the shared real data, and running a job in-process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples import demo_data
from transforms.parquet import read_dataset

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
RUN_DATE = "2026-11-27"
# A few alignment epochs: the tests check the pipeline, not the model's quality (pipelines/evaluate.py does).
DEMO_FLAGS = ["--vector_columns=features:16", f"--run_date={RUN_DATE}", "--align_epochs=3"]


def shared(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when it is absent (a user's fresh clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared real data")
    return path


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, Path]:
    return demo_data.generate(tmp_path_factory.mktemp("demo"), n_items=120, n_users=60, seed=0)


def metrics(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def dataset(run_dir: str | Path, name: str):
    return read_dataset(str(run_dir), name)


def sorted_rows(table, *keys: str) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: tuple(str(r[k]) for k in keys))
