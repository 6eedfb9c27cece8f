"""Flink (or any portable runner): the options that submit the nightly job through Beam's job API.

A Flink job server (``flink-job-server`` container or jar, next to a Flink cluster) exposes the same job API
as Beam's local job service, which the tests submit to. ``FlinkRunner`` with ``--flink_master`` starts that
job server itself, from ``--flink_job_server_jar``, which is required here: without it Beam downloads the jar
from Maven Central at run time, which a production scheduler must not depend on. Python stages run in SDK
workers, chosen by the environment type:

- ``DOCKER``: each task manager starts the image of ``runners/container/Dockerfile`` (needs Docker there);
- ``PROCESS``: task managers with mmfuse installed run Beam's boot command themselves;
- ``EXTERNAL``: a worker pool already running beside each task manager
  (``python -m apache_beam.runners.worker.worker_pool_main --service_port=50000``, e.g. a sidecar);
- ``LOOPBACK``: workers inside the submitting process (local trials only).

    mmfuse nightly $(python -m mmfuse.runners.portable --job_endpoint=flink-jobserver:8099 \\
        --environment_type=EXTERNAL --environment_config=localhost:50000 --parallelism=8) --catalog=...
"""
from __future__ import annotations

import dataclasses
import json
import sys

from mmfuse.runners import cli

ENVIRONMENTS = ("DOCKER", "PROCESS", "EXTERNAL", "LOOPBACK")
BOOT = "/opt/apache/beam/boot"  # where Beam's SDK images (and ours) keep the worker boot command


@dataclasses.dataclass(frozen=True)
class PortableJob:
    job_endpoint: str = ""  # host:port of a job server; or
    flink_master: str = ""  # host:port of Flink's REST API, for FlinkRunner, with
    flink_job_server_jar: str = ""  # a local beam-runners-flink-*-job-server jar (Beam would download one)
    environment_type: str = "DOCKER"
    environment_config: str = ""  # DOCKER: the image; EXTERNAL: the worker pool's host:port; PROCESS: boot path
    parallelism: int = 0  # Flink's default when 0
    sdk_worker_parallelism: int = 1  # SDK workers per task manager

    def __post_init__(self):
        if bool(self.job_endpoint) == bool(self.flink_master):
            raise ValueError("give exactly one of job_endpoint (PortableRunner) and flink_master (FlinkRunner)")
        if bool(self.flink_master) != bool(self.flink_job_server_jar):
            raise ValueError("flink_master needs flink_job_server_jar (a local job-server jar; Beam would "
                             "otherwise download it at run time), and the jar is only for flink_master")
        if self.environment_type not in ENVIRONMENTS:
            raise ValueError(f"environment_type must be one of {ENVIRONMENTS}, got {self.environment_type!r}")
        if self.environment_type in ("DOCKER", "EXTERNAL") and not self.environment_config:
            raise ValueError(f"environment_type={self.environment_type} needs environment_config "
                             "(DOCKER: the worker image; EXTERNAL: the worker pool's host:port)")

    def _environment_config(self) -> str:
        if self.environment_type == "PROCESS":
            return json.dumps({"command": self.environment_config or BOOT})
        return self.environment_config

    def args(self) -> list[str]:
        if self.flink_master:
            args = ["--runner=FlinkRunner", f"--flink_master={self.flink_master}",
                    f"--flink_job_server_jar={self.flink_job_server_jar}"]
        else:
            args = ["--runner=PortableRunner", f"--job_endpoint={self.job_endpoint}"]
        args.append(f"--environment_type={self.environment_type}")
        if self.environment_type != "LOOPBACK":
            args.append(f"--environment_config={self._environment_config()}")
        if self.parallelism:
            args.append(f"--parallelism={self.parallelism}")
        args.append(f"--sdk_worker_parallelism={self.sdk_worker_parallelism}")
        return args


def main(argv: list[str] | None = None) -> int:
    return cli.print_args(PortableJob, argv, "python -m mmfuse.runners.portable")


if __name__ == "__main__":
    sys.exit(main())
