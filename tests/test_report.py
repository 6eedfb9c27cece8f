"""A night's summary figures, report and alerts, end to end on the demo night."""
from __future__ import annotations

import base64
import collections
import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmfuse.pipelines import alerts, report
from mmfuse.transforms import summary
from tests.conftest import ROOT, RUN_DATE, dataset, metrics

pytestmark = pytest.mark.slow  # reads a nightly run


def test_report_draws_the_nights_own_figures(demo, demo_night):
    figures = metrics(demo_night)
    page = (demo_night / report.REPORT).read_text()
    assert page == report.render(figures)  # the page is drawn from metrics.json and nothing else
    for section in ("Alerts", "Stages", "Dead letters by reason", "Modalities and fusion", "Alignment training",
                    "Recommendations", "Sample users"):
        assert f"<h2>{section}</h2>" in page
    s = figures["summary"]
    assert set(s["modality_coverage"]) == {"text", "image", "audio_mfcc", "features", "cf"}
    assert set(s["fusion_weights"]) == set(s["modality_coverage"])
    assert len(s["samples"]["users"]) == 5 and s["alignment"]["curves"] and figures["alerts"] == []
    assert set(figures["stage_seconds"]) == set(figures["stages"])

    # Independent counts from the written datasets.
    items = dataset(demo_night, "items").to_pylist()
    recs = dataset(demo_night, "recommendations").to_pylist()
    shown = collections.Counter(r["item_id"] for r in recs)
    coverage = {m: sum(m in dict(i["weights"]) for i in items) / len(items) for m in s["modality_coverage"]}
    assert s["modality_coverage"] == pytest.approx(coverage, abs=1e-6)
    exposure = np.array([shown.get(i["item_id"], 0) for i in items])
    assert s["exposure"]["catalogue_coverage"] == pytest.approx((exposure > 0).mean(), abs=1e-6)
    x = np.sort(exposure.astype(float))
    gini = (2 * np.arange(1, len(x) + 1) - len(x) - 1) @ x / (len(x) * x.sum())
    assert s["exposure"]["gini"] == pytest.approx(gini, abs=1e-6)
    assert sum(s["scores"]["personal"]["counts"]) == sum("popularity" not in dict(r["contributions"]) for r in recs)
    assert 0 <= s["exposure"]["long_tail_share"] <= 1
    sample = s["samples"]["users"][0]
    mine = [r for r in recs if r["user_id"] == sample["user_id"]]
    assert [r["item_id"] for r in sorted(mine, key=lambda r: r["rank"])] == \
        [r["item_id"] for r in sample["recommendations"]]
    assert all(r["title"] for r in sample["recommendations"])
    # Thumbnails of the sample items whose catalog row names an image file, small JPEGs inline in the page.
    catalog = pq.read_table(demo["catalog"], columns=["item_id", "image_uri"]).to_pylist()
    with_file = {r["item_id"] for r in catalog if r["image_uri"]}
    named = {e["item_id"] for u in s["samples"]["users"] for e in u["history"] + u["recommendations"]}
    thumbnails = s["samples"]["thumbnails"]
    assert thumbnails and set(thumbnails) <= named & with_file
    for uri in thumbnails.values():
        image = Image.open(io.BytesIO(base64.b64decode(uri.removeprefix("data:image/jpeg;base64,"))))
        assert image.format == "JPEG" and max(image.size) <= 48
        assert f'<img src="{uri}"' in page


def test_a_breached_threshold_is_reported_and_exits_4_with_the_night_complete(tmp_path):
    catalog, out = tmp_path / "catalog.parquet", tmp_path / "out"
    pq.write_table(pa.table({"item_id": ["a", "", "b", "c"], "title": ["A", "no id", "B", "C"]}), catalog)
    proc = subprocess.run([sys.executable, "-m", "mmfuse.pipelines.cli", "ingest", f"--catalog={catalog}",
                           f"--output={out}", f"--run_date={RUN_DATE}", "--runner=DirectRunner",
                           "--alert_dead_fraction_above=0.2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == alerts.ALERT_EXIT, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mmfuse ingest: alert: ")]
    assert lines and len(lines) == len(metrics(out / RUN_DATE)["alerts"])
    assert (out / RUN_DATE / "_SUCCESS").exists() and (out / RUN_DATE / report.REPORT).exists()
    assert summary.SECTION not in metrics(out / RUN_DATE)  # ingest alone has no recommendations to summarise


def score_night_against_a_seeded_holdout(night, tmp_path, interactions, seed: int = 0) -> None:
    """``evaluate --run`` against a seeded holdout (catalogue items, plus an unknown item and user) equals
    a scorer written here from the Parquet files alone, overall and per item-popularity segment of the
    night's ``interactions``."""
    from mmfuse.pipelines import evaluate
    items = dataset(night, "items")["item_id"].to_pylist()
    users = dataset(night, "users")["user_id"].to_pylist()
    rng = np.random.default_rng(seed)
    pairs = [(u, items[i]) for u in sorted(users)[:200] for i in rng.choice(len(items), 3, replace=False)]
    pairs += [(users[0], "no-such-item"), ("no-such-user", items[0])]
    holdout = tmp_path / "holdout.parquet"
    pq.write_table(pa.table({"user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs]}), holdout)
    assert evaluate.main([f"--run={night}", f"--holdout={holdout}", f"--output={tmp_path / 'eval'}",
                          f"--interactions={interactions}"]) == 0
    got = json.loads((tmp_path / "eval" / "evaluation.json").read_text())

    recs = dataset(night, "recommendations").to_pylist()
    top = collections.defaultdict(list)
    for r in sorted(recs, key=lambda r: (r["user_id"], r["rank"])):
        top[r["user_id"]].append(r["item_id"])
    held = collections.defaultdict(set)
    for u, i in pairs:
        if i in set(items) and u in set(users):
            held[u].add(i)
    def recall(segment) -> float:
        return np.mean([len(set(top[u][:20]) & h & segment) / len(h & segment)
                        for u, h in held.items() if h & segment])

    assert got["overall"]["users"] == len(held)
    assert got["overall"]["recall@20"] == pytest.approx(recall(set(items)), abs=1e-6)
    # The head: the items of largest count, as many as fit in a fifth of the catalogue with ties kept together.
    counts = collections.Counter(str(i) for i in pq.read_table(interactions)["item_id"].to_pylist())
    counts = {i: counts[i] for i in items}
    head_min = min((c for c in counts.values() if c and sum(d >= c for d in counts.values()) <= len(items) / 5),
                   default=max(counts.values()) + 1)
    segments = {"head": {i for i, c in counts.items() if c >= head_min},
                "tail": {i for i, c in counts.items() if 0 < c < head_min},
                "unseen": {i for i, c in counts.items() if c == 0}}
    for name, segment in segments.items():
        assert got["popularity_items"][name] == len(segment)
        if any(h & segment for h in held.values()):
            assert got["by_popularity"][name]["recall@20"] == pytest.approx(recall(segment), abs=1e-6), name
    assert sum(m["users"] for m in got["by_activity"].values()) == len(held)
    assert set(got["exposure"]) >= {"catalogue_coverage", "gini", "long_tail_share"}


def test_evaluate_scores_the_nights_own_recommendations(demo, demo_night, tmp_path):
    score_night_against_a_seeded_holdout(demo_night, tmp_path, demo["interactions"])
