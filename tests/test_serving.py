"""``mmfuse export`` and ``mmfuse serve``: a night as a SavedModel, answered over HTTP as the night wrote it."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mmfuse.pipelines import export
from mmfuse.transforms.contract import CatalogColumns
from mmfuse.transforms.embed import join_text
from tests.conftest import RUN_DATE, dataset, nightly_args

TOKEN = "s3cret-token"


HELD = ("item-0001", "item-0003")  # items whose interactions the night never sees: new items, to embed
WEIGHTING = ("--event_weights=view:1,click:2,purchase:5", "--recency_half_life_days=10", "--last_n_interactions=15")


@pytest.fixture(scope="module")
def night(demo, tmp_path_factory) -> Path:
    """A demo night without any interaction on the HELD items, whose user vectors weigh events, ratings and
    recency and keep each user's last 15 interactions."""
    from mmfuse.pipelines import nightly
    tmp = tmp_path_factory.mktemp("held_out")
    table = pq.read_table(demo["interactions"])
    pq.write_table(table.filter(pc.invert(pc.is_in(table["item_id"], pa.array(HELD)))), tmp / "interactions.parquet")
    assert nightly.main(nightly_args({**demo, "interactions": tmp / "interactions.parquet"}, tmp / "out",
                                     *WEIGHTING)) == 0
    return tmp / "out" / RUN_DATE


