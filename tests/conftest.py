"""Shared fixtures: the generated demo data, the public data sets, and running a job in-process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples import datasets, demo_data
from mmfuse.runners import process
from mmfuse.transforms.parquet import read_dataset

process.prepare()

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = datasets.root()
RUN_DATE = "2026-11-27"
# A few alignment epochs: the tests check the pipeline, not the model's quality (pipelines/evaluate.py does).
DEMO_FLAGS = ["--vector_columns=features:16", f"--run_date={RUN_DATE}", "--align_epochs=3"]
# musicnn is left out to keep the suite short; tests/test_audio_encoder.py covers it.
MODALITIES = "--modalities=text,image,audio_mfcc,features"


def shared(*parts: str) -> Path:
    """A path under the public data sets' folder (``examples.datasets``), skipping the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the public data sets ($MMFUSE_DATA)")
    return path


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, Path]:
    return demo_data.generate(tmp_path_factory.mktemp("demo"), n_items=120, n_users=60, seed=0)


def nightly_args(demo, output, *extra: str) -> list[str]:
    """The demo's media lie beside its catalog folder, not in it: they are allowed explicitly."""
    media = demo.get("media", Path(demo.get("root", "")) / "media")
    return [f"--catalog={demo['catalog']}", f"--interactions={demo['interactions']}", f"--output={output}",
            f"--media_roots={media}", *DEMO_FLAGS, MODALITIES, *extra]


@pytest.fixture(scope="session")
def demo_night(demo, tmp_path_factory) -> Path:
    """One nightly run on the demo data in memory, which several tests compare against: read it, never write
    under it (copy it first)."""
    from mmfuse.pipelines import nightly
    out = tmp_path_factory.mktemp("demo_night")
    assert nightly.main(nightly_args(demo, out)) == 0
    return out / RUN_DATE


@pytest.fixture(scope="session")
def movielens_night(tmp_path_factory) -> dict:
    """MovieLens-small converted to the contract and its first nightly run (skips without the shared data):
    ``paths`` (catalog, interactions), ``out`` (the output root) and ``first`` (the run folder)."""
    from examples import movielens
    tmp = tmp_path_factory.mktemp("movielens")
    paths = movielens.convert(shared("movielens"), tmp / "ml")
    out = tmp / "out"
    return {"paths": paths, "out": out, "first": movielens_run(paths, out, "2026-11-25")}


def movielens_run(paths: dict, out: Path, date: str, catalog=None, media=()) -> Path:
    from mmfuse.pipelines import nightly
    # The first night fits the alignment for one epoch (its quality is pipelines/evaluate.py's business);
    # the next night reuses that artifact, as a nightly schedule with --refit=never|weekly does.
    assert nightly.main([f"--catalog={catalog or paths['catalog']}", f"--interactions={paths['interactions']}",
                         f"--media_roots={','.join(map(str, [paths['media'], *media]))}",
                         f"--output={out}", f"--run_date={date}", "--align_epochs=1", "--refit=never"]) == 0
    return out / date


def metrics(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


VOLATILE = ("run_id", "files", "stage_seconds")  # metrics.json keys that differ between two runs of one night


def comparable(report: dict) -> dict:
    """A run's metrics without what differs between two runs of the same inputs."""
    return {k: v for k, v in report.items() if k not in VOLATILE}


def dataset(run_dir: str | Path, name: str):
    return read_dataset(str(run_dir), name)


def sorted_rows(table, *keys: str) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: tuple(str(r[k]) for k in keys))
