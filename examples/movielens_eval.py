"""The MovieLens results table of docs/evaluation.md, in one command: convert, encode, evaluate every method.

    python -m examples.movielens_eval [--movielens PATH/TO/movielens] [--work DIR] [--methods ...]

Follows docs/evaluation.md: the 2,947 movies with posters, text "title | genres | tags" and the
poster, warm (temporal) and cold-item splits. The encode run is kept under --work and reused when complete.
Rewrites the section of docs/evaluation.md between the movielens-results markers and writes
evaluation.json/.md to --work.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path

from examples import datasets, movielens
from examples.sections import replace_section
from mmfuse.pipelines import encode, evaluate
from mmfuse.runners import process
from mmfuse.transforms.runs import is_complete

RUN_DATE = "2026-01-01"


def main(argv: list[str] | None = None) -> int:
    process.prepare()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--movielens", help="holds ml-latest-small/ and posters/ (default: $MMFUSE_DATA/movielens)")
    parser.add_argument("--work", default="demo/movielens-eval", help="where the converted data and runs go")
    parser.add_argument("--methods", default="all", help="as mmfuse evaluate's")
    parser.add_argument("--doc", default="docs/evaluation.md",
                        help="whose movielens-results section is rewritten ('none': no page)")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                        help="the text and image encoders' precision (mmfuse encode --precision)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    paths = movielens.convert(args.movielens or datasets.root() / "movielens", work / "data", posters_only=True)
    run = work / "run" / RUN_DATE
    if not is_complete(str(run)):
        assert encode.main([f"--catalog={paths['catalog']}", f"--output={work / 'run'}", f"--run_date={RUN_DATE}",
                            f"--media_roots={paths['media']}",
                            "--modalities=text,image", "--previous=none", f"--precision={args.precision}"]) == 0
    code = evaluate.main([f"--catalog={paths['catalog']}", f"--interactions={paths['interactions']}",
                          f"--embeddings={run}", f"--output={work}", f"--methods={args.methods}"])
    if code == 0 and args.doc != "none":
        command = shlex.join(["python", "-m", "examples.movielens_eval", *(argv if argv is not None else sys.argv[1:])])
        body = ((work / "evaluation.md").read_text()
                + f"\nProduced by `{command}` on {datetime.date.today().isoformat()} ({os.cpu_count()} shared CPU "
                  "cores; s = fit and scoring seconds, both splits). R = Recall, N = NDCG (binary relevance).")
        replace_section(Path(args.doc), "movielens-results", body)
    return code


if __name__ == "__main__":
    sys.exit(main())
