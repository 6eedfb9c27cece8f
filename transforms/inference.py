"""RunInference handlers: one for the encoders (over the shared ``models.base.Encoder`` contract), one for
the fitted alignment.

Beam's RunInference loads the model once per worker process (through ``Shared``); the encoders' batches
are made before it, in :class:`Batch`, which also decodes, so one bad file never fails a batch.
"""
from __future__ import annotations

import itertools
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, RunInference

from mmfuse.models.base import Encoder, InputError
from mmfuse.models.catalog import Catalog
from mmfuse.runners import process
from mmfuse.transforms import media
from mmfuse.transforms.artifacts import fetched
from mmfuse.transforms.deadletter import DEAD, dead_letter

# Inputs per shard, in batches: enough for length buckets to fill batches, few enough to hold in memory.
GROUP_BATCHES = 16

if TYPE_CHECKING:
    from mmfuse.models.align import Aligner
    from mmfuse.models.pca import PcaAligner


class EncoderHandler(ModelHandler[tuple[Any, Any], tuple[Any, np.ndarray], Encoder]):
    """Keyed preprocessed inputs ``(key, x)`` -> ``(key, vector)``."""

    def __init__(self, make: Callable[[], Encoder]):
        # Run with ``with_no_batching``: :class:`Batch` makes the batches, from the inputs alone.
        super().__init__()
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
        # Fixed sizes, not Beam's adaptive ones (which follow timings): a model's floats depend on its batch.
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
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


class Batch(beam.DoFn):
    """One shard's ``((item_id, hash), (raw, source))`` -> batches of ``((item_id, hash), model input)``,
    plus dead letters for inputs the encoder cannot read.

    A model's floats depend on the batch an input runs in (packed tokens and padding change the shapes its
    kernels see), so batches are a function of the inputs alone: the shard's elements in item order, cut
    into ``batch_size`` pieces; inputs of encoders with a ``length_bucket`` are first ordered by length
    bucket, so a batch holds inputs of similar length and little padding. Holds one shard's raw inputs
    (and, for length-bucketed encoders, their preprocessed token ids), about ``GROUP_BATCHES`` batches;
    decoded media one batch at a time.

    The encoder made here is used only for ``preprocess``: encoders build their network lazily, on the
    first ``encode_batch``, so this costs a tokenizer or nothing.
    """

    def __init__(self, make: Callable[[], Encoder], stage: str, batch_size: int):
        self._make, self._stage, self._batch_size = make, stage, batch_size
        self._encoder = None

    def setup(self) -> None:
        process.prepare()
        self._encoder = self._make()

    def process(self, shard: tuple[int, Iterable[tuple[tuple[str, str], tuple[Any, str]]]]
                ) -> Iterator[list[tuple[tuple[str, str], Any]] | beam.pvalue.TaggedOutput]:
        width, size = self._encoder.length_bucket, self._batch_size
        if not width:  # cut before decoding: decoded media one batch at a time
            for chunk in cut(list(shard[1]), size, 0):
                yield from self._preprocessed(chunk)
            return
        ready = []
        for out in self._preprocessed(shard[1]):
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield out
            else:
                ready.extend(out)
        yield from cut(ready, size, width)

    def _preprocessed(self, elements: Iterable) -> Iterator[list | beam.pvalue.TaggedOutput]:
        batch = []
        for key, (raw, source) in elements:
            try:
                batch.append((key, self._preprocess(raw)))
            except InputError as e:
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(self._stage, key[0], e.reason, str(e), source))
        if batch:
            yield batch

    def _preprocess(self, raw: Any) -> Any:
        if not isinstance(raw, media.MediaFile):
            return self._encoder.preprocess(raw)
        try:
            with raw.open() as f:  # the encoder reads the parts it needs
                return self._encoder.preprocess(f)
        except OSError as e:  # gone or unreadable since it was checked
            raise InputError("unreadable_media", f"{raw.name}: {e.strerror or type(e).__name__}") from e


def shard_of(item_id: str, shards: int) -> int:
    """A stable shard (Python's ``hash`` of a str differs between processes)."""
    return zlib.crc32(item_id.encode()) % shards


def shard_count(inputs: int, batch_size: int) -> int:
    """Shards of about ``GROUP_BATCHES`` batches for ``inputs`` inputs."""
    return max(1, -(-inputs // (batch_size * GROUP_BATCHES)))


def cut(ready: list[tuple[Any, Any]], batch_size: int, width: int) -> Iterator[list[tuple[Any, Any]]]:
    """One shard's ``(key, input)`` pairs in batches: in key order within each length bucket
    (``len(input) // width``; one bucket, and any inputs, where ``width`` is 0), a bucket's last batch
    possibly short."""
    def bucket(kv: tuple) -> int:
        return len(kv[1]) // width if width else 0
    for _, same in itertools.groupby(sorted(ready, key=lambda kv: (bucket(kv), kv[0])), key=bucket):
        same = list(same)
        for start in range(0, len(same), batch_size):
            yield same[start:start + batch_size]


class Encode(beam.PTransform):
    """``((item_id, hash), (raw, source))`` -> ``((item_id, hash), vector)``, plus dead letters.

    Inputs are grouped into shards of about ``GROUP_BATCHES`` batches by a stable hash of the item id (the
    shard count follows the number of inputs), then :class:`Batch` cuts each shard into batches that
    depend on the inputs alone, and RunInference runs them as they are. ``resource_hints`` (e.g. an
    accelerator) go on the inference step only, so a runner can put just that step on GPU workers.
    """

    def __init__(self, make: Callable[[], Encoder], stage: str, batch_size: int, resource_hints: dict):
        super().__init__()
        self._make, self._stage, self._batch_size, self._hints = make, stage, batch_size, resource_hints

    def expand(self, pcoll: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        size = self._batch_size
        count = pcoll | "Count" >> beam.combiners.Count.Globally()
        batches = (pcoll
                   | "Shard" >> beam.Map(lambda kv, n: (shard_of(kv[0][0], shard_count(n, size)), kv),
                                         n=beam.pvalue.AsSingleton(count))
                   | "GroupShards" >> beam.GroupByKey()
                   | "Batch" >> beam.ParDo(Batch(self._make, self._stage, self._batch_size)
                                           ).with_outputs(DEAD, main="ok"))
        inference = RunInference(EncoderHandler(self._make).with_no_batching())
        if self._hints:
            inference = inference.with_resource_hints(**self._hints)
        vectors = batches.ok | "Infer" >> inference
        return vectors, batches[DEAD]
