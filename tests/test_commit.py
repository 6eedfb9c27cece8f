"""A rerun of a date never loses the night: killed at any step of its commit, or racing another run of the
same date, the date ends with one complete night, never a partial one marked complete."""
import json
import os
import socket
import subprocess

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, RUN_DATE, dataset, metrics

STEPS = ("journal", "unmark", "clear", "move", "mark", "clean")  # transforms/runs.py, in commit order

pytestmark = pytest.mark.slow  # every test here runs a pipeline


def _ingest(catalog, demo, out, *extra, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / ".venv" / "bin" / "mmfuse"), "ingest", f"--catalog={catalog}",
                           f"--interactions={demo['interactions']}", f"--output={out}", f"--run_date={RUN_DATE}",
                           "--runner=DirectRunner", "--max_dead_fraction=1", *extra], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


@pytest.fixture(scope="module")
def half_catalog(demo, tmp_path_factory):
    """The demo catalog cut in half: a rerun on it has other counts and many unknown_item dead letters."""
    path = tmp_path_factory.mktemp("half") / "catalog.parquet"
    table = pq.read_table(demo["catalog"])
    pq.write_table(table.slice(0, table.num_rows // 2), path)
    return path


def _consistent(night) -> str | None:
    """The run id of a complete night whose files agree with its own report; None if not complete."""
    if not (night / "_SUCCESS").exists():
        return None
    report = metrics(night)
    assert (night / "_SUCCESS").read_text().strip() == report["run_id"]
    dead = sum(c["dead"] for c in report["stages"].values())
    assert len(dataset(night, "dead_letter")) == dead
    return report["run_id"]


@pytest.mark.parametrize("step", STEPS)
def test_a_rerun_killed_at_any_commit_step_leaves_one_complete_night(demo, half_catalog, tmp_path, step):
    out = tmp_path / "out"
    assert _ingest(demo["catalog"], demo, out).returncode == 0
    old = _consistent(out / RUN_DATE)
    killed = _ingest(half_catalog, demo, out, MMFUSE_KILL_AT=step)
    assert killed.returncode == -9, killed.stderr[-2000:]
    seen = _consistent(out / RUN_DATE)  # the old night, the new one, or (mid-move) none: never a partial one
    expected = {"journal": "old", "unmark": "old", "clear": None, "move": None, "mark": None, "clean": "new"}[step]
    assert seen == old if expected == "old" else seen is None if expected is None else seen not in (old, None)
    rerun = _ingest(half_catalog, demo, out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _consistent(out / RUN_DATE) not in (old, None)
    assert metrics(out / RUN_DATE)["stages"]["catalog"]["in"] == pq.read_metadata(half_catalog).num_rows
    assert list((out / "_staging").iterdir()) == []


def test_a_second_run_of_a_held_date_stops_with_one_line(demo, tmp_path):
    out = tmp_path / "out"
    lock = out / "_staging" / RUN_DATE / "_LOCK"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"run_id": "abc", "host": socket.gethostname(), "pid": os.getpid(),
                                "since": "2026-11-27T01:00:00+00:00"}))
    proc = _ingest(demo["catalog"], demo, out)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mmfuse ingest: error: {RUN_DATE} is being written into {out} by another run (run abc, pid {os.getpid()} "
        f"on {socket.gethostname()}, since 2026-11-27T01:00:00+00:00); wait for it, or remove {lock} if that run "
        "is dead"]
    assert lock.exists() and not (out / RUN_DATE).exists()  # nothing of the holder's was touched


def test_two_runs_of_one_date_at_once_end_with_one_complete_night(demo, half_catalog, tmp_path):
    out = tmp_path / "out"
    command = [str(ROOT / ".venv" / "bin" / "mmfuse"), "ingest", f"--interactions={demo['interactions']}",
               f"--output={out}", f"--run_date={RUN_DATE}", "--runner=DirectRunner", "--max_dead_fraction=1"]
    procs = [subprocess.Popen([*command, f"--catalog={c}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in (demo["catalog"], half_catalog)]
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes) in ([0, 0], [0, 2]), [p.stderr.read()[-2000:] for p in procs]
    assert _consistent(out / RUN_DATE) is not None
    assert list((out / "_staging").iterdir()) == []



def test_a_run_that_lost_most_of_its_input_is_not_a_success(demo, tmp_path):
    """A catalog missing most of its items leaves most interactions without an item: exit 3, one line,
    nothing published, the dead letters kept for inspection."""
    small = tmp_path / "catalog.parquet"
    pq.write_table(pq.read_table(demo["catalog"]).slice(0, 12), small)
    out = tmp_path / "out"
    proc = _ingest(small, demo, out, "--max_dead_fraction=0.5")
    assert proc.returncode == 3, proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("mmfuse ingest: error: too many dead letters: stage interactions dead-lettered ")
    assert "unknown_item " in line and "above --max_dead_fraction=0.5; nothing was published" in line
    staged = line.rsplit("the dead letters are in ", 1)[1]
    assert not (out / RUN_DATE / "_SUCCESS").exists() and pq.read_table(staged).num_rows > 0
