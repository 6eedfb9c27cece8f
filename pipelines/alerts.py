"""Alert thresholds a scheduler can act on: a breached one is written to ``metrics.json`` (``alerts``),
printed as one line, and makes the job exit with ALERT_EXIT, while the night itself is complete."""
from __future__ import annotations

import dataclasses

ALERT_EXIT = 4


@dataclasses.dataclass(frozen=True)
class AlertConfig:
    churn_above: float | None = None  # mean share of a user's recommendations new tonight
    coverage_below: float | None = None  # share of the catalogue recommended at least once
    dead_fraction_above: float | None = None  # dead letters / records in, per stage


def breaches(metrics: dict, alert: AlertConfig) -> list[str]:
    """One line per breached threshold, from a night's ``metrics.json`` figures."""
    out = []
    summary = metrics.get("summary", {})
    churn = summary.get("churn", {}).get("mean")
    if alert.churn_above is not None and churn is not None and churn > alert.churn_above:
        out.append(f"churn {churn:.4f} is above --alert_churn_above={alert.churn_above}")
    coverage = summary.get("exposure", {}).get("catalogue_coverage")
    if alert.coverage_below is not None and coverage is not None and coverage < alert.coverage_below:
        out.append(f"catalogue coverage {coverage:.4f} is below --alert_coverage_below={alert.coverage_below}")
    if alert.dead_fraction_above is not None:
        for stage, c in sorted(metrics.get("stages", {}).items()):
            fraction = c.get("dead", 0) / c["in"] if c.get("in") else 0.0
            if fraction > alert.dead_fraction_above:
                out.append(f"stage {stage} dead-lettered {fraction:.4f} of its records, above "
                           f"--alert_dead_fraction_above={alert.dead_fraction_above}")
    return out
