"""The encode pipeline: bad media dead-letter one modality of one item; unchanged content is reused."""
import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

from mmfuse.models.registry import factory
from mmfuse.pipelines import encode, nightly
from mmfuse.pipelines.config import Config
from tests.conftest import RUN_DATE, dataset, metrics, nightly_args
from tests.test_image_encoder import _png_claiming

pytestmark = pytest.mark.slow


def _image(fmt: str, size=(64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 160, 90)).save(out, format=fmt)
    return out.getvalue()


def _wav(seconds=1.0, sr=8000) -> bytes:
    out = io.BytesIO()
    t = np.arange(int(seconds * sr)) / sr
    sf.write(out, 0.3 * np.sin(2 * np.pi * 440 * t), sr, format="WAV", subtype="PCM_16")
    return out.getvalue()


@pytest.fixture(scope="module")
def bad_media_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    jpeg, wav = _image("JPEG"), _wav()
    images = {"img-ok-jpeg": jpeg, "img-ok-png": _image("PNG"), "img-corrupt": jpeg[:20] + bytes(range(256)) * 4,
              "img-truncated": jpeg[: len(jpeg) // 2], "img-empty": b"", "img-huge": _png_claiming(100_000, 100_000),
              "img-wrong-format": wav}
    # (a WAV header over random PCM would be valid noise, so the corrupt one is an Ogg page of junk)
    audio = {"aud-ok": wav, "aud-corrupt": b"OggS" + bytes(range(256)) * 40, "aud-empty": b"",
             "aud-wrong-format": jpeg, "aud-truncated-header": wav[:20]}
    rows = [{"item_id": k, "title": f"item {k}", "image_bytes": v, "audio_bytes": None} for k, v in images.items()]
    rows += [{"item_id": k, "title": f"item {k}", "image_bytes": None, "audio_bytes": v} for k, v in audio.items()]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        ("item_id", pa.string()), ("title", pa.string()), ("image_bytes", pa.binary()), ("audio_bytes", pa.binary())])),
        root / "catalog.parquet")
    assert encode.main([f"--catalog={root / 'catalog.parquet'}", f"--output={root / 'out'}", f"--run_date={RUN_DATE}",
                        "--modalities=text,image,audio_mfcc", "--max_dead_fraction=1"]) == 0  # bad on purpose
    return root / "out" / RUN_DATE, images, audio


def test_each_bad_medium_is_one_dead_letter(bad_media_run):
    out, _, _ = bad_media_run
    dead = sorted((r["stage"], r["key"], r["error"]) for r in dataset(out, "dead_letter").to_pylist())
    assert dead == sorted([
        ("encode:image", "img-corrupt", "corrupt_image"), ("encode:image", "img-truncated", "corrupt_image"),
        ("encode:image", "img-empty", "empty_image"), ("encode:image", "img-huge", "image_too_large"),
        ("encode:image", "img-wrong-format", "unsupported_format"),
        ("encode:audio_mfcc", "aud-corrupt", "corrupt_audio"), ("encode:audio_mfcc", "aud-empty", "empty_audio"),
        ("encode:audio_mfcc", "aud-wrong-format", "unsupported_format"),
        ("encode:audio_mfcc", "aud-truncated-header", "corrupt_audio")])
    report = metrics(out)
    assert report["modalities"]["image"] == {"encoded": 2, "reused": 0, "dead": 5}
    assert report["modalities"]["text"] == {"encoded": 12, "reused": 0, "dead": 0}


def test_good_media_get_the_models_vectors(bad_media_run):
    out, images, audio = bad_media_run
    rows = {r["item_id"]: r for r in dataset(out, "embeddings").to_pylist()}
    assert len(rows) == 12 and all(r["text"] is not None for r in rows.values())
    image = factory("image")()
    for key in ("img-ok-jpeg", "img-ok-png"):
        expected = image.encode_batch([image.preprocess(images[key])])[0]
        np.testing.assert_allclose(rows[key]["image"], expected, rtol=1e-4, atol=1e-5)
    mfcc = factory("audio_mfcc")()
    np.testing.assert_allclose(rows["aud-ok"]["audio_mfcc"], mfcc.encode_batch([mfcc.preprocess(audio["aud-ok"])])[0],
                               rtol=1e-5, atol=1e-5)
    assert rows["img-corrupt"]["image"] is None and rows["img-corrupt"]["text"] is not None


