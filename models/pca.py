"""Statistical alignment: per modality, an elementwise z-score and a PCA projection to the shared dimension,
then unit length; modalities are then fused with fixed weights (mean or user-given).

The math is a tf.Transform ``preprocessing_fn``, so the statistics are computed by a full pass over the
catalog in Beam (transforms/pca.py) and saved as a ``transform_fn`` that applies to new items unchanged.
PCA bases of different modalities are unrelated, so this is the baseline the learned alignment must beat.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from mmfuse.models.fusion import CONFIG_FILE, fixed_logits, fuse

if TYPE_CHECKING:
    import tensorflow as tf

KIND = "pca"
FEATURE, OUTPUT = "x", "aligned"


def preprocessing_fn(dim: int) -> Callable[[Mapping[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """tf.Transform function for one modality's (n, d) vectors -> (n, dim) unit vectors. A modality of fewer
    than ``dim`` dimensions has fewer components: its vectors are padded with zeros, as every modality's must
    have the shared length to be fused."""
    import tensorflow as tf
    import tensorflow_transform as tft

    def fn(inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        z = tft.scale_to_z_score(inputs[FEATURE], elementwise=True)
        basis = tft.pca(z, output_dim=dim, dtype=tf.float32)
        aligned = tf.math.l2_normalize(tf.matmul(z, basis), axis=-1)
        return {OUTPUT: tf.pad(aligned, [[0, 0], [0, max(0, dim - int(z.shape[-1]))]])}
    return fn


def feature_spec(input_dim: int) -> dict:
    import tensorflow as tf
    return {FEATURE: tf.io.FixedLenFeature([input_dim], tf.float32)}


class PcaAligner:
    """A fitted PCA alignment: one transform_fn folder per modality plus the fusion weights."""

    def __init__(self, folder: str | Path):
        import tensorflow_transform as tft
        folder = Path(folder)
        meta = json.loads((folder / CONFIG_FILE).read_text())
        self.config, self.input_dims = meta["config"], meta["dims"]
        self.modalities = list(self.input_dims)
        # Loaded now, so that the folder may go once the aligner exists.
        self._layers = {m: tft.TFTransformOutput(str(folder / m)).transform_features_layer()
                        for m in self.modalities}
        self._logits = fixed_logits(self.modalities, self.config["fusion"], self.config["fusion_weights"])

    @staticmethod
    def write_config(folder: str | Path, dims: Mapping[str, int], config: dict) -> None:
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(
            {"kind": KIND, "config": config, "dims": dict(dims), "modalities": list(dims)}, indent=1))

    def apply(self, item_ids: Sequence[str], features: Mapping[str, np.ndarray]) -> dict:
        """Same outputs as :meth:`models.align.Aligner.apply`."""
        import tensorflow as tf
        aligned, mask = [], []
        for m in self.modalities:
            x = np.asarray(features[m], np.float32)
            ok = ~np.isnan(x).any(1)
            out = self._layers[m]({FEATURE: tf.constant(np.nan_to_num(x))})[OUTPUT]
            aligned.append(np.asarray(out) * ok[:, None])
            mask.append(ok)
        aligned, mask = np.stack(aligned, 1), np.stack(mask, 1).astype(np.float32)
        fused, weights, parts = fuse(aligned, mask, np.broadcast_to(self._logits, mask.shape))
        return {"aligned": aligned, "mask": mask, "fused": np.asarray(fused), "weights": np.asarray(weights),
                "parts": np.asarray(parts)}
