"""How each engine is configured. Pipelines never name a runner; ``create_pipeline`` picks it from options.

``runners.dataflow`` and ``runners.portable`` (Flink) build the options of the production engines; other
runner names go to Beam as given.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from mmfuse.runners import local


def create_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A pipeline on the runner the options name; local names (or none) mean the FnApiRunner."""
    name = options.view_as(StandardOptions).runner
    runner = local.runner() if local.is_local(name) else name
    return beam.Pipeline(runner=runner, options=options)