def test_second_night_reuses_and_reencodes_only_changes(demo, demo_night, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo_night.parent, out)  # the first night
    assert nightly.main(nightly_args(demo, out, "--run_date=2026-11-28")) == 0
    second = metrics(out / "2026-11-28")
    assert second["previous"] == str(out / RUN_DATE)
    for m in ("text", "image", "audio_mfcc"):
        assert second["modalities"][m]["encoded"] == 0 and second["modalities"][m]["reused"] > 0, m

    catalog = pq.read_table(demo["catalog"]).to_pylist()
    changed_text = [r["item_id"] for r in catalog[:3]]
    inline = [r["item_id"] for r in catalog if r["image_bytes"]][:2]
    for r in catalog:
        if r["item_id"] in changed_text:
            r["title"] += " (remastered)"
        if r["item_id"] in inline:
            r["image_bytes"] = _image("PNG", (40, 40))
    edited = tmp_path / "in" / "catalog" / "catalog.parquet"
    edited.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(catalog, schema=pq.read_schema(demo["catalog"])), edited)
    (tmp_path / "in" / "media").symlink_to(demo["root"] / "media")  # relative media URIs resolve as before
    assert nightly.main(nightly_args({**demo, "catalog": edited}, out, "--run_date=2026-11-29")) == 0
    third = metrics(out / "2026-11-29")
    assert third["modalities"]["text"]["encoded"] == 3 and third["modalities"]["image"]["encoded"] == 2
    assert third["modalities"]["audio_mfcc"]["encoded"] == 0
    before = {r["item_id"]: r for r in dataset(out / "2026-11-28", "embeddings").to_pylist()}
    after = {r["item_id"]: r for r in dataset(out / "2026-11-29", "embeddings").to_pylist()}
    changed = {i for i in after if after[i]["text_hash"] != before[i]["text_hash"]}
    assert changed == set(changed_text)
    unchanged = next(i for i in after if i not in changed_text and i not in inline)
    assert after[unchanged] == before[unchanged]


def _encode_texts(texts: list[tuple[str, str]], batch_size: int, out: Path) -> dict[str, np.ndarray]:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from mmfuse import runners
    from mmfuse.transforms.inference import Encode
    with runners.create_pipeline(PipelineOptions(["--runner=DirectRunner"])) as p:
        vectors, _ = (p | beam.Create([((i, "h"), (t, "c.parquet")) for i, t in texts])
                      | Encode(factory("text"), "encode:text", batch_size, {}))
        _ = (vectors | beam.Map(lambda kv: (kv[0][0], kv[1])) | beam.combiners.ToList()
             | beam.Map(lambda pairs: np.savez(out, **dict(pairs))))
    with np.load(out) as saved:
        return {name: saved[name] for name in saved.files}


def test_an_items_vector_does_not_depend_on_the_order_items_arrive_in(tmp_path):
    """A model's floats depend on the batch it runs in (packed tokens change the kernels' shapes): batches
    that followed arrival order gave one text vectors up to 1.5e-7 apart between reruns of a night. The
    same texts arriving in another order, other batches once, now get bit-identical vectors."""
    words = "the quick brown fox jumps over a lazy dog while seven odd birds sing".split()
    texts = [(f"item-{i:02d}", " ".join(words[: 2 + i % 11])) for i in range(24)]
    forward = _encode_texts(texts, 4, tmp_path / "forward.npz")
    backward = _encode_texts(texts[::-1], 4, tmp_path / "backward.npz")
    assert sorted(forward) == sorted(backward) == sorted(i for i, _ in texts)
    for item_id in forward:
        np.testing.assert_array_equal(forward[item_id], backward[item_id])


def test_a_batchs_vectors_do_not_depend_on_the_batches_before_it():
    """Keras on TensorFlow runs a worker's first batch shape through a graph traced for exactly that shape,
    and later shapes through a relaxed one, which gave the same text vectors 1.5e-7 apart depending on which
    batch came first. Encoders settle on the relaxed graph when they build."""
    words = "the quick brown fox jumps over a lazy dog".split()
    inputs = [factory("text")().preprocess(" ".join(words[:n])) for n in (2, 5, 9, 3)]
    alone = factory("text")().encode_batch(inputs)
    after = factory("text")()
    after.encode_batch(inputs[1:])
    np.testing.assert_array_equal(after.encode_batch(inputs), alone)


def test_alignment_batches_have_a_fixed_size():
    """Beam's adaptive batching follows timings, and a model's floats depend on the batch it runs in."""
    from mmfuse.transforms.inference import AlignHandler
    kwargs = AlignHandler(32).batch_elements_kwargs()
    assert kwargs["min_batch_size"] == kwargs["max_batch_size"] == 32


def test_the_media_size_limit_holds_for_inline_bytes_as_for_files(tmp_path):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    from mmfuse import runners
    from mmfuse.transforms.media import FetchMedia
    (tmp_path / "big.png").write_bytes(b"x" * 101)
    (tmp_path / "ok.png").write_bytes(b"x" * 100)
    items = [(name, {"image": data, "image_uri": uri, "source": f"c.parquet#row={i}"}) for i, (name, data, uri) in
             enumerate([("inline-big", b"x" * 101, None), ("inline-ok", b"x" * 100, None),
                        ("file-big", None, str(tmp_path / "big.png")), ("file-ok", None, str(tmp_path / "ok.png"))])]
    with runners.create_pipeline(PipelineOptions(["--runner=DirectRunner"])) as p:
        fetched, dead = p | beam.Create(items) | FetchMedia("image", 100, [str(tmp_path)])
        assert_that(fetched | beam.Map(lambda e: (e[0], len(e[1]["image"] or b""))),
                    equal_to([("inline-big", 0), ("inline-ok", 100), ("file-big", 0), ("file-ok", 100)]))
        assert_that(dead | beam.Map(lambda d: (d["key"], d["error"])),
                    equal_to([("inline-big", "media_too_large"), ("file-big", "media_too_large")]), label="dead")


