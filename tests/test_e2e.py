"""End to end on the generated demo data: runners agree, and a killed run is never taken as complete."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfuse.pipelines import nightly
from tests.conftest import ROOT, RUN_DATE, comparable, dataset, metrics, nightly_args, sorted_rows
from tests.test_runners import assert_close

pytestmark = pytest.mark.slow


def _nightly(demo, output: Path, *extra: str) -> Path:
    assert nightly.main(nightly_args(demo, output, *extra)) == 0
    return output / RUN_DATE


def test_multi_process_run_equals_in_memory_run(demo, demo_night, tmp_path):
    in_memory = demo_night
    multi = _nightly(demo, tmp_path / "multi", "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    assert_close(comparable(metrics(in_memory)), comparable(metrics(multi)), "metrics.json")  # floats: ~1e-6 apart
    dead = [sorted_rows(dataset(run, "dead_letter"), "stage", "key", "source") for run in (in_memory, multi)]
    assert dead[0] == dead[1]
    a, b = (sorted_rows(dataset(run, "embeddings"), "item_id") for run in (in_memory, multi))
    assert len(a) == 120 and [r["item_id"] for r in a] == [r["item_id"] for r in b]
    for ra, rb in zip(a, b):
        for column, value in ra.items():
            if isinstance(value, list):  # batches differ between runners: equal to float tolerance
                np.testing.assert_allclose(value, rb[column], rtol=1e-5, atol=1e-6)
            else:
                assert value == rb[column], (ra["item_id"], column)
    # The alignment is fitted on sorted inputs in one step, so it does not depend on the runner either.
    a, b = (sorted_rows(dataset(run, "items"), "item_id") for run in (in_memory, multi))
    assert [r["item_id"] for r in a] == [r["item_id"] for r in b] == sorted(r["item_id"] for r in a)
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra["vector"], rb["vector"], atol=1e-4)
        assert dict(ra["weights"]).keys() == dict(rb["weights"]).keys()


def test_items_are_fused_from_present_modalities(demo_night):
    run = demo_night
    report = metrics(run)
    assert report["stages"]["align"] == {"in": 120, "out": 120, "dead": 0}
    assert report["alignment"]["kind"] == "contrastive" and report["alignment"]["reused_from"] is None
    embeddings = {r["item_id"]: r for r in dataset(run, "embeddings").to_pylist()}
    for item in dataset(run, "items").to_pylist():
        weights, parts = dict(item["weights"]), dict(item["parts"])
        has = {m for m in ("text", "image", "audio_mfcc", "features") if embeddings[item["item_id"]][m] is not None}
        assert has <= set(weights) <= has | {"cf"}, item["item_id"]
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
        vector = np.asarray(item["vector"])
        assert len(vector) == 64 and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(np.sum([parts[m] for m in weights], axis=0), vector, atol=1e-5)
    assert (run / "alignment" / "alignment.keras").exists() and (run / "alignment" / "alignment.json").exists()


def test_killed_run_leaves_no_success_and_rerun_replaces_it(demo, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mmfuse.pipelines.nightly", *nightly_args(demo, out)]
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

    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "mmfuse"), "nightly", *nightly_args(demo, out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # What `make demo` shows: mmfuse's own lines, no TensorFlow, absl or Beam warning.
    assert [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("mmfuse ")] == []
    run_dir = out / RUN_DATE
    assert (run_dir / "_SUCCESS").exists()
    assert not (run_dir / "embeddings" / "part-99999-of-99999.parquet").exists()
    assert len(dataset(run_dir, "embeddings")) == 120
    assert list((out / "_staging").iterdir()) == []


@pytest.mark.slow
def test_capped_fit_folds_in_every_other_item_with_interactions(demo, tmp_path, monkeypatch):
    """A fit capped far below the demo catalog: the sample respects the caps, the artifact holds no id list,
    every item with interactions still gets a cf vector (folded in where the fit did not see it), and the
    artifact's local copies are gone from the temp folder."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert nightly.main(nightly_args(demo, tmp_path, "--fit_events=300", "--fit_items=40",
                                           "--cf_anchors=10")) == 0
    assert not list(temp.glob("mmfuse-*"))
    run = tmp_path / RUN_DATE
    meta = json.loads((run / "alignment" / "alignment.json").read_text())
    assert meta["metrics"]["fit"]["events"] <= 300 and meta["metrics"]["fit"]["items"] <= 40
    assert "cf_items" not in meta
    table = pq.read_table(run / "alignment" / "cf.parquet")
    assert table.num_rows <= 40
    events = pq.read_table(demo["interactions"], columns=["user_id", "item_id"]).to_pylist()
    anchors = set(table.filter(table["anchor"])["item_id"].to_pylist())
    anchored_users = {e["user_id"] for e in events if e["item_id"] in anchors}
    # A cf vector: the table's, or folded in from users who took at least one anchor.
    expected = set(table["item_id"].to_pylist()) | {e["item_id"] for e in events if e["user_id"] in anchored_users}
    items = {r["item_id"]: r for r in dataset(run, "items").to_pylist()}
    with_cf = {i for i, r in items.items() if "cf" in dict(r["weights"])}
    assert with_cf == expected & set(items)
    assert len(with_cf - set(table["item_id"].to_pylist())) > 40  # most came from the fold-in
    assert 0 < len(anchors) <= 10 < table.num_rows  # the fit folded in items beyond its anchors too


