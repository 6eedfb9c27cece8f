"""Record counts for the run report: each one is both a Beam counter and a value in ``metrics.json``.

Counts travel through the pipeline as ``(section, name, kind, n)`` tuples, so the run can write its own
report at the end on any runner, without a driver waiting on the job.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics


class Count(beam.PTransform):
    """Counts a PCollection into one ``(section, name, kind, n)`` tuple (n is 0 when it is empty)."""

    def __init__(self, section: str, name: str, kind: str):
        super().__init__()
        self._key = (section, name, kind)

    def expand(self, pcoll):
        section, name, kind = self._key
        counter = Metrics.counter("mmfuse", f"{section}.{name}.{kind}")

        def tally(_):
            counter.inc()
            return 1

        return (pcoll
                | "Tally" >> beam.Map(tally)
                | "Sum" >> beam.CombineGlobally(sum)
                | "Key" >> beam.Map(lambda n: (section, name, kind, n)))


def count_stage(name: str, section: str = "stages", **pcolls) -> list:
    """Counts of one stage: ``count_stage("catalog", **{"in": rows, "out": items, "dead": dead})``."""
    return [pc | f"Count {section}/{name}/{kind}" >> Count(section, name, kind)
            for kind, pc in pcolls.items()]


def report(counts) -> dict:
    """Nest the count tuples into ``{section: {name: {kind: n}}}``."""
    out: dict = {}
    for section, name, kind, n in sorted(counts):
        out.setdefault(section, {}).setdefault(name, {})[kind] = n
    return out


def unreconciled(stages: dict) -> list[str]:
    """Stages whose records in differ from records out plus dead letters."""
    return [f"{name}: in={c.get('in', 0)} out={c.get('out', 0)} dead={c.get('dead', 0)}"
            for name, c in sorted(stages.items())
            if c.get("in", 0) != c.get("out", 0) + c.get("dead", 0)]
