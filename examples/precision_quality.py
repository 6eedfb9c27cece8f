"""Does an encoder precision change recommendation quality? Content kNN on two encode runs, user by user.

    python -m examples.movielens_eval --work W32 --methods=text,image --precision=float32 --doc=none
    python -m examples.movielens_eval --work W16 --methods=text,image --precision=bfloat16 --doc=none
    python -m examples.precision_quality --data W32/data --base W32/run/2026-01-01 --other W16/run/2026-01-01

For each modality and split of docs/evaluation.md's protocol, each user's Recall@20 and NDCG@20 of content
kNN over the base run's vectors and over the other run's, and the mean of the per-user difference with its
standard error (paired: the same users rank the same items, so only the vectors differ), from the
protocol's own per-user figures (``models.evaluation.user_figures``). Content kNN has no fitted part, so
nothing but the vectors moves the figures.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from mmfuse.models import evaluation as ev
from mmfuse.pipelines import evaluate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the converted MovieLens (catalog/, interactions/)")
    parser.add_argument("--base", required=True, help="an encode run (e.g. float32)")
    parser.add_argument("--other", required=True, help="an encode run of the same catalog (e.g. bfloat16)")
    args = parser.parse_args(argv)
    runs = {name: evaluate.load(f"{args.data}/catalog", f"{args.data}/interactions", run)
            for name, run in (("base", args.base), ("other", args.other))}
    inter = runs["base"][0]
    train, test = ev.warm_split(inter)
    cold_train, cold_test, held_out = ev.cold_split(inter)
    print("| modality | split | metric | base | other | other - base | its standard error | users |")
    print("|---|---|---|--:|--:|--:|--:|--:|")
    for modality in runs["base"][1].features:
        for split in ("warm", "cold"):
            figures = {}
            for name, (_, catalog) in runs.items():
                fit = ev.ContentKNN(catalog.features[modality]).fit(train if split == "warm" else cold_train)
                figures[name] = (ev.user_figures(fit.score, test.matrix(), train.matrix())[0] if split == "warm"
                                 else ev.user_figures(fit.score, cold_test.matrix(), None, held_out)[0])
            for metric, key in (("R@20", "recall@20"), ("N@20", "ndcg@20")):
                base, other = figures["base"][key], figures["other"][key]
                diff = other - base
                print(f"| {modality} | {split} | {metric} | {base.mean():.4f} | {other.mean():.4f} "
                      f"| {diff.mean():+.4f} | {diff.std(ddof=1) / np.sqrt(len(diff)):.4f} | {len(diff)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
