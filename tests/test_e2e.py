"""End to end on the generated demo data: runners agree, and a killed run is never taken as complete."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import nightly
from tests.conftest import DEMO_FLAGS, ROOT, RUN_DATE, dataset, metrics, sorted_rows

pytestmark = pytest.mark.slow
DATASETS = {"embeddings": ("item_id",), "dead_letter": ("stage", "key", "source")}


def _nightly(demo, output: Path, *extra: str) -> Path:
    assert nightly.main([f"--catalog={demo['catalog']}", f"--interactions={demo['interactions']}",
                         f"--output={output}", *DEMO_FLAGS, *extra]) == 0
    return output / RUN_DATE


def _comparable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("run_id", "files")}


def test_multi_process_run_equals_in_memory_run(demo, tmp_path):
    in_memory = _nightly(demo, tmp_path / "mem")
    multi = _nightly(demo, tmp_path / "multi", "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    assert _comparable(metrics(in_memory)) == _comparable(metrics(multi))
    for name, keys in DATASETS.items():
        a, b = dataset(in_memory, name), dataset(multi, name)
        assert a.schema == b.schema
        assert sorted_rows(a, *keys) == sorted_rows(b, *keys), name
    assert len(dataset(in_memory, "embeddings")) == 120


def test_killed_run_leaves_no_success_and_rerun_replaces_it(demo, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipelines.nightly", f"--catalog={demo['catalog']}",
            f"--interactions={demo['interactions']}", f"--output={out}", *DEMO_FLAGS]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not any((out / "_staging").glob("*/*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / RUN_DATE / "_SUCCESS").exists()
    # A run killed in the middle of its commit would leave a date folder without _SUCCESS; simulate one.
    (out / RUN_DATE / "embeddings").mkdir(parents=True, exist_ok=True)
    (out / RUN_DATE / "embeddings" / "part-99999-of-99999.parquet").write_text("partial")

    run_dir = _nightly(demo, out)
    assert (run_dir / "_SUCCESS").exists()
    assert not (run_dir / "embeddings" / "part-99999-of-99999.parquet").exists()
    assert len(dataset(run_dir, "embeddings")) == 120
    assert list((out / "_staging").iterdir()) == []