@pytest.mark.slow
def test_statistical_alignment_night_leaves_no_scratch_files(demo, tmp_path, monkeypatch):
    """--align=pca (tf.Transform) with a vector column narrower than --dim: every item is fused, and the
    analysis's scratch files live beside the run's staging, gone with it."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert nightly.main(nightly_args(demo, tmp_path / "out", "--align=pca")) == 0
    run = tmp_path / "out" / RUN_DATE
    assert metrics(run)["stages"]["align"]["dead"] == 0 and len(dataset(run, "items")) == 120
    assert not list(temp.glob("mmfuse-*")) and list((tmp_path / "out" / "_staging").iterdir()) == []
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "alignment", "dead_letter", "embeddings", "items", "popular", "recommendations", "similar_items", "users"]


@pytest.mark.slow
def test_pseudonymized_user_ids_reach_no_output(demo, tmp_path, monkeypatch, capfd):
    """With --pseudonymize_user_ids every user id written (users, recommendations, dead letters) is the keyed
    HMAC of the raw one, the same every night, and no raw id reaches the outputs or the console."""
    from mmfuse.transforms.privacy import pseudonym
    key = b"a secret key of 32 bytes, really"
    monkeypatch.setenv("MMFUSE_PSEUDONYM_KEY", key.decode())
    events = pq.read_table(demo["interactions"]).to_pylist()
    raw = sorted({e["user_id"] for e in events})
    events.append({**events[0], "user_id": "alice@example.com", "item_id": "no-such-item"})
    pq.write_table(pa.Table.from_pylist(events, schema=pq.read_schema(demo["interactions"])),
                   tmp_path / "interactions.parquet")
    args = nightly_args({**demo, "interactions": tmp_path / "interactions.parquet"}, tmp_path / "out",
                        "--pseudonymize_user_ids", "--modalities=features")
    assert nightly.main(args) == 0
    run = tmp_path / "out" / RUN_DATE
    hidden = {pseudonym(key, u) for u in raw}
    assert set(dataset(run, "users")["user_id"].to_pylist()) == hidden
    assert set(dataset(run, "recommendations")["user_id"].to_pylist()) <= hidden
    [letter] = [d for d in dataset(run, "dead_letter").to_pylist() if d["error"] == "unknown_item"]
    assert letter["key"] == pseudonym(key, "alice@example.com")
    written = b"".join(p.read_bytes() for p in run.rglob("*") if p.is_file())
    console = capfd.readouterr()
    for user in [*raw[:20], "alice@example.com"]:
        assert user.encode() not in written and user not in console.out + console.err
