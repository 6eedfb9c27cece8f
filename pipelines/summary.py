"""The night's summary figures (``transforms.summary``) wired to its outputs, for ``metrics.json`` and
``report.html``. Each figure's combiner holds a bounded state (see ``transforms.summary``)."""
from __future__ import annotations

import json
import posixpath

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from mmfuse.pipelines.config import Config
from mmfuse.pipelines.job import Job
from mmfuse.transforms import summary
from mmfuse.transforms.media import FetchMedia
from mmfuse.transforms.parquet import ReadRows, plan
from mmfuse.transforms.runs import has_dataset

SAMPLE_USERS, SAMPLE_HISTORY = 5, 5


def _title(columns: tuple[str, ...]):
    def title(kv: tuple) -> str:
        text = kv[1].get("text") or {}
        value = next((text[c] for c in columns if text.get(c)), "")
        return ", ".join(value) if isinstance(value, list) else str(value)
    return title


def _alignment_figures(folder: str) -> list[tuple]:
    """Training curves and the choices of the fitted alignment (``alignment.json``: a few KiB)."""
    with FileSystems.open(posixpath.join(folder, "alignment.json")) as f:
        meta = json.load(f)
    metrics, config = meta.get("metrics", {}), meta.get("config", {})
    probe = metrics.get("probe", {})
    curves = {name: values for name, values in (("validation fit: loss", probe.get("loss")),
                                                ("validation fit: validation loss", probe.get("val_loss")),
                                                ("final fit: loss", metrics.get("loss"))) if values}
    out = [(summary.SECTION, "alignment", "kind", meta.get("kind")),
           (summary.SECTION, "alignment", "curves", curves)]
    for key in ("fusion", "fusion_weights", "cf_beta", "dim"):
        if key in config:
            out.append((summary.SECTION, "alignment", key, config[key]))
    if "fit" in metrics:  # the sample's size (its seconds vary from run to run: stage_seconds has the time)
        out.append((summary.SECTION, "alignment", "fit", {k: v for k, v in metrics["fit"].items() if k != "seconds"}))
    return out


def summarize(job: Job, config: Config, catalog: beam.PCollection, items: beam.PCollection,
              interactions: beam.PCollection, ranked: dict, artifact: beam.PCollection,
              encoded: list[str]) -> None:
    """Figures of tonight's items (modality coverage, fusion weights), recommendations (scores, exposure,
    churn against the previous complete night), alignment (``artifact``: its folder) and sample users
    (with poster thumbnails where ``encoded``, the modalities tonight encodes, has images)."""
    n_items = beam.pvalue.AsSingleton(items | "SummaryItems" >> beam.combiners.Count.Globally())
    coverage = (items
                | "Modalities" >> beam.FlatMap(lambda i: [(m, 1) for m in i["weights"]])
                | "PerModality" >> beam.CombinePerKey(sum)
                | "Coverage" >> beam.Map(lambda kv, n: (summary.SECTION, "modality_coverage", kv[0],
                                                         round(kv[1] / n, 6) if n else 0.0), n_items))
    weights = items | "FusionWeights" >> summary.Histograms(
        "fusion_weights", lambda i: list(i["weights"].items()), 0.0, 1.0, 20)
    scores = ranked["personal"] | "Scores" >> summary.Histograms(
        "scores", lambda qr: [("personal", float(s)) for s in qr[1].scores], -1.0, 1.0, 40)
    exposure = ({"ranked": ranked["all"], "items": items, "interactions": interactions}
                | "Exposure" >> summary.Exposure())
    # Thumbnails only where the night encodes images: the encode stage has then read (and counted) the
    # same files, and a night told to leave images out does not read them for its report.
    images = (FetchMedia("image", config.run.max_media_bytes, config.run.media_roots)
              if "image" in encoded else None)
    samples = ({"ranked": ranked["all"], "interactions": interactions, "catalog": catalog}
               | "Samples" >> summary.Samples(SAMPLE_USERS, SAMPLE_HISTORY, _title(config.catalog.text), images))
    alignment = artifact | "AlignmentFigures" >> beam.FlatMap(_alignment_figures)
    figures = [coverage, weights, scores, exposure, samples, alignment]
    previous = job.report.get("previous")  # the night the encode stage built on: one decision for the run
    if previous and has_dataset(previous, "recommendations"):
        work, _ = plan(posixpath.join(previous, "recommendations"), lambda f, c: None)
        before = (job.pipeline
                  | "ReadPreviousRecommendations" >> ReadRows(work, ["user_id", "item_id"])
                  | "PreviousPairs" >> beam.Map(lambda sr: (sr[1]["user_id"], sr[1]["item_id"])))
        figures.append({"tonight": ranked["all"], "before": before} | "Churn" >> summary.Churn())
    job.figures(figures)
