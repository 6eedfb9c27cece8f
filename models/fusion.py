"""Fusion arithmetic shared by the learned and the statistical alignment: both artifacts fuse aligned
modality vectors the same way, so a score splits into per-modality contributions whichever made them."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from keras import ops

CONFIG_FILE = "alignment.json"  # every alignment artifact's description, naming its kind


def fuse(aligned: Any, mask: Any, logits: Any) -> tuple[Any, Any, Any]:
    """Fuse (n, m, d) unit vectors over the present modalities (mask (n, m) of 0/1) with softmax(logits).

    Returns (fused (n, d) unit vectors, weights (n, m) summing to 1 over present modalities, parts (n, m, d)
    with sum over m == fused): part_m = w_m * aligned_m / |sum_k w_k * aligned_k|, so a score against the
    fused vector splits exactly into per-modality contributions. Items with no modality get zeros.
    """
    logits = ops.where(mask > 0, logits, -1e9)
    weights = ops.exp(logits - ops.max(logits, axis=-1, keepdims=True)) * mask  # softmax over present ones
    weights = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-12)
    raw = ops.sum(weights[..., None] * aligned, axis=1)
    norm = ops.sqrt(ops.maximum(ops.sum(raw * raw, axis=-1, keepdims=True), 1e-24))
    return raw / norm, weights, weights[..., None] * aligned / norm[:, None, :]


def fixed_logits(modalities: Sequence[str], fusion: str, fusion_weights: Mapping[str, float]) -> np.ndarray:
    """Logits of the mean (all zero) or weighted fusion (log of each weight; 0 weight -> never used)."""
    if fusion == "mean":
        return np.zeros(len(modalities), np.float32)
    missing = set(modalities) - set(fusion_weights)
    if missing:
        raise ValueError(f"--fusion_weights has no weight for {sorted(missing)}")
    return np.log(np.maximum([float(fusion_weights[m]) for m in modalities], 1e-30)).astype(np.float32)
