"""Every kind of bad record ends in dead_letter once, with a useful message, and every stage reconciles."""
import datetime as dt
import io
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from PIL import Image

from mmfuse.pipelines import nightly
from mmfuse.pipelines.job import execute
from tests.conftest import RUN_DATE, dataset, metrics

UTC = dt.timezone.utc


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "catalog" / "img").mkdir(parents=True)
    (root / "catalog" / "img" / "good.png").write_bytes(_png())
    (root / "catalog" / "img" / "folder.png").mkdir()
    rows = [
        dict(item_id="good-1", title="Good one", image_uri="img/good.png", features=[1.0, 0, 0, 0]),
        dict(item_id="good-2", title="Good two", tags=["a", "b"], image_bytes=_png()),
        dict(item_id=None, title="No id"),
        dict(item_id="", title="Empty id"),
        dict(item_id="dup", title="Old copy", updated_at=dt.datetime(2026, 1, 1, tzinfo=UTC)),
        dict(item_id="dup", title="New copy", updated_at=dt.datetime(2026, 2, 1, tzinfo=UTC)),
        dict(item_id="missing-media", title="x", image_uri="img/nope.png"),
        dict(item_id="unreadable-media", title="x", image_uri="img/folder.png"),
        dict(item_id="short-vector", title="x", features=[1.0, 2.0, 3.0]),
        dict(item_id="nan-vector", title="x", features=[1.0, math.nan, 0, 0]),
    ]
    schema = pa.schema([("item_id", pa.string()), ("title", pa.string()), ("tags", pa.list_(pa.string())),
                        ("image_uri", pa.string()), ("image_bytes", pa.binary()),
                        ("features", pa.list_(pa.float32())), ("updated_at", pa.timestamp("us", tz="UTC"))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "catalog" / "a.parquet")
    pq.write_table(pa.table({"item_id": ["typed-1"], "title": pa.array([7], pa.int64())}),
                   root / "catalog" / "b.parquet")
    t = 1_764_000_000
    events = [("u1", "good-1", t, 4.0), ("u1", "good-2", t + 1, None), ("u2", "dup", t, 5.0),
              ("u3", "unknown-item", t, 1.0), ("u4", "good-1", -5, 1.0), ("u5", "good-1", 4_000_000_000, 1.0),
              (None, "good-1", t, 1.0), ("u6", "good-1", t, math.nan), ("u7", "typed-1", t, 2.0)]
    pq.write_table(pa.table({"user_id": [e[0] for e in events], "item_id": [e[1] for e in events],
                             "timestamp": pa.array([e[2] for e in events], pa.int64()),
                             "weight": pa.array([e[3] for e in events], pa.float64())}),
                   root / "interactions.parquet")
    result, folder = execute(nightly.build, [
        f"--catalog={root / 'catalog'}", f"--interactions={root / 'interactions.parquet'}",
        f"--output={root / 'out'}", f"--run_date={RUN_DATE}", "--vector_columns=features:4",
        "--max_dead_fraction=1"])  # bad on purpose
    return result, folder.final, root


@pytest.mark.slow
def test_each_bad_record_is_dead_lettered_once(run):
    _, out, root = run
    dead = {(r["stage"], r["key"], r["error"]): r for r in dataset(out, "dead_letter").to_pylist()}
    a = str(root / "catalog" / "a.parquet")
    assert sorted(dead) == sorted([
        ("catalog", f"{a}#row=2", "missing_item_id"),
        ("catalog", f"{a}#row=3", "empty_item_id"),
        ("catalog", "dup", "duplicate_item_id"),
        ("catalog", "typed-1", "wrong_type"),
        ("media:image", "missing-media", "missing_media"),
        ("media:image", "unreadable-media", "not_a_regular_file"),
        ("encode:features", "short-vector", "bad_vector"),
        ("encode:features", "nan-vector", "bad_vector"),
        ("interactions", "u3", "unknown_item"),
        ("interactions", "u4", "bad_timestamp"),
        ("interactions", "u5", "bad_timestamp"),
        ("interactions", str(root / "interactions.parquet") + "#row=6", "missing_user_id"),
        ("interactions", "u6", "bad_weight"),
        ("interactions", "u7", "unknown_item"),
    ])
    assert len(dataset(out, "dead_letter")) == len(dead)
    duplicate = dead[("catalog", "dup", "duplicate_item_id")]
    assert duplicate["source"] == f"{a}#row=4" and f"kept the copy at {a}#row=5" in duplicate["message"]
    assert "newest updated_at" in duplicate["message"]
    typed = dead[("catalog", "typed-1", "wrong_type")]
    assert "title must be a string or a list of strings, got int 7" in typed["message"]
    assert "img/nope.png: file not found" in dead[("media:image", "missing-media", "missing_media")]["message"]
    assert "has 3 values, declared 4" in dead[("encode:features", "short-vector", "bad_vector")]["message"]


@pytest.mark.slow
def test_good_records_flow_on(run):
    _, out, _ = run
    embeddings = {r["item_id"]: r for r in dataset(out, "embeddings").to_pylist()}
    assert sorted(embeddings) == ["dup", "good-1", "good-2", "missing-media", "nan-vector", "short-vector",
                                  "unreadable-media"]
    assert embeddings["good-1"]["features"] == [1.0, 0, 0, 0] and len(embeddings["good-1"]["features_hash"]) == 32
    assert embeddings["nan-vector"]["features"] is None


@pytest.mark.slow
def test_metrics_reconcile_and_match_beam_counters(run):
    result, out, _ = run
    report = metrics(out)
    assert report["run_date"] == RUN_DATE
    assert report["stages"]["catalog"] == {"in": 11, "out": 7, "dead": 4}
    assert report["stages"]["interactions"] == {"in": 9, "out": 3, "dead": 6}
    assert report["stages"]["media:image"] == {"in": 4, "out": 2, "dead": 2}
    assert report["stages"]["encode:features"] == {"in": 3, "out": 1, "dead": 2}
    for name, c in report["stages"].items():
        assert c["in"] == c["out"] + c["dead"], name
    counters = {r.key.metric.name: r.committed for r in result.metrics().query(MetricsFilter())["counters"]
                if r.key.metric.namespace == "mmfuse"}
    for name, c in report["stages"].items():
        for kind in ("in", "out", "dead"):
            assert counters.get(f"stages.{name}.{kind}", 0) == c[kind], (name, kind)
    # the summary's histograms also as Beam distributions (thousandths), for the runner's monitoring
    distributions = {r.key.metric.name: r.committed for r in result.metrics().query(MetricsFilter())["distributions"]
                     if r.key.metric.namespace == "mmfuse"}
    for modality, histogram in report["summary"]["fusion_weights"].items():
        assert distributions[f"summary.fusion_weights.{modality}.milli"].count == sum(histogram["counts"])
    scores = distributions["summary.scores.personal.milli"]
    assert scores.count == sum(report["summary"]["scores"]["personal"]["counts"])
    assert -1000 <= scores.min <= scores.max <= 1000


def test_a_bigquery_style_export_is_read_whole(tmp_path):
    """INT64 ids, ISO-8601 string timestamps and a null tag: every record passes (each used to be
    dead-lettered, and the run exited 0)."""
    from mmfuse.pipelines import ingest
    pq.write_table(pa.table({"item_id": pa.array([1, 2, 3], pa.int64()), "title": ["a", "b", "c"],
                             "tags": pa.array([["x", None], None, ["y"]], pa.list_(pa.string()))}),
                   tmp_path / "catalog.parquet")
    pq.write_table(pa.table({"user_id": pa.array([10, 10, 11], pa.int64()),
                             "item_id": pa.array([1, 2, 3], pa.int64()),
                             "timestamp": ["2025-11-24T16:00:00Z", "2025-11-24 17:00:00",
                                           "2025-11-25T01:00:00+02:00"]}),
                   tmp_path / "interactions.parquet")
    assert ingest.main([f"--catalog={tmp_path / 'catalog.parquet'}",
                        f"--interactions={tmp_path / 'interactions.parquet'}", f"--output={tmp_path / 'out'}",
                        f"--run_date={RUN_DATE}", "--runner=DirectRunner"]) == 0
    stages = metrics(tmp_path / "out" / RUN_DATE)["stages"]
    assert stages["catalog"] == {"in": 3, "out": 3, "dead": 0}
    assert stages["interactions"] == {"in": 3, "out": 3, "dead": 0}
