"""Users' own models for a modality: a .keras image model and a SavedModel text model, through the encode job."""
import hashlib
import io

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from mmfuse.models.custom import CustomEncoder, digest
from mmfuse.pipelines import encode
from tests.conftest import RUN_DATE, dataset, metrics

pytestmark = pytest.mark.slow  # every test here builds Keras models


def _png(colour, size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


class _TextStats(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, texts):
        return {"vector": tf.stack([tf.cast(tf.strings.length(texts), tf.float32),
                                    tf.cast(tf.strings.regex_replace(texts, "[^ ]", "") != "", tf.float32)], axis=1)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs)))
    image_model = keras.Model(inputs, outputs)
    image_model.save(root / "colour.keras")
    text = _TextStats()
    tf.saved_model.save(text, str(root / "text_stats"), signatures=text.__call__)
    return root, image_model


def test_custom_models_encode_in_the_pipeline(models, tmp_path):
    root, image_model = models
    rows = [{"item_id": "red", "title": "a red one", "image_bytes": _png((250, 0, 0))},
            {"item_id": "blue", "title": "blue", "image_bytes": _png((0, 0, 250))},
            {"item_id": "broken", "title": "x y z", "image_bytes": b"not an image"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "catalog.parquet")
    assert encode.main([f"--catalog={tmp_path / 'catalog.parquet'}", f"--output={tmp_path / 'out'}",
                        f"--run_date={RUN_DATE}", "--modalities=text,image", "--custom_image_size=16",
                        f"--custom_encoders=image={root / 'colour.keras'}@{digest(str(root / 'colour.keras'))},"
                        f"text={root / 'text_stats'}", "--trust_custom_models"]) == 0
    out = tmp_path / "out" / RUN_DATE
    got = {r["item_id"]: r for r in dataset(out, "embeddings").to_pylist()}
    assert got["red"]["text"] == [9.0, 1.0] and got["blue"]["text"] == [4.0, 0.0]
    for item, colour in (("red", (250, 0, 0)), ("blue", (0, 0, 250))):
        expected = image_model.predict_on_batch(np.full((1, 16, 16, 3), colour, np.float32))[0]
        np.testing.assert_allclose(got[item]["image"], expected, rtol=1e-5, atol=1e-6)
    assert got["broken"]["image"] is None
    assert metrics(out)["modalities"]["image"] == {"encoded": 2, "reused": 0, "dead": 1}


def test_identifier_follows_the_weights(models):
    root, _ = models
    encoder = CustomEncoder("image", "image", str(root / "colour.keras"))
    assert encoder.identifier.startswith("custom:colour.keras@")
    assert CustomEncoder("text", "text", str(root / "text_stats")).identifier != encoder.identifier


def test_a_savedmodel_runs_only_when_trusted_and_a_pin_must_match(models, tmp_path, capsys):
    """A SavedModel's graph can read and write files on the workers (a .keras file loads in safe mode)."""
    root, _ = models
    pq.write_table(pa.Table.from_pylist([{"item_id": "a", "title": "t", "image_bytes": _png((1, 2, 3))}]),
                   tmp_path / "catalog.parquet")
    base = [f"--catalog={tmp_path / 'catalog.parquet'}", f"--output={tmp_path / 'out'}", f"--run_date={RUN_DATE}",
            "--modalities=text,image", "--custom_image_size=16"]
    assert encode.main([*base, f"--custom_encoders=text={root / 'text_stats'}"]) == 2
    assert "is a SavedModel" in capsys.readouterr().err
    keras_file = root / "colour.keras"
    assert digest(str(keras_file)) == "sha256:" + hashlib.sha256(keras_file.read_bytes()).hexdigest()  # sha256sum
    wrong = "0" * 64
    assert encode.main([*base, f"--custom_encoders=image={keras_file}@sha256:{wrong}"]) == 2
    assert f"has digest {digest(str(keras_file))}, not the pinned sha256:{wrong}: refused" in capsys.readouterr().err
    assert encode.main([*base, f"--custom_encoders=text={root / 'text_stats'}@{digest(str(root / 'text_stats'))}",
                        "--trust_custom_models"]) == 0
    assert metrics(tmp_path / "out" / RUN_DATE)["modalities"]["text"] == {"encoded": 1, "reused": 0, "dead": 0}
