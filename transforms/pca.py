"""Fit the statistical alignment (models/pca.py) over the whole catalog with tf.Transform, in the nightly
pipeline (``FitPca``) or on an in-memory catalog for evaluation (``fit_in_memory``).

tf.Transform writes with ``tf.io.gfile``: local paths and, where TensorFlow has credentials, gs://."""
from __future__ import annotations

import dataclasses
import posixpath
import tempfile
from typing import TYPE_CHECKING

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from mmfuse import runners
from mmfuse.models import pca
from mmfuse.transforms.artifacts import publish

if TYPE_CHECKING:
    from mmfuse.models.catalog import Catalog


class FitPca(beam.PTransform):
    """Embeddings rows -> one ``transform_fn`` per modality under ``folder/<modality>``, fitted on the items
    that have that modality (tft.pca needs dense input). Yields each written folder, once written."""

    def __init__(self, modalities: dict[str, int], dim: int, folder: str, temp_dir: str):
        super().__init__()
        self._modalities, self._dim, self._folder, self._temp_dir = modalities, dim, folder, temp_dir

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
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


def write_config(folder: str, dims: dict[str, int], config: dict) -> str:
    """The artifact's ``alignment.json`` (its kind, dims and config) beside the fitted transforms."""
    with tempfile.TemporaryDirectory(prefix="mmfuse-alignment-") as local:
        pca.PcaAligner.write_config(local, dims, config)
        return publish(local, folder)


def fit_in_memory(catalog: Catalog, dim: int) -> pca.PcaAligner:
    """The statistical alignment of an in-memory ``models.catalog.Catalog``, fitted by a pipeline on the local
    runner (for evaluation and tests), loaded."""
    from mmfuse.models import align
    dims = {m: v.shape[1] for m, v in catalog.features.items()}
    rows = [{"item_id": str(item), **{m: None if np.isnan(v[i]).any() else v[i] for m, v in catalog.features.items()}}
            for i, item in enumerate(catalog.item_ids)]
    with tempfile.TemporaryDirectory(prefix="mmfuse-pca-") as folder:
        with runners.create_pipeline(PipelineOptions(["--runner=DirectRunner"])) as pipeline:
            _ = pipeline | beam.Create(rows, reshuffle=False) | FitPca(dims, dim, folder, f"{folder}/tft")
        write_config(folder, dims, dataclasses.asdict(align.AlignConfig(dim=dim, fusion="mean")))
        return align.load(folder)
