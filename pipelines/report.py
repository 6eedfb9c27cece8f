"""A night's ``report.html``: one self-contained page (inline SVG plots, no network) drawn from the figures
the night wrote to ``metrics.json``, so the page and the file always agree.

Sections: stage counts and dead letters by reason, stage times, modality coverage and fusion weights,
alignment training, recommendation scores, catalogue coverage and the popularity of what is recommended,
churn against the previous night, and a few sample users with their history and recommendations by title
(with thumbnails, inline as data URIs, where the catalog names image files).
"""
from __future__ import annotations

import html
import io
import json
from typing import Any, Callable

REPORT = "report.html"
_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#2b2b2b}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.fig{display:inline-block;vertical-align:top;margin:.3em}
td img{height:2.4em;vertical-align:middle;margin-right:.4em}
.note{color:#6b6b6b}"""


def _svg(draw: Callable[[Any], None], width: float = 5.0, height: float = 2.8) -> str:
    """A matplotlib figure drawn by ``draw(ax)`` as inline SVG, byte-identical for identical figures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with matplotlib.rc_context({"svg.hashsalt": "mmfuse", "svg.fonttype": "none", "font.size": 9,
                                "text.parse_math": False}):  # a column named "$x$" is a name, not a formula
        fig, ax = plt.subplots(figsize=(width, height))
        try:
            draw(ax)
            fig.tight_layout()
            out = io.StringIO()
            fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
        finally:
            plt.close(fig)
    text = out.getvalue()
    text = text[text.index("<svg"):]
    if "<metadata>" in text:
        text = text[:text.index("<metadata>")] + text[text.index("</metadata>") + len("</metadata>"):]
    return f'<div class="fig">{text}</div>'


class _Html(str):
    """A table cell already written as HTML."""


def _cell(value: Any) -> str:
    return value if isinstance(value, _Html) else html.escape(str(value))


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    cells = "".join(f'<th class="l">{html.escape(h)}</th>' if i < left else f"<th>{html.escape(h)}</th>"
                    for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="l">{_cell(v)}</td>' if i < left else f"<td>{_cell(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _bars(labels: list[str], values: list[float], title: str, xlabel: str = ""):
    def draw(ax: Any) -> None:
        ax.barh(range(len(labels)), values, color="#4c78a8")
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.set_xlabel(xlabel)
    return draw


def _histogram(figure: dict, title: str, xlabel: str):
    def draw(ax: Any) -> None:
        edges, counts = figure["edges"], figure["counts"]
        ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge", color="#4c78a8")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
    return draw


def _lorenz(histogram: dict):
    def draw(ax: Any) -> None:
        items = shown = 0
        xs, ys = [0.0], [0.0]
        total_items, total = sum(histogram.values()), sum(int(k) * v for k, v in histogram.items())
        for value in sorted(histogram, key=int):
            items += histogram[value]
            shown += int(value) * histogram[value]
            xs.append(items / total_items)
            ys.append(shown / total if total else 0.0)
        ax.plot(xs, ys, color="#4c78a8", label="recommendations")
        ax.plot([0, 1], [0, 1], color="#9a9a9a", linestyle="--", label="equal exposure")
        ax.set_xlabel("share of catalogue items, least recommended first")
        ax.set_ylabel("share of recommendation slots")
        ax.set_title("Exposure (Lorenz curve)")
        ax.legend(loc="upper left")
    return draw


def _curves(metrics: dict):
    def draw(ax: Any) -> None:
        for name, values in sorted(metrics.items()):
            ax.plot(range(1, len(values) + 1), values, marker=".", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title("Alignment training")
        ax.legend()
    return draw


def render(metrics: dict) -> str:
    """The report page of one night's ``metrics.json`` contents (keys in sorted order, as the file has them,
    so the page depends on the figures alone)."""
    metrics = json.loads(json.dumps(metrics, sort_keys=True))
    s = metrics.get("summary", {})
    parts = [f"<h1>mmfuse night {html.escape(metrics.get('run_date', ''))}</h1>",
             f'<p class="note">run {html.escape(str(metrics.get("run_id", "")))}; every figure on this page is '
             f"in this folder's metrics.json.</p>"]

    parts.append("<h2>Alerts</h2>")
    parts.append(_table(["breached threshold"], [[a] for a in metrics.get("alerts", [])])
                 if metrics.get("alerts") else "<p>None.</p>")
    stages = metrics.get("stages", {})
    parts.append("<h2>Stages</h2>")
    parts.append(_table(["stage", "in", "out", "dead letters", "seconds"],
                        [[n, c.get("in", 0), c.get("out", 0), c.get("dead", 0),
                          metrics.get("stage_seconds", {}).get(n, "")] for n, c in stages.items()]))
    if stages:
        parts.append(_svg(_bars(list(stages), [c.get("out", 0) for c in stages.values()], "Records out per stage")))
    seconds = metrics.get("stage_seconds", {})
    if seconds:
        parts.append(_svg(_bars(list(seconds), list(seconds.values()), "Stage times", "seconds")))
    reasons = [(f"{stage}: {error}", n) for stage, errors in metrics.get("dead_letters", {}).items()
               for error, n in errors.items()]
    parts.append("<h2>Dead letters by reason</h2>")
    if reasons:
        parts.append(_svg(_bars([r for r, _ in reasons], [n for _, n in reasons], "Dead letters", "records")))
        parts.append(_table(["stage: reason", "records"], reasons))
    else:
        parts.append("<p>None.</p>")

    parts.append("<h2>Modalities and fusion</h2>")
    coverage = s.get("modality_coverage", {})
    if coverage:
        parts.append(_svg(_bars(list(coverage), list(coverage.values()), "Share of items with each modality")))
    for modality, figure in s.get("fusion_weights", {}).items():
        parts.append(_svg(_histogram(figure, f"Fusion weight of {modality}", "weight"), 3.6, 2.4))

    alignment = s.get("alignment", {})
    if alignment.get("curves"):
        parts.append("<h2>Alignment training</h2>")
        reused = metrics.get("alignment", {}).get("reused_from")
        if reused:
            parts.append(f'<p class="note">Reused from {html.escape(reused)}: these curves are that fit\'s.</p>')
        parts.append(_svg(_curves(alignment["curves"])))
        parts.append(_table(["figure", "value"], [[k, json.dumps(v)] for k, v in alignment.items() if k != "curves"]))

    parts.append("<h2>Recommendations</h2>")
    if "scores" in s:
        parts.append(_svg(_histogram(s["scores"]["personal"], "Scores of personal recommendations", "score")))
    exposure = s.get("exposure", {})
    if exposure:
        parts.append(_svg(_lorenz(exposure["histogram"])))
        parts.append(_table(["figure", "value"], [
            ["catalogue coverage (share of items recommended at least once)", exposure["catalogue_coverage"]],
            ["long-tail share (slots going to items outside the most-interacted fifth)", exposure["long_tail_share"]],
            ["exposure Gini (0: every item equally often)", exposure["gini"]]]))
    churn = s.get("churn")
    if churn is not None:
        parts.append(_table(["figure", "value"], [
            ["churn against the previous night (mean share of a user's recommendations that are new)",
             churn.get("mean", "no user recommended both nights")],
            ["users recommended both nights", churn.get("users", 0)]]))
    elif exposure:
        parts.append("<p>Churn: no previous night with recommendations.</p>")

    users = s.get("samples", {}).get("users", [])
    if users:
        thumbnails = s["samples"].get("thumbnails", {})

        def item(entry: dict) -> _Html:
            image = thumbnails.get(entry["item_id"])
            picture = f'<img src="{html.escape(image)}" alt=""> ' if image and image.startswith("data:image/") else ""
            return _Html(picture + html.escape(entry["title"] or entry["item_id"]))
        parts.append("<h2>Sample users</h2>")
        for user in users:
            parts.append(f"<h3>{html.escape(user['user_id'])}</h3>")
            parts.append(_table(["latest history"], [[item(h)] for h in user["history"]]))
            parts.append(_table(["recommended", "score", "contributions"],
                                [[item(r), r["score"], ", ".join(f"{m} {c:.3f}" for m, c in r["contributions"].items())]
                                 for r in user["recommendations"]]))
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>mmfuse {html.escape(metrics.get("run_date", ""))}'
            f"</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
