"""The command line shared by ``python -m mmfuse.runners.dataflow`` and ``python -m mmfuse.runners.portable``."""
from __future__ import annotations

import argparse
import dataclasses
import shlex


def print_args(job_class: type, argv: list[str] | None, prog: str) -> int:
    """Parse one flag per field of the ``job_class`` dataclass (required where it has no default) and print
    the job's pipeline options as shell words, to splice into an ``mmfuse nightly`` command line."""
    parser = argparse.ArgumentParser(prog=prog, description=print_args.__doc__)
    for field in dataclasses.fields(job_class):
        if field.default is dataclasses.MISSING:
            parser.add_argument(f"--{field.name}", required=True)
        else:
            parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    try:
        job = job_class(**vars(parser.parse_args(argv)))
    except ValueError as e:
        parser.error(str(e))
    print(" ".join(shlex.quote(a) for a in job.args()))
    return 0
