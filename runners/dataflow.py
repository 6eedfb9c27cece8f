"""Dataflow: the pipeline options of a production job, CPU workers everywhere except the encoders.

The model steps carry Beam's ``accelerator`` resource hint (``--encode_accelerator``), so Dataflow's right
fitting gives GPU workers (the hint names their machine type) to those steps only; every other stage runs
on ``machine_type``. The ``worker_accelerator`` service option would put GPUs on every worker and must
not be combined with the hint. Workers run the custom SDK container of ``runners/container/Dockerfile``
(TensorFlow with the CUDA it was built for, mmfuse's dependencies and weights); ``--setup_file`` ships
this checkout's code on top of it.

    mmfuse nightly $(python -m mmfuse.runners.dataflow --project=P --region=R --bucket=gs://B/mmfuse \\
        --image=REGION-docker.pkg.dev/P/mmfuse/worker:TAG) --catalog=gs://... --interactions=gs://... \\
        --output=gs://B/mmfuse/runs
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from mmfuse.runners import cli

SETUP_FILE = str(Path(__file__).resolve().parent.parent / "setup.py")


@dataclasses.dataclass(frozen=True)
class DataflowJob:
    project: str
    region: str
    bucket: str  # gs:// folder for temp and staging files
    image: str  # the SDK container built from runners/container/Dockerfile
    job_name: str = "mmfuse-nightly"
    machine_type: str = "n2-standard-4"  # CPU stages
    num_workers: int = 1
    max_num_workers: int = 20
    gpu: str = "nvidia-l4"  # "" runs the encoders on CPU workers
    gpu_count: int = 1
    gpu_machine_type: str = "g2-standard-8"  # must be able to host the GPU type
    setup_file: str = SETUP_FILE

    def __post_init__(self):
        if not self.bucket.startswith("gs://"):
            raise ValueError(f"bucket must be a gs:// path, got {self.bucket!r}")

    @property
    def accelerator(self) -> str:
        """The resource hint of the model steps (Dataflow's ``accelerator`` syntax)."""
        if not self.gpu:
            return ""
        return f"type:{self.gpu};count:{self.gpu_count};machine_type:{self.gpu_machine_type};install-nvidia-driver"

    def args(self) -> list[str]:
        bucket = self.bucket.rstrip("/")
        args = [
            "--runner=DataflowRunner",
            f"--project={self.project}",
            f"--region={self.region}",
            f"--job_name={self.job_name}",
            f"--temp_location={bucket}/temp",
            f"--staging_location={bucket}/staging",
            f"--sdk_container_image={self.image}",
            "--sdk_location=container",  # the image's Beam, not a staged copy
            f"--setup_file={self.setup_file}",
            f"--machine_type={self.machine_type}",
            f"--num_workers={self.num_workers}",
            f"--max_num_workers={self.max_num_workers}",
            "--autoscaling_algorithm=THROUGHPUT_BASED",
            "--experiments=use_runner_v2",
        ]
        if self.accelerator:
            args.append(f"--encode_accelerator={self.accelerator}")
        return args


def main(argv: list[str] | None = None) -> int:
    return cli.print_args(DataflowJob, argv, "python -m mmfuse.runners.dataflow")


if __name__ == "__main__":
    sys.exit(main())
