"""Pure model code: encoders and their weights. Nothing in this package imports Beam."""
import os

# TensorFlow's C++ start-up chatter (CUDA probes on CPU hosts) would bury the job's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