@pytest.fixture(scope="module")
def server(night, tmp_path_factory):
    """That night exported and served on a free localhost port, behind a bearer token."""
    model = tmp_path_factory.mktemp("export") / "mmfuse" / "1"
    assert export.main([f"--run={night}", f"--out={model}"]) == 0
    env = {**os.environ, "MMFUSE_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen([Path(sys.executable).parent / "mmfuse", "serve", f"--model={model}", "--port=0",
                             "--max_request_bytes=65536", "--max_instances=64", "--max_history=100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        pytest.fail(f"the server did not start: {line}{proc.stderr.read()}")
    yield line.split("listening on ")[1].strip().rsplit("/v1/", 1)[0], proc
    proc.terminate()
    assert proc.wait(30) == 0


def call(base: str, path: str, body: bytes | dict | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def night_lists(run, name: str, query: str, item: str) -> dict:
    lists = {}
    for row in sorted(dataset(run, name).to_pylist(), key=lambda r: (r[query], r["rank"])):
        lists.setdefault(row[query], []).append(row)
    return lists


def assert_night_lists(predictions: list[dict], lists: list[list[dict]], item: str = "item_id") -> None:
    """Each prediction is the night's list: the same items in the same order, scores and contributions."""
    for got, rows in zip(predictions, lists, strict=True):
        assert got["item_id"] == [r[item] for r in rows]
        assert got["score"] == pytest.approx([r["score"] for r in rows], abs=1e-5)
        for mine, row in zip(got["contributions"], rows):
            assert mine == pytest.approx(dict(row["contributions"]), abs=1e-5)


@pytest.mark.slow  # a nightly run, an export and a server process
def test_recommend_over_http_gives_the_nights_lists(server, night):
    base, _ = server
    lists = night_lists(night, "recommendations", "user_id", "item_id")
    users = sorted(lists)[:20]
    status, body = call(base, "/v1/models/mmfuse:predict",
                        {"signature_name": "recommend", "instances": [{"user_id": u, "k": 20} for u in users]})
    assert status == 200
    assert_night_lists(body["predictions"], [lists[u] for u in users])
    # columnar form, and a user the night never saw: the popular list
    status, body = call(base, "/v1/models/mmfuse:predict", {"signature_name": "recommend",
                                                            "inputs": {"user_id": ["nobody"], "k": 5}})
    popular = sorted(dataset(night, "popular").to_pylist(), key=lambda r: r["rank"])[:5]
    assert status == 200 and body["outputs"]["fallback"] == [True]
    assert body["outputs"]["item_id"] == [[r["item_id"] for r in popular]]
    assert body["outputs"]["contributions"][0][0] == {"popularity": pytest.approx(popular[0]["share"])}


@pytest.mark.slow
def test_recommend_for_a_posted_history_weighs_it_as_the_night_did(server, night, demo):
    """Each user's interactions posted as a history (events, ratings, timestamps, in any order) give the
    night's list for that user: same event weights, rating, recency half-life and last-15 cut."""
    base, _ = server
    lists = night_lists(night, "recommendations", "user_id", "item_id")
    users = sorted(lists)[-20:]
    histories = {u: [] for u in users}
    for e in pq.read_table(demo["interactions"]).to_pylist():
        if e["user_id"] in histories and e["item_id"] not in HELD:
            histories[e["user_id"]].insert(0, {"item_id": e["item_id"], "timestamp": e["timestamp"].isoformat(),
                                               "weight": e["weight"], "event": e["event"]})
    assert max(len(h) for h in histories.values()) > 15  # the last-N cut matters
    status, body = call(base, "/v1/models/mmfuse:predict", {"signature_name": "recommend", "instances": [
        {"history": histories[u], "k": 20} for u in users]})
    assert status == 200 and not any(p["fallback"] for p in body["predictions"])
    assert_night_lists(body["predictions"], [lists[u] for u in users])
    # nothing the night knows: the popular list
    status, body = call(base, "/v1/models/mmfuse:predict", {"instances": [
        {"history": [{"item_id": "no-such-item", "timestamp": 1_700_000_000}], "k": 3}]})
    assert status == 200 and body["predictions"][0]["fallback"]


@pytest.mark.slow
def test_similar_over_http_gives_the_nights_lists(server, night):
    base, _ = server
    lists = night_lists(night, "similar_items", "item_id", "similar_item_id")
    items = sorted(lists)[:5]
    status, body = call(base, "/v1/models/mmfuse:predict",
                        {"signature_name": "similar", "instances": [{"item_id": i, "k": 20} for i in items]})
    assert status == 200
    assert_night_lists(body["predictions"], [lists[i] for i in items], "similar_item_id")


@pytest.mark.slow
def test_embed_item_gives_a_new_items_night_vector_from_its_raw_content(server, night, demo):
    """The held-out items have no interactions, so the night's vectors for them come from content alone: the
    same content sent raw (text, image bytes, declared vectors) must come back as the same vectors."""
    base, _ = server
    catalog = {r["item_id"]: r for r in pq.read_table(demo["catalog"]).to_pylist() if r["item_id"] in HELD}
    folder = Path(demo["catalog"]) if Path(demo["catalog"]).is_dir() else Path(demo["catalog"]).parent

    def instance(row: dict) -> dict:
        columns = CatalogColumns().text
        out = {"text": join_text({c: row[c] for c in columns if row.get(c)}, columns), "k": 5}
        if row["image_bytes"] or row["image_uri"]:
            data = row["image_bytes"] or (folder / row["image_uri"]).read_bytes()
            out["image"] = {"b64": base64.b64encode(data).decode()}
        # audio has no in-graph encoder: its vector comes as the night encoded it
        audio = embeddings[row["item_id"]]["audio_mfcc"]
        return {**out, "features": row["features"], **({"audio_mfcc": audio} if audio else {})}
    embeddings = {r["item_id"]: r for r in dataset(night, "embeddings").to_pylist()}
    instances = [instance(catalog[i]) for i in HELD]
    status, body = call(base, "/v1/models/mmfuse:predict", {"signature_name": "embed_item", "instances": instances})
    assert status == 200
    vectors = {r["item_id"]: r["vector"] for r in dataset(night, "items").to_pylist()}
    similar = night_lists(night, "similar_items", "item_id", "similar_item_id")
    for item, got in zip(HELD, body["predictions"]):
        mine, theirs = np.array(got["vector"]), np.array(vectors[item])
        assert mine @ theirs / np.linalg.norm(mine) / np.linalg.norm(theirs) >= 0.999
        assert "cf" not in got["weights"] and {"text", "features"} <= set(got["weights"])
        # its most similar catalogue items: itself, then the night's similar items
        assert got["item_id"][0] == item
        assert set(got["item_id"][1:4]) <= {r["similar_item_id"] for r in similar[item][:5]}
    status, body = call(base, "/v1/models/mmfuse:predict", {"signature_name": "embed_item",
                                                            "instances": [{"image": {"b64": "bm90IGFuIGltYWdl"}}]})
    assert status == 400 and "could not be decoded" in body["error"]


@pytest.mark.slow
@pytest.mark.parametrize("body, code, says", [
    (b"{not json", 400, "not JSON"),
    ({"instances": [{"k": 3}]}, 400, "user_id"),
    ({"instances": [{"user_id": 7}]}, 400, "user_id"),
    ({"instances": [{"user_id": "u", "k": [1]}]}, 400, "\"k\""),
    ({"signature_name": "embed_item", "instances": [{"features": [1.0]}]}, 400, "16 numbers"),
    ({"signature_name": "embed_item", "instances": [{"image": "raw"}]}, 400, "b64"),
    ({"instances": [{"user_id": "u", "k": 0}]}, 400, '"k"'),
    ({"instances": [{"user_id": "u", "k": 2}, {"user_id": "v", "k": 3}]}, 400, "same"),
    ({"signature_name": "train", "instances": []}, 400, "unknown signature_name"),
    ({"instances": [{"user_id": f"u{i}"} for i in range(65)]}, 400, "at most 64"),
    ({"inputs": {"user_id": ["a", "b"], "x": ["c"]}}, 400, "as many"),
    ({"instances": [{"history": [{"item_id": "i", "timestamp": "yesterday"}]}]}, 400, "ISO-8601"),
    ({"instances": [{"history": [{"item_id": "i", "timestamp": 1, "weight": "5"}]}]}, 400, "weight"),
    ({"instances": [{"history": [{"item_id": "i", "timestamp": 1}] * 101}]}, 400, "at most 100"),
    ({"instances": [{"history": [], "user_id": "u"}]}, 400, "either"),
    (b"{" + b" " * 70_000 + b"}", 413, "larger than"),
])
def test_bad_requests_get_a_4xx_with_a_reason_and_the_server_lives_on(server, body, code, says):
    base, proc = server
    status, answer = call(base, "/v1/models/mmfuse:predict", body)
    assert status == code and says in answer["error"]
    assert call(base, "/healthz", token=None) == (200, {"status": "ok"}) and proc.poll() is None


@pytest.mark.slow
def test_the_bearer_token_guards_everything_but_health(server):
    base, _ = server
    assert call(base, "/v1/models/mmfuse", token=None)[0] == 401
    assert call(base, "/v1/models/mmfuse", token="wrong")[0] == 401
    status, body = call(base, "/v1/models/mmfuse")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    status, body = call(base, "/v1/models/mmfuse/metadata")
    assert status == 200 and "text" in body["metadata"]["modalities"] and "embed_item" in body["metadata"]["signatures"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_compressed_night_is_smaller_and_keeps_its_lists(night, dtype):
    """bfloat16 halves the item and user matrices, int8 quarters them; rankings may swap close scores, but
    the night's top 20 stay nearly whole (on the demo night: overlap 0.998 and 0.994)."""
    import tensorflow as tf

    from mmfuse.models.serving import Night
    a = export.arrays(str(night))
    full, small = Night(a), Night(a, dtype=dtype)

    def size(model) -> int:
        return sum(v.numpy().nbytes for v in model.variables if v.dtype != tf.string)
    assert size(small) < 0.6 * size(full)
    lists = night_lists(night, "recommendations", "user_id", "item_id")
    users = sorted(lists)
    got = small.recommend(tf.constant(users), tf.constant(20))["item_id"].numpy()
    overlap = [len({i.decode() for i in g} & {r["item_id"] for r in lists[u]}) / len(lists[u])
               for g, u in zip(got, users)]
    assert np.mean(overlap) >= 0.98 and min(overlap) >= 0.8


def test_export_refuses_an_incomplete_run(tmp_path, capsys):
    assert export.main([f"--run={tmp_path}", f"--out={tmp_path / 'model'}"]) == 2
    assert "not a complete run" in capsys.readouterr().err
