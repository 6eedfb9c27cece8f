"""The in-memory catalogue the alignment fits and the evaluation share: content vectors per modality, with
NaN rows where an item lacks one. Plain numpy, so that what only reads and scores vectors need not load Keras."""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

CF = "cf"  # name of the collaborative modality


@dataclasses.dataclass
class Catalog:
    """Content vectors of ``item_ids`` per modality, NaN rows where an item lacks the modality."""

    item_ids: np.ndarray
    features: dict[str, np.ndarray]

    def present(self) -> np.ndarray:
        return np.stack([~np.isnan(self.features[m]).any(1) for m in self.features], 1)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping], dims: Mapping[str, int]) -> Catalog:
        """Records ``{"item_id", modality: vector or None}`` (any order) in item_id order, NaN rows where a
        modality is absent; a ``cf`` field (a folded-in cf vector) becomes a feature where any row has one."""
        rows = sorted(rows, key=lambda r: r["item_id"])
        if any(r.get(CF) is not None for r in rows):
            dims = {**dims, CF: next(len(r[CF]) for r in rows if r.get(CF) is not None)}
        features = {m: np.array([r[m] if r.get(m) is not None else [np.nan] * d for r in rows], np.float32)
                    for m, d in dims.items()}
        return cls(np.array([r["item_id"] for r in rows], dtype=str), features)
