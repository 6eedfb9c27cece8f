"""Night after night: the next night re-encodes only what changed, a rerun gives the same output, a night
killed part-way is never taken as the previous one, and old runs are pruned."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfuse.pipelines import nightly
from mmfuse.transforms.contract import ContractError
from mmfuse.transforms.runs import RunFolder, is_complete, latest_complete, prune
from tests.conftest import DEMO_FLAGS, ROOT, dataset, metrics
from tests.test_runners import assert_same_runs

NIGHTS = ["2026-11-26", "2026-11-27", "2026-11-28", "2026-11-29"]
# Text and a declared vector keep four nights short; media reuse is covered by tests/test_encode.py.
MODALITIES = "--modalities=text,features"


def _args(catalog: Path, interactions: Path, output: Path, night: str) -> list[str]:
    return [f"--catalog={catalog}", f"--interactions={interactions}", f"--output={output}", *DEMO_FLAGS,
            MODALITIES, f"--run_date={night}"]


def _night(catalog, interactions, output, night) -> Path:
    assert nightly.main(_args(catalog, interactions, output, night)) == 0
    return output / night


@pytest.fixture(scope="module")
def nights(demo, tmp_path_factory):
    """Night 1 on the demo catalog; night 2 after 3 titles changed, 2 items were deleted and 1 added."""
    tmp = tmp_path_factory.mktemp("nights")
    rows = pq.read_table(demo["catalog"]).to_pylist()
    changed, deleted = [r["item_id"] for r in rows[:3]], [r["item_id"] for r in rows[3:5]]
    edited = [r for r in rows if r["item_id"] not in deleted]
    for r in edited:
        if r["item_id"] in changed:
            r["title"] += " (director's cut)"
    edited.append({**rows[10], "item_id": "brand-new", "title": "A brand new item"})
    catalog = tmp / "catalog2" / "catalog.parquet"
    catalog.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(edited, schema=pq.read_schema(demo["catalog"])), catalog)
    (tmp / "media").symlink_to(demo["root"] / "media")  # relative media URIs resolve as before

    out = tmp / "out"
    first = _night(demo["catalog"], demo["interactions"], out, NIGHTS[0])
    second = _night(catalog, demo["interactions"], out, NIGHTS[1])
    return {"out": out, "first": first, "second": second, "catalog": catalog, "interactions": demo["interactions"],
            "changed": set(changed), "deleted": set(deleted), "added": {"brand-new"}}


@pytest.mark.slow
def test_second_night_reencodes_only_what_changed(nights):
    first, second = nights["first"], nights["second"]
    report = metrics(second)
    assert report["previous"] == str(first)
    assert report["summary"]["samples"]["thumbnails"] == {}  # images are not encoded: their files are not read
    assert report["modalities"]["text"] == {"encoded": len(nights["changed"] | nights["added"]),
                                           "reused": 120 - len(nights["deleted"] | nights["changed"]), "dead": 0}
    before = {r["item_id"]: r for r in dataset(first, "embeddings").to_pylist()}
    after = {r["item_id"]: r for r in dataset(second, "embeddings").to_pylist()}
    assert set(before) - set(after) == nights["deleted"] and set(after) - set(before) == nights["added"]
    assert {i for i in after if i in before and after[i] != before[i]} == nights["changed"]


@pytest.mark.slow
def test_rerunning_a_night_gives_the_same_output(nights, tmp_path):
    out, second = nights["out"], nights["second"]
    kept = tmp_path / second.name
    shutil.copytree(second, kept)
    rerun = _night(nights["catalog"], nights["interactions"], out, second.name)
    assert metrics(rerun)["run_id"] != metrics(kept)["run_id"]  # a new attempt, taking the same previous run
    assert_same_runs(kept, rerun, roots=(str(out), str(out)))
    assert dataset(kept, "embeddings").sort_by("item_id").equals(dataset(rerun, "embeddings").sort_by("item_id"))


@pytest.mark.slow
def test_night_killed_part_way_is_not_the_next_nights_previous(nights):
    out, killed, after = nights["out"], NIGHTS[2], NIGHTS[3]
    args = [sys.executable, "-m", "mmfuse.pipelines.nightly",
            *_args(nights["catalog"], nights["interactions"], out, killed)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while not any((out / "_staging" / killed).glob("*/*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the night ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # A kill inside the commit leaves a date folder without _SUCCESS; add one to be sure both are ignored.
    (out / killed / "embeddings").mkdir(parents=True, exist_ok=True)
    (out / killed / "embeddings" / "part-00000-of-00001.parquet").write_text("partial")
    assert not is_complete(str(out / killed))

    next_night = _night(nights["catalog"], nights["interactions"], out, after)
    assert metrics(next_night)["previous"] == str(nights["second"])
    assert metrics(next_night)["modalities"]["text"]["encoded"] == 0
    assert latest_complete(str(out), "2026-12-01") == str(next_night)


def _layout(root: Path, paths: list[str]) -> None:
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")


def _left(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_prune_keeps_the_window_the_run_and_the_last_complete_run(tmp_path):
    _layout(tmp_path, ["2026-10-01/_SUCCESS", "2026-10-20/items/part-0.parquet",  # complete / killed in commit
                       "2026-10-25/_SUCCESS", "2026-11-06/_SUCCESS", "2026-11-09/embeddings/part-0.parquet",
                       "2026-11-12/_SUCCESS",  # after the run date: a backfill never deletes newer nights
                       "_staging/2026-10-20/abc/items/part-0.parquet", "_staging/2026-11-09/def/x.parquet",
                       "notes/readme.txt"])
    removed = prune(str(tmp_path), "2026-11-09", keep_days=7)
    assert removed == [str(tmp_path / d) for d in ("2026-10-01", "2026-10-20", "2026-10-25")] + [
        str(tmp_path / "_staging" / "2026-10-20")]
    assert _left(tmp_path) == ["2026-11-06/_SUCCESS", "2026-11-09/embeddings/part-0.parquet",
                               "2026-11-12/_SUCCESS", "_staging/2026-11-09/def/x.parquet", "notes/readme.txt"]
    # After a long gap the newest complete run stays, so the next night still has one to reuse.
    assert prune(str(tmp_path), "2027-03-01", keep_days=0) == [
        str(tmp_path / d) for d in ("2026-11-06", "2026-11-09")] + [str(tmp_path / "_staging" / "2026-11-09")]
    assert _left(tmp_path) == ["2026-11-12/_SUCCESS", "notes/readme.txt"]
    with pytest.raises(ContractError, match="keep_days"):
        prune(str(tmp_path), "2027-03-01", keep_days=-1)
    with pytest.raises(ContractError, match="keep_days"):  # as the job is built, not after it ran
        RunFolder(str(tmp_path), "2027-03-01").keep_days = -1


def test_commit_prunes_after_marking_the_run_complete(tmp_path):
    _layout(tmp_path, ["2026-11-01/_SUCCESS", "2026-11-07/_SUCCESS"])
    run = RunFolder(str(tmp_path), "2026-11-09", keep_days=2)
    _layout(Path(run.staging), ["items/part-00000-of-00001.parquet"])
    run.commit({"stages": {}})
    assert _left(tmp_path) == ["2026-11-07/_SUCCESS", "2026-11-09/_SUCCESS",
                               "2026-11-09/items/part-00000-of-00001.parquet", "2026-11-09/metrics.json"]
