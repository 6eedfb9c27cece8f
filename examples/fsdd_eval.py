"""Nearest-neighbour accuracy of the audio embeddings on the Free Spoken Digit Dataset (FSDD).

No dataset here pairs audio with interactions, so the audio encoders are checked on a labelled task
instead (docs/evaluation.md, "Audio"): on FSDD's official split (recordings numbered 0..4 are test),
how often does a test file's nearest training file say the same digit, and the same speaker?

    python -m examples.fsdd_eval [--fsdd PATH/TO/fsdd] [--encoders audio_mfcc,audio_musicnn]
                                 [--doc docs/evaluation.md] [--limit N]

Without --limit it rewrites the section of docs/evaluation.md between the fsdd-results markers.
"""
from __future__ import annotations

import os

# Set before numpy loads OpenBLAS: librosa's many small matmuls run 3-6x slower when OpenBLAS threads
# fight over a few shared cores than on one thread.
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as runners.process.prepare: before TensorFlow loads

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from examples import datasets
from examples.sections import replace_section
from mmfuse.models.audio import MfccAudioEncoder, MusicnnAudioEncoder

ENCODERS = {"audio_mfcc": MfccAudioEncoder, "audio_musicnn": MusicnnAudioEncoder}
BATCH = 32


def split_files(recordings: Path, limit: int | None) -> tuple[list[Path], list[Path]]:
    """(train, test) by the official rule; --limit keeps N evenly spaced files per split, so every
    digit and speaker still appears."""
    files = sorted(recordings.glob("*.wav"))
    test = [f for f in files if int(f.stem.split("_")[2]) < 5]
    train = [f for f in files if int(f.stem.split("_")[2]) >= 5]
    if limit:
        train, test = ([s[i] for i in np.linspace(0, len(s) - 1, min(limit, len(s))).astype(int)]
                       for s in (train, test))
    return train, test


def labels(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Digit and speaker of each file, from its name ``<digit>_<speaker>_<n>.wav``."""
    parts = [f.stem.split("_") for f in files]
    return np.array([p[0] for p in parts]), np.array([p[1] for p in parts])


def embed(encoder, files: list[Path]) -> np.ndarray:
    """Embeddings in batches of BATCH, through the same preprocess/encode_batch path as the pipeline."""
    out = []
    for i in range(0, len(files), BATCH):
        out.append(encoder.encode_batch([encoder.preprocess(f.read_bytes()) for f in files[i:i + BATCH]]))
    return np.concatenate(out)


def nearest_train(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Index of each test row's cosine-nearest training row, after z-scoring with training statistics
    (so no single large-scale dimension dominates the cosine)."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0

    def norm(x):
        z = (x - mean) / std
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    return (norm(test) @ norm(train).T).argmax(axis=1)


def evaluate(name: str, train_files: list[Path], test_files: list[Path]) -> dict:
    """Accuracy and throughput of one encoder; the wall time covers decoding and encoding all files,
    not loading the model."""
    t0 = time.perf_counter()
    encoder = ENCODERS[name]()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train, test = embed(encoder, train_files), embed(encoder, test_files)
    wall_s = time.perf_counter() - t0
    nn = nearest_train(train, test)
    (train_digit, train_spk), (test_digit, test_spk) = labels(train_files), labels(test_files)
    n = len(train_files) + len(test_files)
    result = dict(encoder=name, dim=encoder.dim, digit=float((train_digit[nn] == test_digit).mean()),
                  speaker=float((train_spk[nn] == test_spk).mean()), n_digits=len(set(train_digit)),
                  n_speakers=len(set(train_spk)), load_s=load_s, wall_s=wall_s, rate=n / wall_s)
    print(f"{name}: {n} files in {wall_s:.1f} s ({result['rate']:.1f} items/s; model load {load_s:.1f} s)",
          file=sys.stderr)
    return result


def table(results: list[dict]) -> str:
    rows = ["| encoder | dim | digit acc | speaker acc | chance digit / speaker | items/s |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r['encoder']} | {r['dim']} | {r['digit']:.1%} | {r['speaker']:.1%} "
                    f"| {1 / r['n_digits']:.1%} / {1 / r['n_speakers']:.1%} | {r['rate']:.1f} |")
    return "\n".join(rows)


def write_results(doc: Path, results: list[dict], n_train: int, n_test: int) -> None:
    """Replace the text between the fsdd-results markers, keeping the markers."""
    command = shlex.join(["python", "-m", "examples.fsdd_eval", *sys.argv[1:]])
    body = (f"Official split ({n_test} test recordings numbered 0-4, {n_train} training): each embedding "
            "dimension is z-scored with training statistics and L2-normalised, and each test file takes "
            "the digit and speaker of its cosine-nearest training file.\n\n"
            f"{table(results)}\n\n"
            f"Produced by `{command}` on {datetime.date.today().isoformat()} "
            f"(items/s: decoding and encoding, {os.cpu_count()} shared CPU cores, model load excluded).")
    replace_section(doc, "fsdd-results", body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", help="FSDD folder holding recordings/ (default: $MMFUSE_DATA/fsdd)")
    parser.add_argument("--encoders", default=",".join(ENCODERS), help="comma-separated, of: " + ", ".join(ENCODERS))
    parser.add_argument("--doc", default="docs/evaluation.md", help="whose fsdd-results section is rewritten")
    parser.add_argument("--limit", type=int, help="quick check: N files per split; the doc is left alone")
    args = parser.parse_args(argv)

    recordings = Path(args.fsdd or datasets.root() / "fsdd") / "recordings"
    if not recordings.is_dir() or not any(recordings.glob("*.wav")):
        sys.exit(f"no FSDD recordings under {recordings}: pass --fsdd FOLDER (the dataset's checkout)")
    names = [n.strip() for n in args.encoders.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENCODERS]
    if unknown or not names:
        sys.exit(f"unknown encoder(s) {unknown}: choose from {', '.join(ENCODERS)}")

    train_files, test_files = split_files(recordings, args.limit)
    results = [evaluate(n, train_files, test_files) for n in names]
    print(table(results))
    if not args.limit:
        write_results(Path(args.doc), results, len(train_files), len(test_files))
        print(f"wrote {args.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
