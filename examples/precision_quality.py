"""Does an encoder precision change recommendation quality? Content kNN on two encode runs, user by user.

    python -m examples.movielens_eval --work W32 --methods=text,image --precision=float32 --doc=none
    python -m examples.movielens_eval --work W16 --methods=text,image --precision=bfloat16 --doc=none
    python -m examples.precision_quality --data W32/data --base W32/run/2026-01-01 --other W16/run/2026-01-01

For each modality and split of docs/evaluation.md's protocol, each user's Recall@20 and NDCG@20 of content
kNN over the base run's vectors and over the other run's, and the mean of the per-user difference with its
standard error (paired: the same users rank the same items, so only the vectors differ). Content kNN has no
fitted part, so nothing but the vectors moves the figures. Each mean is checked against the protocol's own
scorer (``models.evaluation``) before it is printed.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import scipy.sparse as sp

from mmfuse.models import evaluation as ev
from mmfuse.pipelines import evaluate

K = 20


def per_user(scores: np.ndarray, truth: sp.csr_matrix, seen: sp.csr_matrix | None,
             columns: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Recall@K and NDCG@K of each user with test items, as the protocol defines them."""
    if columns is not None:
        truth, scores = truth[:, columns], scores[:, columns]
    users = np.flatnonzero(np.diff(truth.indptr))
    scores = np.array(scores[users], np.float32)
    if seen is not None:
        rows, cols = seen[users].nonzero()
        scores[rows, cols] = -np.inf
    top = ev._top_k(scores, K)
    relevant = truth[users].toarray() > 0
    hits = np.take_along_axis(relevant, top, 1) & (np.take_along_axis(scores, top, 1) > -np.inf)
    discount = 1.0 / np.log2(np.arange(2, K + 2))
    n = relevant.sum(1)
    return hits.sum(1) / n, (hits @ discount) / np.cumsum(discount)[np.minimum(n, K) - 1]


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
                scores = fit.score(np.arange(inter.n_users))
                if split == "warm":
                    figures[name] = per_user(scores, test.matrix(), train.matrix(), None)
                    protocol = ev.evaluate(scores, train, test)
                else:
                    figures[name] = per_user(scores, cold_test.matrix(), None, held_out)
                    protocol = ev.evaluate_cold(scores, cold_test, held_out)
                for metric, values in zip(("recall@20", "ndcg@20"), figures[name]):
                    assert abs(values.mean() - protocol[metric]) < 1e-9, (metric, values.mean(), protocol[metric])
            for i, metric in enumerate(("R@20", "N@20")):
                base, other = figures["base"][i], figures["other"][i]
                diff = other - base
                print(f"| {modality} | {split} | {metric} | {base.mean():.4f} | {other.mean():.4f} "
                      f"| {diff.mean():+.4f} | {diff.std(ddof=1) / np.sqrt(len(diff)):.4f} | {len(diff)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
