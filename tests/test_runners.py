"""Production runners: the portable job API (what a Flink job server exposes) gives the local runner's
output, and the Dataflow job is built offline with the encoders alone on GPU workers."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.internal import apiclient
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from mmfuse import runners
from mmfuse.pipelines import nightly
from mmfuse.pipelines.job import execute
from mmfuse.pipelines.options import help_text
from mmfuse.runners import dataflow, portable
from tests.conftest import ROOT, RUN_DATE, comparable, dataset, metrics, nightly_args

VENV_BIN = Path(sys.executable).parent
# musicnn is left out to keep the suite short; tests/test_audio_encoder.py covers it.
ACCELERATOR = beam_runner_api_pb2.StandardResourceHints.Enum.ACCELERATOR


def datasets(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir())


def assert_same_runs(a: Path, b: Path, roots: tuple[str, str] | None = None,
                     inputs: tuple[str, str] = ("", "")) -> None:
    """Two run folders hold the same datasets, rows and report. Floats (vectors, weights, scores) are equal to
    a tolerance (runners batch differently, so BLAS rounding differs); paths compare relative to each run's output
    root (``roots``, by default the folders above the runs) and input root (``inputs``, where the runs read
    different copies)."""
    assert (a / "_SUCCESS").exists() and (b / "_SUCCESS").exists()
    assert datasets(a) == datasets(b)
    roots = roots or (str(a.parent), str(b.parent))

    def relative(value, root: str, source: str):
        if isinstance(value, str):
            value = value.replace(root, "ROOT")
            return value.replace(source, "INPUT") if source else value
        return value

    def report(run_dir, root, source):
        text = json.dumps(comparable(metrics(run_dir)))
        return json.loads(relative(text, root, source))

    assert_close(report(a, roots[0], inputs[0]), report(b, roots[1], inputs[1]), "metrics.json")
    for name in datasets(a):
        rows = []
        for run_dir, root, source in zip((a, b), roots, inputs):
            table = dataset(run_dir, name)
            keys = [f.name for f in table.schema if _exact(f.type)]  # floats may differ: not for sorting
            table_rows = [{k: relative(v, root, source) for k, v in r.items()} for r in table.to_pylist()]
            rows.append(sorted(table_rows, key=lambda r: tuple(str(r[k]) for k in keys)))
        assert len(rows[0]) == len(rows[1]), name
        for ra, rb in zip(*rows):
            assert_close(ra, rb, f"{name}[{ra.get('item_id') or ra.get('user_id') or ra.get('key')}]")


def _exact(t) -> bool:
    return pa.types.is_string(t) or pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_temporal(t)


def assert_close(a, b, where: str) -> None:
    """Equal values, floats to the tolerance of a different batching (~1e-7 in embeddings, ~1e-6 once fitted
    stages such as the alignment have amplified it), at any depth (lists, structs)."""
    if isinstance(a, float) and isinstance(b, float):
        assert np.isclose(a, b, rtol=1e-4, atol=1e-5), (where, a, b)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, (where, a, b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("localhost", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {seconds} s")


@pytest.fixture(scope="module")
def job_service(tmp_path_factory):
    """Beam's local job service and an EXTERNAL worker pool: the job API and workers of a Flink cluster."""
    # The pool starts workers with the bare `python` on PATH: it must be this venv's.
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    logs = tmp_path_factory.mktemp("job_service")
    job_port, pool_port = _free_port(), _free_port()
    procs = []
    try:
        for name, port, cmd in (
                ("pool", pool_port, ["apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"]),
                ("jobs", job_port, ["apache_beam.runners.portability.local_job_service_main", f"--port={job_port}"])):
            log = open(logs / f"{name}.log", "wb")
            procs.append(subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            _wait_listening(port, procs[-1])
        yield f"localhost:{job_port}", f"localhost:{pool_port}", env
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
def test_portable_runner_with_external_workers_equals_local_runner(demo, demo_night, tmp_path, job_service):
    job_endpoint, pool, env = job_service
    args = portable.PortableJob(job_endpoint=job_endpoint, environment_type="EXTERNAL",
                                environment_config=pool).args()
    # The CLI, as a scheduler runs it, bounded: a worker that cannot start makes a portable job hang.
    proc = subprocess.run([sys.executable, "-m", "mmfuse.pipelines.nightly", *nightly_args(demo, tmp_path / "portable"),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    started, *stages, summary = proc.stdout.splitlines()  # the scheduler's log: mmfuse's lines only
    assert started.startswith("mmfuse nightly: run ") and " started for " in started
    assert stages and all(re.fullmatch(r"mmfuse nightly: \S+ \d+->\d+ \(\+\d+ dead\)( [\d.]+ s)?", s) for s in stages)
    assert summary.startswith(f"mmfuse nightly: wrote {tmp_path / 'portable' / RUN_DATE} ({len(stages)} stages, ")

    assert_same_runs(demo_night, tmp_path / "portable" / RUN_DATE)


def test_every_spelling_of_the_direct_runner_gets_the_local_engine():
    """Beam takes runner names in any case and without "Runner"; none of them may fall to Beam's DirectRunner,
    which first tries Prism (a download)."""
    for flags in ([], ["--runner=DirectRunner"], ["--runner=direct"], ["--runner=directrunner"], ["--runner=FnApi"],
                  ["--runner=InMemoryRunner"]):
        assert isinstance(runners.create_pipeline(PipelineOptions(flags)).runner, FnApiRunner), flags
    portable_runner = runners.create_pipeline(PipelineOptions(["--runner=PortableRunner"])).runner
    assert type(portable_runner).__name__ == "PortableRunner"  # other names go to Beam as given


def test_portable_options_for_each_environment():
    docker = portable.PortableJob(job_endpoint="jobs:8099", environment_config="eu.gcr.io/p/mmfuse:1", parallelism=8)
    assert docker.args() == ["--runner=PortableRunner", "--job_endpoint=jobs:8099", "--environment_type=DOCKER",
                             "--environment_config=eu.gcr.io/p/mmfuse:1", "--parallelism=8",
                             "--sdk_worker_parallelism=1"]
    process = portable.PortableJob(flink_master="flink:8081", flink_job_server_jar="/opt/flink-js.jar",
                                   environment_type="PROCESS").args()
    assert process[:5] == ["--runner=FlinkRunner", "--flink_master=flink:8081",
                           "--flink_job_server_jar=/opt/flink-js.jar", "--environment_type=PROCESS",
                           '--environment_config={"command": "/opt/apache/beam/boot"}']
    for bad in ({"job_endpoint": "a:1", "environment_type": "EXTERNAL"},  # where is the worker pool?
                {"job_endpoint": "a:1", "flink_master": "b:2", "environment_config": "img"},
                {"flink_master": "b:2", "environment_config": "img"},  # Beam would download the job server
                {"job_endpoint": "a:1", "flink_job_server_jar": "/js.jar", "environment_config": "img"},
                {"job_endpoint": "a:1", "environment_type": "SUBPROCESS", "environment_config": "x"}):
        with pytest.raises(ValueError):
            portable.PortableJob(**bad)


@pytest.mark.slow
def test_dataflow_job_puts_gpus_on_the_model_steps_only(demo, tmp_path):
    job = dataflow.DataflowJob(project="mmfuse-test", region="europe-west4", bucket="gs://mmfuse-test/nightly",
                               image="europe-west4-docker.pkg.dev/mmfuse-test/mmfuse/worker:1",
                               machine_type="n2-highmem-4", num_workers=2, max_num_workers=7)
    # --previous=none: finding the last run would read gs://, which this offline build must not touch.
    result, _ = execute(nightly.build, nightly_args(demo, tmp_path / "out", "--dry_run=True", "--previous=none",
                                                    *job.args()))
    pipeline = result.job.proto_pipeline
    environments = pipeline.components.environments
    hint = common_urns.resource_hints.ACCELERATOR.urn
    on_gpu = sorted(t.unique_name for t in pipeline.components.transforms.values()
                    if not t.subtransforms and hint in environments[t.environment_id].resource_hints)
    accelerators = {environments[t.environment_id].resource_hints[hint] for t in pipeline.components.transforms.values()
                    if not t.subtransforms and hint in environments[t.environment_id].resource_hints}
    assert accelerators == {b"type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver"}
    modalities = ["audio_mfcc", "features", "image", "text"]
    models = [m for m in modalities if m != "features"]  # declared vectors need no model
    # The encoders' inference and the alignment fit (bounded by its caps), nothing else.
    assert {name.split("/")[0] for name in on_gpu} == {f"Encode {m}" for m in models} | {"FitContrastive"}
    assert all("/Encode/Infer/" in name or name.startswith("FitContrastive") for name in on_gpu), on_gpu
    cpu_only = [t.unique_name for t in pipeline.components.transforms.values()
                if not t.subtransforms and t.environment_id and t.unique_name not in on_gpu]
    assert any(n.startswith("Encode text/Encode/Batch") for n in cpu_only)  # decoding stays on CPU workers
    assert any(n.startswith("Write embeddings") for n in cpu_only)

    staged = set()
    used = {t.environment_id for t in pipeline.components.transforms.values() if t.environment_id}
    for environment in (environments[e] for e in used):
        assert environment.urn == common_urns.environments.DOCKER.urn
        assert beam_runner_api_pb2.DockerPayload.FromString(environment.payload).container_image == job.image
        for dep in environment.dependencies:
            path = beam_runner_api_pb2.ArtifactFilePayload.FromString(dep.type_payload).path
            name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload).staged_name
            staged.add((Path(path).name, name))
    assert ("mmfuse-0.1.0.tar.gz", "workflow.tar.gz") in staged  # --setup_file: this checkout, built

    # What create_job would send, built offline: worker pool, autoscaling, images, experiments.
    described = apiclient.Environment(packages=[], options=result.job.options, proto_pipeline=pipeline,
                                      environment_version=apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
                                      proto_pipeline_staged_url=f"{job.bucket}/staging/pipeline.pb").proto
    (pool,) = described.worker_pools
    assert (pool.machine_type, pool.num_workers, pool.autoscaling_settings.max_num_workers) == ("n2-highmem-4", 2, 7)
    assert {i.container_image for i in pool.sdk_harness_container_images} == {job.image}
    assert "use_runner_v2" in described.experiments
    assert not any(o.startswith("worker_accelerator") for o in described.service_options)  # GPUs on every worker
    options = result.job.options.get_all_options()
    assert options["setup_file"] == str(ROOT / "setup.py") and options["sdk_location"] == "container"
    assert options["temp_location"].startswith("gs://mmfuse-test/nightly/temp/")


def test_dataflow_options_command_line(capsys):
    assert dataflow.main(["--project=p", "--region=r", "--bucket=gs://b/m/", "--image=img:1", "--gpu="]) == 0
    words = capsys.readouterr().out.split()
    assert "--staging_location=gs://b/m/staging" in words and "--sdk_container_image=img:1" in words
    assert not any(w.startswith("--encode_accelerator") for w in words)  # --gpu= runs the encoders on CPUs
    with pytest.raises(ValueError, match="gs://"):
        dataflow.DataflowJob(project="p", region="r", bucket="/tmp/x", image="img")


def test_flex_template_parameters_are_nightly_options():
    metadata = json.loads((ROOT / "runners" / "flex_template" / "metadata.json").read_text())
    known = help_text("nightly")
    required = {p["name"] for p in metadata["parameters"] if not p.get("isOptional")}
    assert required == {"catalog", "interactions", "output"}
    for parameter in metadata["parameters"]:
        assert f"--{parameter['name']} " in known, parameter["name"]
