"""Record counts for the run report: each one is both a Beam counter and a value in ``metrics.json``.

Counts travel through the pipeline as ``(section, name, kind, n)`` tuples, so the run can write its own
report at the end on any runner, without a driver waiting on the job.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

TIMES = "times"  # section of (first, last) wall-clock seconds at which a stage's records passed


class _CountAndSpan(beam.CombineFn):
    """(n, first, last) of ``(1, time)`` tallies: the count, and when the first and the last record passed."""

    def create_accumulator(self) -> tuple:
        return 0, None, None

    def add_input(self, acc: tuple, t: float) -> tuple:  # once per counted record: kept to a few comparisons
        n, first, last = acc
        return n + 1, t if first is None or t < first else first, t if last is None or t > last else last

    def merge_accumulators(self, accs: Iterable[tuple]) -> tuple:
        accs = list(accs)
        firsts = [a[1] for a in accs if a[1] is not None]
        lasts = [a[2] for a in accs if a[2] is not None]
        return sum(a[0] for a in accs), min(firsts, default=None), max(lasts, default=None)

    def extract_output(self, acc: tuple) -> tuple:
        return acc


class Count(beam.PTransform):
    """Counts a PCollection into one ``(section, name, kind, n)`` tuple (n is 0 when it is empty), plus a
    ``(TIMES, "section/name", kind, [first, last])`` tuple when it is not."""

    def __init__(self, section: str, name: str, kind: str):
        super().__init__()
        self._key = (section, name, kind)

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        section, name, kind = self._key
        counter = Metrics.counter("mmfuse", f"{section}.{name}.{kind}")

        def tally(_: Any) -> float:
            counter.inc()
            return time.time()

        def tuples(acc: tuple):
            n, first, last = acc
            yield section, name, kind, n
            if n:
                yield TIMES, f"{section}/{name}", kind, [first, last]

        return (pcoll
                | "Tally" >> beam.Map(tally)
                | "Sum" >> beam.CombineGlobally(_CountAndSpan())
                | "Key" >> beam.FlatMap(tuples))


def count_stage(name: str, section: str = "stages", **pcolls) -> list:
    """Counts of one stage: ``count_stage("catalog", **{"in": rows, "out": items, "dead": dead})``."""
    return [pc | f"Count {section}/{name}/{kind}" >> Count(section, name, kind)
            for kind, pc in pcolls.items()]


def report(counts: Iterable[tuple]) -> dict:
    """Nest the count tuples into ``{section: {name: {kind: n}}}``; the stages' times become
    ``stage_seconds``: from the first record entering a stage to the last leaving it (stages overlap where
    a runner streams records from one to the next)."""
    out: dict = {}
    for section, name, kind, n in sorted(counts, key=lambda c: c[:3]):
        out.setdefault(section, {}).setdefault(name, {})[kind] = n
    times = out.pop(TIMES, {})
    seconds = {key.split("/", 1)[1]: round(max(t[1] for t in kinds.values()) - min(t[0] for t in kinds.values()), 3)
               for key, kinds in times.items() if key.startswith("stages/")}
    if seconds:
        out["stage_seconds"] = seconds
    return out


def unreconciled(stages: dict) -> list[str]:
    """Stages whose records in differ from records out plus dead letters."""
    return [f"{name}: in={c.get('in', 0)} out={c.get('out', 0)} dead={c.get('dead', 0)}"
            for name, c in sorted(stages.items())
            if c.get("in", 0) != c.get("out", 0) + c.get("dead", 0)]
