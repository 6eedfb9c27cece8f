"""Every path on gs://: the nightly job against a local GCS emulator reads inputs and media, writes dated
runs, finds the previous one, replaces a rerun's folder and prunes old runs there as it does on disk.

Beam's GCS client looks for Google credentials once per process and, finding none here, connects
anonymously to ``STORAGE_EMULATOR_HOST`` (about 30 s of retries, once).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmfuse.pipelines import nightly
from mmfuse.transforms.runs import SUCCESS, latest_complete, prune
from tests.conftest import RUN_DATE, metrics, nightly_args
from tests.test_runners import _free_port, _wait_listening, assert_same_runs

pytestmark = pytest.mark.slow
BUCKET = "mmfuse-test"
NEXT_DATE = "2026-11-28"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A gcsfs client on a fresh in-memory GCS emulator that Beam's GCS file system also talks to."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                             f"--port={port}", "--in-memory"], stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                                            "NO_GCE_CHECK")}
    os.environ.update({"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
                       # gcsfs would first ask a gRPC bucket-type API the emulator lacks (60 s per call).
                       "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                       "NO_GCE_CHECK": "true"})  # no metadata server to wait for
    try:
        _wait_listening(port, proc)
        import gcsfs
        fs = gcsfs.GCSFileSystem(project="test", token="anon", endpoint_url=f"http://127.0.0.1:{port}")
        fs.mkdir(BUCKET)
        yield fs
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def gcs_run(gcs, demo, demo_night):
    """One night with inputs, media and output on gs://, and the same night on local disk."""
    gcs.put(str(demo["root"]), f"{BUCKET}/in", recursive=True)  # catalog, interactions, media (relative URIs)
    remote = {"catalog": f"gs://{BUCKET}/in/catalog", "interactions": f"gs://{BUCKET}/in/interactions",
              "media": f"gs://{BUCKET}/in/media"}
    root = f"gs://{BUCKET}/out"
    assert nightly.main(nightly_args(remote, root)) == 0
    return remote, root, demo_night


def _download(gcs, run_dir: str, to: Path) -> Path:
    gcs.invalidate_cache()  # Beam wrote behind gcsfs's listing cache
    gcs.get(run_dir.removeprefix("gs://"), str(to), recursive=True)
    return to


def test_night_on_gcs_equals_night_on_disk(gcs, gcs_run, demo, tmp_path):
    remote, root, local = gcs_run
    run_dir = f"{root}/{RUN_DATE}"
    gcs.invalidate_cache()
    assert gcs.exists(f"{run_dir}/{SUCCESS}") and not gcs.find(f"{BUCKET}/out/_staging")
    # Arrow reads the published dataset straight from the bucket.
    embeddings = pq.read_table(f"{BUCKET}/out/{RUN_DATE}/embeddings", filesystem=gcs)
    assert embeddings.num_rows == 120 and embeddings.column("image").null_count < 120  # media read from gs://
    downloaded = _download(gcs, run_dir, tmp_path / "gcs" / RUN_DATE)
    assert_same_runs(local, downloaded, inputs=(str(demo["root"]), f"gs://{BUCKET}/in"))


def test_next_night_on_gcs_reuses_the_last_run_and_rerun_replaces_the_folder(gcs, gcs_run, tmp_path):
    remote, root, _ = gcs_run
    first = f"{root}/{RUN_DATE}"
    # What a run killed in its commit, and one killed while staging, would leave behind.
    gcs.pipe(f"{BUCKET}/out/{NEXT_DATE}/embeddings/part-99999-of-99999.parquet", b"partial")
    gcs.pipe(f"{BUCKET}/out/_staging/{NEXT_DATE}/deadbeef/embeddings/part-0.parquet", b"partial")
    assert latest_complete(root, NEXT_DATE) == first
    assert nightly.main(nightly_args(remote, root, f"--run_date={NEXT_DATE}")) == 0
    second = f"{root}/{NEXT_DATE}"
    report = metrics(_download(gcs, second, tmp_path / NEXT_DATE))
    assert report["previous"] == first
    for modality, counts in report["modalities"].items():
        if "reused" in counts:  # a model's modality; declared vectors are read, never reused
            assert counts["encoded"] == 0 and counts["reused"] > 0, modality
    gcs.invalidate_cache()
    assert not gcs.exists(f"{BUCKET}/out/{NEXT_DATE}/embeddings/part-99999-of-99999.parquet")
    assert not gcs.exists(f"{BUCKET}/out/_staging/{NEXT_DATE}/deadbeef/embeddings/part-0.parquet")
    assert latest_complete(root, "2026-11-29") == second


def test_prune_on_gcs_removes_old_runs_and_staging_only(gcs):
    root = f"gs://{BUCKET}/prune"
    for path in ("2026-11-01/_SUCCESS", "2026-11-01/items/part-0.parquet", "2026-11-02/items/part-0.parquet",
                 "2026-11-05/_SUCCESS", "2026-11-08/_SUCCESS", "2026-11-09/_SUCCESS",
                 "_staging/2026-11-02/abc/items/part-0.parquet", "_staging/2026-11-09/abc/x.parquet"):
        gcs.pipe(f"{BUCKET}/prune/{path}", b"x")
    removed = prune(root, "2026-11-09", keep_days=3)
    assert removed == [f"{root}/2026-11-01", f"{root}/2026-11-02", f"{root}/2026-11-05", f"{root}/_staging/2026-11-02"]
    gcs.invalidate_cache()
    left = sorted(p.removeprefix(f"{BUCKET}/prune/") for p in gcs.find(f"{BUCKET}/prune"))
    assert left == ["2026-11-08/_SUCCESS", "2026-11-09/_SUCCESS", "_staging/2026-11-09/abc/x.parquet"]
