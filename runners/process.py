"""What every mmfuse process sets up before it works, called explicitly (by the stages' command lines, the
model handlers on workers, the test suite) rather than done as a side effect of an import."""
from __future__ import annotations

import atexit
import gc
import os

_prepared = False


def prepare() -> None:
    """Quiet TensorFlow's C++ start-up lines (CUDA probes on CPU hosts would bury the job's own output; child
    processes, local workers among them, inherit the setting), and skip the collector at exit.

    A process's exit ends with the collector's full passes over every object its libraries made (Beam,
    numba, TensorFlow: hundreds of thousands), which holds up the end of a local runner's job by most of a
    second per worker, one worker after another. Objects alive at exit need no collecting: freezing them
    skips those passes (Python never promised to finalise objects alive at exit)."""
    global _prepared
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not _prepared:
        atexit.register(gc.freeze)
        _prepared = True
