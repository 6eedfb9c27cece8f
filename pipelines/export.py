"""``mmfuse export --run=ROOT/<date> --out=DIR``: a complete night as one TensorFlow SavedModel.

The SavedModel (``models.serving.Night``) answers ``recommend`` (user id, k) and ``similar`` (item id, k)
with the night's own rankings, computed exactly in its graph from the night's ``items``, ``users`` and
``popular`` datasets, and (for a contrastive alignment) ``embed_item``: a new item's raw content through the
night's encoders, alignment and fusion, to its vector and most similar items; TF Serving, Vertex AI and
KServe load it as it is, and ``mmfuse serve`` answers the TF Serving REST API from it. It also answers
``recommend_history``: a posted history weighed as the night weighed its users (``metrics.json``'s
``weighting``). ``--dtype`` keeps the item and user matrices as bfloat16 (half the size) or int8 (a
quarter), at the cost of rankings that can differ from the night's where scores are close. Memory: the
whole item matrix with its modality parts and every user's vector and seen items, plus the text and image
encoders (about 100 MB), in this process and in the server.

    mmfuse export --run=out/2026-06-01 --out=models/mmfuse/1
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from mmfuse.pipelines.cli import incomplete
from mmfuse.transforms.artifacts import fetched, publish
from mmfuse.transforms.contract import ContractError
from mmfuse.transforms.parquet import read_dataset
from mmfuse.transforms.runs import METRICS
from mmfuse.transforms.users import Weighting

if TYPE_CHECKING:  # TensorFlow loads once the command line is parsed
    from mmfuse.models.serving import Arrays, Content


def arrays(run_dir: str) -> Arrays:
    """The night's datasets as ``models.serving.Arrays``."""
    from mmfuse.models.serving import Arrays
    items = read_dataset(run_dir, "items", ["item_id", "vector", "parts"]).sort_by("item_id")
    ids = np.array(items["item_id"].to_pylist(), dtype=object)
    if not len(ids):
        raise ContractError(f"{run_dir}/items holds no item")
    vectors = np.array(items["vector"].to_pylist(), np.float32)
    parts = items["parts"].to_pylist()
    modalities = tuple(sorted({m for p in parts for m, _ in p}))
    stacked = np.zeros((len(modalities), *vectors.shape), np.float32)
    has = np.zeros((len(ids), len(modalities)), bool)
    for row, p in enumerate(parts):
        for name, part in p:
            stacked[modalities.index(name), row], has[row, modalities.index(name)] = part, True
    row_of = {item: row for row, item in enumerate(ids)}

    users = read_dataset(run_dir, "users", ["user_id", "vector", "seen"])
    user_vectors = np.zeros((users.num_rows, vectors.shape[1]), np.float32)
    personal = np.zeros(users.num_rows, bool)
    for r, v in enumerate(users["vector"].to_pylist()):
        if v is not None:
            user_vectors[r], personal[r] = v, True
    seen = [[row_of[i] for i in s if i in row_of] for s in users["seen"].to_pylist()]
    popular = read_dataset(run_dir, "popular", ["rank", "item_id", "share"]).sort_by("rank")
    return Arrays(ids, vectors, modalities, stacked, has, np.array(users["user_id"].to_pylist(), dtype=object),
                  user_vectors, personal, np.concatenate([[0], np.cumsum([len(s) for s in seen])]).astype(np.int64),
                  np.array([r for s in seen for r in s], np.int64),
                  np.array([row_of[i] for i in popular["item_id"].to_pylist()], np.int64),
                  np.array(popular["share"].to_pylist(), np.float32))


def weighting(run_dir: str) -> Weighting:
    """How the night weighed interactions in its user vectors, from its ``metrics.json``."""
    with FileSystems.open(f"{run_dir.rstrip('/')}/{METRICS}") as f:
        recorded = json.loads(f.read()).get("weighting")
    if recorded is None:
        raise ContractError(f"{run_dir}/{METRICS} does not say how the night weighed interactions: "
                            "rerun the night with this version")
    return Weighting(**recorded)


def content(run_dir: str, max_tokens: int) -> Content | None:
    """What ``embed_item`` needs from the night: its contrastive alignment and the built-in encoders of its
    text and image modalities (None for a PCA alignment, which has no model to run new items through)."""
    from mmfuse.models import align
    from mmfuse.models.serving import Content
    with fetched(f"{run_dir}/alignment") as local:
        fitted = align.load(local)
    if not isinstance(fitted, align.Aligner):
        return None
    dims, text, vocab, image = fitted.model.dims, None, None, None
    if "text" in dims:
        from mmfuse.models.text import MiniLMTextEncoder
        encoder = MiniLMTextEncoder(max_tokens)
        text, vocab = encoder.model, encoder.vocabulary()
    if "image" in dims:
        from mmfuse.models.image import MobileNetV2ImageEncoder
        image = MobileNetV2ImageEncoder().embedder
    return Content(fitted.model, text, vocab, max_tokens, image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmfuse export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", required=True, help="A complete night (ROOT/<date>)")
    parser.add_argument("--out", required=True,
                        help="The SavedModel's folder, local or gs:// (for TF Serving: MODEL/<version>)")
    parser.add_argument("--text_max_tokens", type=int, default=256,
                        help="embed_item cuts texts to this many tokens: the night's own --text_max_tokens")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                        help="How the item and user matrices are kept: bfloat16 halves them, int8 (one scale per "
                             "vector) quarters them; scores are computed in float32 either way")
    parser.add_argument("--verbose", action="store_true", help="Show the libraries' log lines")
    args = parser.parse_args(argv)
    if incomplete("export", args.run):
        return 2
    try:
        night, weights, new_items = arrays(args.run), weighting(args.run), content(args.run, args.text_max_tokens)
    except (ContractError, KeyError, OSError, pa.ArrowException) as e:
        print(f"mmfuse export: error: {e}", file=sys.stderr)
        return 2
    from mmfuse.models.serving import Night
    model = Night(night, new_items, weights, args.dtype)
    if "://" in args.out:  # TensorFlow writes local folders; the copy goes wherever Beam's FileSystems reach
        with tempfile.TemporaryDirectory(prefix="mmfuse-export-") as local:
            model.save(local)
            publish(local, args.out)
    else:
        model.save(args.out)
    print(f"mmfuse export: wrote {args.out} ({len(night.item_ids)} items, {len(night.user_ids)} users, {args.dtype}; "
          f"signatures recommend, recommend_history, similar{', embed_item' if new_items else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
