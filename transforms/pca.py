"""Fit the statistical alignment (models/pca.py) over the whole catalog with tf.Transform.

tf.Transform writes with ``tf.io.gfile``: local paths and, where TensorFlow has credentials, gs://."""
from __future__ import annotations

import posixpath

import apache_beam as beam
import numpy as np

from mmfuse.models import pca


class FitPca(beam.PTransform):
    """Embeddings rows -> one ``transform_fn`` per modality under ``folder/<modality>``, fitted on the items
    that have that modality (tft.pca needs dense input). Yields each written folder, once written."""

    def __init__(self, modalities: dict[str, int], dim: int, folder: str, temp_dir: str):
        super().__init__()
        self._modalities, self._dim, self._folder, self._temp_dir = modalities, dim, folder, temp_dir

    def expand(self, rows):
        import tensorflow_transform.beam as tft_beam
        from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

        written = []
        with tft_beam.Context(temp_dir=self._temp_dir, force_tf_compat_v1=False):
            for m, d in self._modalities.items():
                metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(pca.feature_spec(d)))
                data = (rows
                        | f"Has {m}" >> beam.Filter(lambda r, m=m: r.get(m) is not None)
                        | f"Input {m}" >> beam.Map(lambda r, m=m: {pca.FEATURE: np.asarray(r[m], np.float32)}))
                transform_fn = ((data, metadata)
                                | f"Analyze {m}" >> tft_beam.AnalyzeDataset(pca.preprocessing_fn(self._dim)))
                out = posixpath.join(self._folder, m)
                done = transform_fn | f"Write {m}" >> tft_beam.WriteTransformFn(out)
                written.append(done | f"Done {m}" >> beam.Map(lambda _, out=out: out))
        return written | "Folders" >> beam.Flatten()
