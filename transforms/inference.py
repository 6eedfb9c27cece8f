"""RunInference handlers: one for the encoders (over the shared ``models.base.Encoder`` contract), one for
the fitted alignment.

Beam's RunInference loads the model once per worker process (through ``Shared``) and batches elements;
decoding happens before batching, in :class:`Preprocess`, so one bad file never fails a batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, RunInference

from mmfuse.models.base import Encoder, InputError
from mmfuse.runners import process
from mmfuse.transforms import media
from mmfuse.transforms.artifacts import fetched
from mmfuse.transforms.deadletter import DEAD, dead_letter

if TYPE_CHECKING:
    from mmfuse.models.align import Aligner
    from mmfuse.models.pca import PcaAligner


class EncoderHandler(ModelHandler[tuple[Any, Any], tuple[Any, np.ndarray], Encoder]):
    """Keyed preprocessed inputs ``(key, x)`` -> ``(key, vector)``."""

    def __init__(self, make: Callable[[], Encoder], batch_size: int):
        # Fixed batches, not Beam's adaptive sizing (which follows timings): a model's float results depend
        # on the batch it runs in, so batches that follow timings give a rerun different vectors.
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._make = make

    def load_model(self) -> Encoder:
        process.prepare()
        return self._make()

    def run_inference(self, batch: Sequence[tuple[Any, Any]], model: Encoder,
                      inference_args: dict[str, Any] | None = None) -> Iterable[tuple[Any, np.ndarray]]:
        vectors = model.encode_batch([x for _, x in batch])
        return [(key, vector) for (key, _), vector in zip(batch, vectors)]

    def get_num_bytes(self, batch: Sequence[tuple[Any, Any]]) -> int:
        # The default pickles the whole batch just to measure it.
        return sum(getattr(x, "nbytes", 0) for _, x in batch)

    def get_metrics_namespace(self) -> str:
        return "mmfuse"


class AlignHandler(ModelHandler[dict, dict, Any]):
    """Embeddings rows -> item rows (``vector``, ``weights``, ``parts``), with the alignment artifact whose
    folder arrives as RunInference's model metadata side input."""

    def __init__(self, batch_size: int = 512):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)  # fixed, as EncoderHandler
        self._folder = None

    def update_model_path(self, model_path: str | None = None) -> None:
        self._folder = model_path

    def load_model(self) -> Aligner | PcaAligner:
        from mmfuse.models import align  # Keras: loaded on the workers that apply it
        process.prepare()
        with fetched(self._folder) as local:
            return align.load(local)

    def run_inference(self, batch: Sequence[dict], model: Aligner | PcaAligner,
                      inference_args: dict[str, Any] | None = None) -> Iterable[dict]:
        from mmfuse.models.align import Catalog
        catalog = Catalog.from_rows(batch, model.input_dims)
        out = model.apply(catalog.item_ids, catalog.features)
        names = model.modalities
        for i, item_id in enumerate(catalog.item_ids):
            present = [j for j, m in enumerate(names) if out["mask"][i, j] > 0]
            yield {"item_id": str(item_id), "vector": out["fused"][i].tolist(),
                   "weights": {names[j]: float(out["weights"][i, j]) for j in present},
                   "parts": {names[j]: out["parts"][i, j].tolist() for j in present}}

    def get_metrics_namespace(self) -> str:
        return "mmfuse"


class Preprocess(beam.DoFn):
    """``((item_id, hash), (raw, source))`` -> ``((item_id, hash), model input)``; bad input is dead-lettered.

    The encoder made here is used only for ``preprocess``: encoders build their network lazily, on the
    first ``encode_batch``, so this costs a tokenizer or nothing.
    """

    def __init__(self, make: Callable[[], Encoder], stage: str):
        self._make, self._stage = make, stage
        self._encoder = None

    def setup(self) -> None:
        process.prepare()
        self._encoder = self._make()

    def process(self, element: tuple[tuple[str, str], tuple[Any, str]]
                ) -> Iterator[tuple[tuple[str, str], Any] | beam.pvalue.TaggedOutput]:
        key, (raw, source) = element
        item_id = key[0]
        try:
            yield key, self._preprocess(raw)
        except InputError as e:
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(self._stage, item_id, e.reason, str(e), source))


    def _preprocess(self, raw: Any) -> Any:
        if not isinstance(raw, media.MediaFile):
            return self._encoder.preprocess(raw)
        try:
            with raw.open() as f:  # the encoder reads the parts it needs
                return self._encoder.preprocess(f)
        except OSError as e:  # gone or unreadable since it was checked
            raise InputError("unreadable_media", f"{raw.name}: {e.strerror or type(e).__name__}") from e


class Encode(beam.PTransform):
    """``((item_id, hash), (raw, source))`` -> ``((item_id, hash), vector)``, plus dead letters.

    ``resource_hints`` (e.g. an accelerator) go on the inference step only, so a runner can put just
    that step on GPU workers. Inputs of encoders with a ``length_bucket`` are grouped by length first, so
    that batches hold inputs of similar length and little padding.
    """

    def __init__(self, make: Callable[[], Encoder], stage: str, batch_size: int, resource_hints: dict,
                 length_bucket: int = 0):
        super().__init__()
        self._make, self._stage, self._batch_size, self._hints = make, stage, batch_size, resource_hints
        self._length_bucket = length_bucket

    def expand(self, pcoll: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        inputs = pcoll | "Preprocess" >> beam.ParDo(Preprocess(self._make, self._stage)).with_outputs(DEAD, main="ok")
        ready = inputs.ok
        if self._length_bucket:
            width = self._length_bucket
            ready = (ready
                     | "ByLength" >> beam.Map(lambda kv: (len(kv[1]) // width, kv))
                     | "GroupByLength" >> beam.GroupByKey()
                     | "Ungroup" >> beam.FlatMap(lambda kv: kv[1]))
        inference = RunInference(EncoderHandler(self._make, self._batch_size))
        if self._hints:
            inference = inference.with_resource_hints(**self._hints)
        vectors = ready | "Infer" >> inference
        return vectors, inputs[DEAD]
