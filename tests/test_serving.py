"""``mmfuse export`` and ``mmfuse serve``: a night as a SavedModel, answered over HTTP as the night wrote it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mmfuse.pipelines import export
from tests.conftest import dataset

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(demo_night, tmp_path_factory):
    """The demo night exported and served on a free localhost port, behind a bearer token."""
    model = tmp_path_factory.mktemp("export") / "mmfuse" / "1"
    assert export.main([f"--run={demo_night}", f"--out={model}"]) == 0
    env = {**os.environ, "MMFUSE_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen([Path(sys.executable).parent / "mmfuse", "serve", f"--model={model}", "--port=0",
                             "--max_request_bytes=65536", "--max_instances=64"],
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


@pytest.mark.slow  # a nightly run, an export and a server process
def test_recommend_over_http_gives_the_nights_lists(server, demo_night):
    base, _ = server
    night = night_lists(demo_night, "recommendations", "user_id", "item_id")
    users = sorted(night)[:20]
    status, body = call(base, "/v1/models/mmfuse:predict",
                        {"signature_name": "recommend", "instances": [{"user_id": u, "k": 20} for u in users]})
    assert status == 200
    for user, got in zip(users, body["predictions"]):
        rows = night[user]
        assert got["item_id"] == [r["item_id"] for r in rows]
        assert got["score"] == pytest.approx([r["score"] for r in rows], abs=1e-5)
        for mine, row in zip(got["contributions"], rows):
            assert mine == pytest.approx(dict(row["contributions"]), abs=1e-5)
    # columnar form, and a user the night never saw: the popular list
    status, body = call(base, "/v1/models/mmfuse:predict", {"signature_name": "recommend",
                                                            "inputs": {"user_id": ["nobody"], "k": 5}})
    popular = sorted(dataset(demo_night, "popular").to_pylist(), key=lambda r: r["rank"])[:5]
    assert status == 200 and body["outputs"]["fallback"] == [True]
    assert body["outputs"]["item_id"] == [[r["item_id"] for r in popular]]
    assert body["outputs"]["contributions"][0][0] == {"popularity": pytest.approx(popular[0]["share"])}


@pytest.mark.slow
def test_similar_over_http_gives_the_nights_lists(server, demo_night):
    base, _ = server
    night = night_lists(demo_night, "similar_items", "item_id", "similar_item_id")
    items = sorted(night)[:5]
    status, body = call(base, "/v1/models/mmfuse:predict",
                        {"signature_name": "similar", "instances": [{"item_id": i, "k": 20} for i in items]})
    assert status == 200
    for item, got in zip(items, body["predictions"]):
        assert got["item_id"] == [r["similar_item_id"] for r in night[item]]
        assert got["score"] == pytest.approx([r["score"] for r in night[item]], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("body, code, says", [
    (b"{not json", 400, "not JSON"),
    ({"instances": [{"k": 3}]}, 400, "user_id"),
    ({"instances": [{"user_id": "u", "k": 0}]}, 400, '"k"'),
    ({"instances": [{"user_id": "u", "k": 2}, {"user_id": "v", "k": 3}]}, 400, "same"),
    ({"signature_name": "train", "instances": []}, 400, "unknown signature_name"),
    ({"instances": [{"user_id": f"u{i}"} for i in range(65)]}, 400, "at most 64"),
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
    assert status == 200 and "text" in body["metadata"]["modalities"]


def test_export_refuses_an_incomplete_run(tmp_path, capsys):
    assert export.main([f"--run={tmp_path}", f"--out={tmp_path / 'model'}"]) == 2
    assert "not a complete run" in capsys.readouterr().err
