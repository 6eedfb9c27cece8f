"""What moving data between stages costs on the multi-process local runner (the top-k benchmark's runner).

    .venv/bin/python -m bench.runner_cost                # 26 elements of 3 MB each way, 2 SDK workers

Each way runs the same pipeline (26 numpy blocks made on the workers, then counted), once with the blocks
counted where they are made and once with them crossing the runner: through a ``GroupByKey``, a
``Flatten`` or as a side input. The difference, per MB, is what a stage boundary costs a job such as
``transforms.topk.TopK``, whose items, users and rankings cross it. Prints one line per way.
"""
from __future__ import annotations

import argparse
import sys
import time

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from mmfuse import runners


def run(way: str, n: int, mb: float, workers: int) -> float:
    def block(i):
        return i % 13, np.ones(int(mb * 2**20 / 4), np.float32)

    flags = ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    start = time.perf_counter()
    with runners.create_pipeline(PipelineOptions(flags)) as p:
        blocks = p | "Seeds" >> beam.Create(range(n)) | "Spread" >> beam.Reshuffle() | "Make" >> beam.Map(block)
        if way == "group_by_key":
            sizes = blocks | beam.GroupByKey() | beam.Map(lambda kv: sum(len(v) for v in kv[1]))
        elif way == "flatten":
            sizes = (blocks, p | "Nothing" >> beam.Create([])) | beam.Flatten() | beam.Map(lambda kv: len(kv[1]))
        elif way == "side_input":
            sizes = (p | "One" >> beam.Create([0])
                     | beam.Map(lambda _, side: sum(len(v) for v in side[0]), beam.pvalue.AsMultiMap(blocks)))
        else:
            sizes = blocks | beam.Map(lambda kv: len(kv[1]))
        _ = sizes | beam.combiners.Count.Globally()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=26)
    parser.add_argument("--mb", type=float, default=3.0, help="MB per block")
    parser.add_argument("--workers", type=int, default=2)
    a = parser.parse_args(argv)
    base = run("in_place", a.blocks, a.mb, a.workers)
    print(f"in place: {base:.2f} s", flush=True)
    for way in ("group_by_key", "flatten", "side_input"):
        seconds = run(way, a.blocks, a.mb, a.workers)
        extra = seconds - base
        print(f"{way}: {seconds:.2f} s, +{extra:.2f} s for {a.blocks * a.mb:.0f} MB "
              f"({1000 * extra / (a.blocks * a.mb):.0f} ms per MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