def test_audio_files_go_on_by_reference_checked_and_hashed_whatever_their_size(tmp_path):
    """Audio is decoded in parts (the windows kept), so a file larger than --max_media_bytes is not read
    into the item: it goes on as a checked, hashed reference, and the confinement rules hold as for bytes."""
    import hashlib

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    from mmfuse import runners
    from mmfuse.transforms.media import FetchMedia, MediaFile
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "long.wav").write_bytes(b"RIFF" + bytes(996))
    (tmp_path / "secret.wav").write_bytes(b"RIFF" + bytes(10))
    items = [(name, {"audio": None, "audio_uri": str(uri), "source": f"c.parquet#row={i}"}) for i, (name, uri) in
             enumerate([("long", tmp_path / "in" / "long.wav"), ("escape", tmp_path / "in" / ".." / "secret.wav")])]
    with runners.create_pipeline(PipelineOptions(["--runner=DirectRunner"])) as p:
        fetched, dead = p | beam.Create(items) | FetchMedia("audio", 100, [str(tmp_path / "in")], in_parts=True)
        assert_that(fetched | beam.Map(lambda e: (e[0], e[1]["audio"])), equal_to([
            ("long", MediaFile(str((tmp_path / "in" / "long.wav").resolve()), 1000,
                               hashlib.sha256(b"RIFF" + bytes(996)).hexdigest())),
            ("escape", None)]))
        assert_that(dead | beam.Map(lambda d: (d["key"], d["error"])), equal_to([("escape", "media_outside_roots")]),
                    label="dead")


def test_media_are_read_only_from_regular_files_under_the_media_roots(tmp_path):
    """A catalog is outside data: its URIs must not read the worker's own files, nor hang it on a FIFO."""
    import os

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    from mmfuse import runners
    from mmfuse.transforms.contract import resolve_uri
    from mmfuse.transforms.media import FetchMedia
    catalog = tmp_path / "catalog"
    (catalog / "img").mkdir(parents=True)
    (catalog / "img" / "ok.png").write_bytes(_image("PNG"))
    (catalog / "img" / "escape.png").symlink_to("/etc/passwd")
    os.mkfifo(catalog / "img" / "pipe.png")
    source = str(catalog / "c.parquet")
    uris = {"ok": "img/ok.png", "absolute": "/etc/passwd", "dotdot": "../" * 8 + "etc/shadow",
            "proc": "/proc/self/environ", "symlink": "img/escape.png", "fifo": "img/pipe.png", "folder": "img"}
    items = [(name, {"image": None, "image_uri": resolve_uri(uri, source), "source": source})
             for name, uri in uris.items()]
    with runners.create_pipeline(PipelineOptions(["--runner=DirectRunner"])) as p:
        fetched, dead = p | beam.Create(items) | FetchMedia("image", 1 << 20, [str(catalog)])
        assert_that(fetched | beam.Filter(lambda e: e[1]["image"] is not None) | beam.Keys(), equal_to(["ok"]))
        assert_that(dead | beam.Map(lambda d: (d["key"], d["error"], "root:" in d["message"])), equal_to([
            ("absolute", "media_outside_roots", False), ("dotdot", "media_outside_roots", False),
            ("proc", "media_outside_roots", False), ("symlink", "media_outside_roots", False),
            ("fifo", "not_a_regular_file", False), ("folder", "not_a_regular_file", False)]), label="dead")


def test_media_roots_default_to_the_catalogs_own_folder(tmp_path):
    from mmfuse.transforms.media import default_root
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.parquet").write_bytes(b"")
    assert default_root(str(tmp_path / "cat")) == str(tmp_path / "cat")
    assert default_root(str(tmp_path / "cat" / "a.parquet")) == str(tmp_path / "cat")
    assert default_root(str(tmp_path / "cat" / "*.parquet")) == str(tmp_path / "cat")
    assert default_root("gs://bucket/in/catalog") == "gs://bucket/in/catalog"
    assert default_root("gs://bucket/in/catalog/part-0.parquet") == "gs://bucket/in/catalog"


def test_auto_precision_is_bfloat16_for_text_only_where_the_hardware_runs_it(monkeypatch, tmp_path):
    from mmfuse.models.base import native_bfloat16
    from mmfuse.pipelines import resolve
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    assert native_bfloat16(str(cpuinfo)) and not native_bfloat16(str(tmp_path / "absent"))
    opts = dataclasses.replace(Config.parse(PipelineOptions([])).encode, precision="auto")
    for native, text in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(resolve, "native_bfloat16", lambda native=native: native)
        assert (resolve.precision(opts, "text"), resolve.precision(opts, "image")) == (text, "float32")
    assert resolve.precision(dataclasses.replace(opts, accelerator="type:nvidia-l4;count:1"), "text") == "bfloat16"
    assert resolve.precision(dataclasses.replace(opts, precision="bfloat16"), "image") == "bfloat16"
