"""Dated run folders: complete only with _SUCCESS, replaced whole on rerun, found by date, one run per date."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmfuse.transforms.contract import ContractError
from mmfuse.transforms.runs import RunFolder, is_complete, latest_complete


def _stage(run: RunFolder, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = Path(run.staging) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_commit_replaces_partial_folder_and_marks_last(tmp_path):
    partial = tmp_path / "2026-11-02"
    (partial / "items").mkdir(parents=True)
    (partial / "items" / "stale.parquet").write_text("left by a killed run")
    run = RunFolder(str(tmp_path), "2026-11-02")
    _stage(run, {"items/part-00000-of-00001.parquet": "new"})
    assert not is_complete(str(partial))
    run.commit({"stages": {}})
    assert sorted(p.relative_to(partial).as_posix() for p in partial.rglob("*") if p.is_file()) == [
        "_SUCCESS", "items/part-00000-of-00001.parquet", "metrics.json"]
    assert is_complete(str(partial)) and list((tmp_path / "_staging").iterdir()) == []


def test_latest_complete_skips_incomplete_and_later_runs(tmp_path):
    for date, done in [("2026-11-01", True), ("2026-11-02", False), ("2026-11-03", True), ("2026-11-05", True)]:
        (tmp_path / date).mkdir()
        if done:
            (tmp_path / date / "_SUCCESS").write_text("")
    (tmp_path / "_staging").mkdir()
    assert latest_complete(str(tmp_path), "2026-11-03") == str(tmp_path / "2026-11-01")
    assert latest_complete(str(tmp_path), "2026-11-04") == str(tmp_path / "2026-11-03")
    assert latest_complete(str(tmp_path), "2026-11-01") is None
    assert latest_complete(str(tmp_path / "nothing"), "2026-11-01") is None


def test_stale_staging_of_the_same_date_is_cleared(tmp_path):
    old, other_date = RunFolder(str(tmp_path), "2026-11-02"), RunFolder(str(tmp_path), "2026-11-03")
    _stage(old, {"a.parquet": "x"})
    _stage(other_date, {"a.parquet": "x"})
    new = RunFolder(str(tmp_path), "2026-11-02")
    new.acquire()
    new.recover()
    assert not Path(old.staging).exists() and Path(other_date.staging).exists()
    assert sorted(p.name for p in (tmp_path / "_staging" / "2026-11-02").iterdir()) == ["_LOCK"]


def test_a_journaled_commit_cut_short_is_finished_by_the_next_run(tmp_path):
    first = RunFolder(str(tmp_path), "2026-11-02")
    _stage(first, {"items/part-0.parquet": "old"})
    first.commit({})
    cut = RunFolder(str(tmp_path), "2026-11-02")
    _stage(cut, {"items/part-0.parquet": "new", "users/part-0.parquet": "new"})
    Path(cut.staging + ".ready").write_text(json.dumps(["items/part-0.parquet", "users/part-0.parquet"]))
    (tmp_path / "2026-11-02" / "_SUCCESS").unlink()  # killed after the journal, before the move
    nxt = RunFolder(str(tmp_path), "2026-11-02")
    nxt.acquire()
    nxt.recover()
    night = tmp_path / "2026-11-02"
    assert (night / "_SUCCESS").read_text().strip() == cut.run_id
    assert (night / "items" / "part-0.parquet").read_text() == "new" and (night / "users" / "part-0.parquet").exists()


def test_one_run_per_date(tmp_path):
    a, b = RunFolder(str(tmp_path), "2026-11-02"), RunFolder(str(tmp_path), "2026-11-02")
    a.acquire()
    with pytest.raises(ContractError, match=f"2026-11-02 is being written into {tmp_path} by another run "
                                            f"\\(run {a.run_id}, pid {os.getpid()}"):
        b.acquire()
    RunFolder(str(tmp_path), "2026-11-03").acquire()  # another date is free
    a.release()
    b.acquire()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "_staging" / "2026-11-02" / "_LOCK"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"run_id": "gone", "host": socket.gethostname(), "pid": int(dead.stdout)}))
    RunFolder(str(tmp_path), "2026-11-02").acquire()
    lock.write_text(json.dumps({"run_id": "elsewhere", "host": "another-host", "pid": 1}))
    with pytest.raises(ContractError, match="run elsewhere"):  # not provably dead: left alone
        RunFolder(str(tmp_path), "2026-11-02").acquire()


def test_commit_refuses_when_a_written_file_is_missing(tmp_path):
    run = RunFolder(str(tmp_path), "2026-11-02")
    _stage(run, {"items/part-0.parquet": "x"})
    with pytest.raises(RuntimeError, match="missing from staging"):
        run.commit({}, [str(Path(run.staging) / "items" / "part-0.parquet"),
                        str(Path(run.staging) / "users" / "part-0.parquet")])
    assert not (tmp_path / "2026-11-02" / "_SUCCESS").exists()
