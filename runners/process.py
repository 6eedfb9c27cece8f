"""What every mmfuse process sets up before it works, called explicitly (by the stages' command lines, the
model handlers on workers, the test suite) rather than done as a side effect of an import."""
from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import os
import re
import sys
import threading

_prepared = False
_console = False
# Lines the libraries write straight to the process's stderr, below Python: absl's C++ log lines
# (TensorFlow's oneDNN and CUDA probes, which on a CPU host report a "failed call to cuInit"), warnings
# that workers print once per process or per model.
_NOISE = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\)"
                    rb"|[IWEF]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\]"
                    rb"|WARNING:root:Resource module is not available"
                    rb"|WARNING:tensorflow:.*tf\.function retracing)")
QUIET_LOGGERS = ("tensorflow", "absl", "apache_beam", "keras", "jax", "numba", "h5py")
M_TOP_PAD = -2  # glibc's mallopt parameter: the freed memory its heaps keep rather than hand back
TOP_PAD = 64 << 20


def prepare() -> None:
    """Quiet TensorFlow's Python-side start-up (child processes, local workers among them, inherit the
    setting), keep freed memory for reuse, and skip the collector at exit.

    TensorFlow frees and allocates megabyte tensors at every step. With glibc's default the heap hands
    each freed top back to the kernel and faults the next step's pages in afresh: a small alignment fit
    spent a quarter of its time in 1.7 million page faults (0.24 million when the heaps keep ``TOP_PAD``
    bytes). Each heap (one per thread that allocates, at most 8 per core) may so hold up to ``TOP_PAD``
    more than it uses. Elsewhere than glibc, nothing changes.

    A process's exit ends with the collector's full passes over every object its libraries made (Beam,
    numba, TensorFlow: hundreds of thousands), which holds up the end of a local runner's job by most of a
    second per worker, one worker after another. Objects alive at exit need no collecting: freezing them
    skips those passes (Python never promised to finalise objects alive at exit)."""
    global _prepared
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not _prepared:
        atexit.register(gc.freeze)
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is not None:
            mallopt(M_TOP_PAD, TOP_PAD)
        _prepared = True


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_console(verbose: bool = False) -> None:
    """For a command line: only mmfuse's own lines on the console. The libraries' Python loggers show
    errors only, and a thread filters the process's native stderr (which its child processes share)
    through ``_NOISE``. ``verbose`` (``--verbose``) leaves everything as the libraries write it."""
    global _console
    prepare()
    if verbose or _console:
        return
    _console = True
    for name in QUIET_LOGGERS:  # a filter as well as the level: absl sets its logger's level again later
        logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger(name).addFilter(_errors_only)
    logging.getLogger().setLevel(logging.ERROR)
    sys.stderr.flush()
    real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        with os.fdopen(read, "rb") as source:
            for line in source:
                if not _NOISE.match(line):
                    os.write(real, line)

    thread = threading.Thread(target=pump, name="mmfuse-stderr", daemon=True)
    thread.start()

    def restore() -> None:  # the last lines through, then stderr as it was
        sys.stderr.flush()
        os.dup2(real, 2)
        thread.join(timeout=2.0)

    atexit.register(restore)
