"""The night's summary figures against plain numpy on small inputs, and the report drawn from them."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from mmfuse import runners
from mmfuse.models.ranking import Ranked
from mmfuse.pipelines import alerts, report
from mmfuse.transforms import summary


def _gini(values: np.ndarray) -> float:
    x = np.sort(values.astype(float))
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def test_gini_from_a_histogram_of_counts_equals_numpy():
    rng = np.random.default_rng(0)
    for values in (rng.integers(0, 30, 500), rng.zipf(1.5, 300) % 1000, np.full(40, 7), np.r_[np.zeros(99), 5]):
        histogram = {int(v): int(n) for v, n in zip(*np.unique(values, return_counts=True))}
        assert np.isclose(summary.gini(histogram), _gini(values), atol=1e-12)
    assert summary.gini({0: 10}) == 0.0


def test_head_is_at_most_a_fifth_of_the_catalogue_ties_kept_together():
    popularity = {100: 1, 50: 2, 10: 3, 3: 4, 0: 10}  # 20 items
    assert summary.head_threshold(popularity) == 50  # 3 items; adding the three 10s would pass 4
    assert summary.head_threshold({5: 10}) == 6  # one tie larger than the head: everything is tail


def _ranked(user: str, items: list[str], scores: list[float]) -> tuple:
    return user, Ranked(user, np.array(items), np.array(scores, np.float32), ("text",),
                        np.array(scores, np.float32)[:, None])


def test_exposure_churn_and_score_figures_equal_a_direct_count():
    ranked = [_ranked("u1", ["a", "b"], [0.9, 0.5]), _ranked("u2", ["a", "c"], [0.8, -0.2]),
              _ranked("u3", ["a", "b"], [0.1, 0.0])]
    items = [{"item_id": i, "weights": {"text": 1.0}} for i in "abcdefghij"]
    events = [{"user_id": "x", "item_id": i, "timestamp": t} for t, i in enumerate("aaaaabbbcd")]
    before = [("u1", "a"), ("u1", "z"), ("u2", "a"), ("u2", "c"), ("u9", "a")]
    exposure = {0: 7, 1: 1, 2: 1, 3: 1}  # a 3 times, b twice, c once, seven items never
    # head: a (5 events) and b (3): 2 items of 10; tail slots: c's one of 6
    expected = [("summary", "exposure", "catalogue_coverage", 0.3), ("summary", "exposure", "long_tail_share",
                round(1 / 6, 6)), ("summary", "exposure", "gini", round(summary.gini(exposure), 6)),
                ("summary", "exposure", "histogram", {"0": 7, "1": 1, "2": 1, "3": 1}),
                ("summary", "exposure", "head_threshold", 3)]
    with runners.create_pipeline(PipelineOptions(["--runner=DirectRunner"])) as p:
        r = p | "Ranked" >> beam.Create(ranked)
        figures = {"ranked": r, "items": p | "Items" >> beam.Create(items),
                   "interactions": p | "Events" >> beam.Create(events)} | summary.Exposure()
        assert_that(figures, equal_to(expected), label="Exposure")
        churn = {"tonight": r, "before": p | "Before" >> beam.Create(before)} | summary.Churn()
        assert_that(churn, equal_to([("summary", "churn", "users", 2), ("summary", "churn", "mean", 0.25)]),
                    label="Churn")  # u1: 1/2 new, u2: none new; u3 and u9 were recommended one night only
        scores = r | summary.Histograms("scores", lambda qr: [("personal", float(s)) for s in qr[1].scores],
                                        -1.0, 1.0, 4)
        assert_that(scores, equal_to([("summary", "scores", "personal",
                                       {"edges": [-1.0, -0.5, 0.0, 0.5, 1.0], "counts": [0, 1, 2, 3]})]),
                    label="Scores")


def test_report_shows_the_metrics_figures_and_alerts_name_each_breach():
    metrics = {"run_date": "2026-11-27", "run_id": "r1",
               "stages": {"catalog": {"in": 10, "out": 8, "dead": 2}}, "stage_seconds": {"catalog": 1.5},
               "dead_letters": {"catalog": {"duplicate_item_id": 2}},
               "summary": {"modality_coverage": {"text": 1.0, "image": 0.5},
                           "fusion_weights": {"text": {"edges": [0, 0.5, 1], "counts": [3, 5]}},
                           "scores": {"personal": {"edges": [-1, 0, 1], "counts": [1, 9]}},
                           "exposure": {"catalogue_coverage": 0.3125, "long_tail_share": 0.1667, "gini": 0.7321,
                                        "histogram": {"0": 7, "1": 2, "3": 1}, "head_threshold": 3},
                           "churn": {"mean": 0.4321, "users": 2},
                           "alignment": {"curves": {"final fit: loss": [3.0, 2.5]}, "fusion": "weighted"},
                           "samples": {"users": [{
                               "user_id": "u1", "history": [{"item_id": "a", "title": "Heat"}],
                               "recommendations": [{"item_id": "b", "title": "Ronin & co", "score": 0.9,
                                                    "contributions": {"text": 0.9}}]}],
                                       "thumbnails": {"b": "data:image/jpeg;base64,/9j/AA=="}}}}
    page = report.render(metrics)
    for text in ("Alerts", "Stages", "Dead letters by reason", "Modalities and fusion", "Alignment training",
                 "Recommendations", "Sample users", "0.3125", "0.1667", "0.7321", "0.4321", "duplicate_item_id",
                 "Heat", "Ronin &amp; co"):
        assert text in page, text
    assert page.count("<svg") == 8 and not any(ref in page for ref in ('href="http', "url(http"))  # offline
    assert page.count('src="') == page.count('<img src="data:image/jpeg;base64,/9j/AA=="') == 1
    assert report.render(metrics) == page  # the same figures draw the same page
    assert alerts.breaches(metrics, alerts.AlertConfig()) == []
    lines = alerts.breaches(metrics, alerts.AlertConfig(churn_above=0.4, coverage_below=0.5, dead_fraction_above=0.1))
    assert len(lines) == 3 and "churn 0.4321" in lines[0] and "coverage 0.3125" in lines[1] and "catalog" in lines[2]
