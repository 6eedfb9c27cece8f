"""Beam transforms: each does one thing. Models live in ``models/``; this package only moves records."""
import atexit
import gc

# A process's exit ends with the collector's full passes over every object its libraries made (Beam,
# numba, TensorFlow: hundreds of thousands), which holds up the end of a local runner's job by most of a
# second per worker, one worker after another. Objects alive at exit need no collecting: freezing them
# skips those passes. Python never promised to finalise objects that are alive at exit.
atexit.register(gc.freeze)
