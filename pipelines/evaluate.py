"""``mmfuse evaluate``: the protocol of docs/evaluation.md on any data in the contract.

    mmfuse evaluate --run=ROOT/<date> --holdout=PATH --output=DIR
    mmfuse evaluate --catalog=PATH --interactions=PATH --embeddings=RUN_DIR --output=DIR [--methods=...]

With ``--run``, scores what that night wrote (its ``recommendations``) against held-out interactions (e.g.
those that came after it), with the protocol's metrics, per user-activity segment and (given the night's
``--interactions``) per item-popularity segment, and the night's exposure figures: quality tracked night over
night. Otherwise:

Reads an encode run's ``embeddings`` (every modality it holds) and the interactions, makes the warm
(temporal) and cold-item splits, fits every method on the training side only (hyper-parameters and early
stopping on the validation split carved from training; the fits run in worker processes, both splits at
once) and writes ``evaluation.json`` and ``evaluation.md``
to ``--output``. User vector of every personalised content method: the mean of the user's training item
vectors, cosine scores; two non-personalised content baselines (``prior``, ``popularity_regressor``) show
what personalisation adds. Column options name the columns as the nightly job's do.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from mmfuse.models import evaluation as ev
from mmfuse.models.catalog import Catalog
from mmfuse.pipelines.cli import incomplete
from mmfuse.runners import process
from mmfuse.transforms.contract import CatalogColumns, InteractionColumns
from mmfuse.transforms.parquet import read_dataset
from mmfuse.transforms.summary import head_threshold

if TYPE_CHECKING:  # Keras loads in the functions that fit, in the fit workers
    from mmfuse.models import align
    from mmfuse.models.pca import PcaAligner

BASELINES = ("popular", "item_knn", "als", "random")
FUSED = ("concat", "pca", "contrastive_mean", "contrastive_attention", "contrastive_cf", "prior",
         "popularity_regressor")
ABLATIONS = ("pca", "contrastive_mean", "contrastive_attention")  # run on request: each is a fit per split
DEFAULT = "contrastive_cf"  # the nightly job's defaults; ``prior`` scores its vectors without personalisation
COLD_ID_ONLY = ("popular", "item_knn", "als")  # cannot score items without interactions
CONTRACT = InteractionColumns()


def methods_for(modalities: Sequence[str]) -> tuple[str, ...]:
    """Every method the comparison can run over these modalities: one content kNN per modality among them."""
    return (*BASELINES, *modalities, *FUSED)


def default_methods(modalities: Sequence[str]) -> tuple[str, ...]:
    """The comparison without the ablations: the baselines, the nightly default and what it is made of."""
    return tuple(m for m in methods_for(modalities) if m not in ABLATIONS)


@dataclasses.dataclass
class Split:
    train: ev.Interactions
    fit: ev.Interactions
    val: ev.Interactions
    score: Callable  # (scorer) -> metrics
    held_out: np.ndarray | None = None  # items hidden from fitting (cold split)


def load(catalog: str, interactions: str, embeddings: str, item_id: str = "item_id",
         columns: InteractionColumns = CONTRACT) -> tuple[ev.Interactions, Catalog]:
    """Interactions on the catalog's items (catalog order, so time ties break by it) and the vectors of every
    modality the embeddings hold. ``item_id`` and ``columns`` name the columns, as the nightly job's options do."""
    items = [str(i) for i in pq.read_table(catalog, columns=[item_id])[item_id].to_pylist()]
    table = pq.read_table(interactions)
    named = {"user_id": columns.user_id, "item_id": columns.item_id, "timestamp": columns.timestamp,
             "weight": columns.weight}
    named = {contract: column for contract, column in named.items() if column in table.column_names}
    table = table.select(list(named.values())).rename_columns(list(named))
    inter = ev.Interactions.from_table(table, items)
    vectors = read_dataset(embeddings, "embeddings")
    ids = vectors["item_id"].to_pylist()
    features = {}
    for m in vectors.column_names:
        if m == "item_id" or not pa.types.is_list(vectors.schema.field(m).type):
            continue
        rows = vectors[m].to_pylist()
        present = next((r for r in rows if r is not None), None)
        if present is not None:
            features[m] = inter.align(ids, np.array([r if r is not None else [np.nan] * len(present)
                                                     for r in rows], np.float32))
    return inter, Catalog(inter.item_ids, features)


def _arrays(x: ev.Interactions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return x.user, x.item, x.timestamp


def fit_alignment(known: Catalog, catalog: Catalog, split: Split,
                  config: align.AlignConfig) -> tuple[np.ndarray, dict]:
    """Fitted on the split's training side (``known`` hides the cold split's held-out items), then applied
    to the whole ``catalog``."""
    from mmfuse.models import align
    fitted = align.fit_and_refit(known, _arrays(split.fit), _arrays(split.val), config)
    return applied(fitted, catalog, split, {"epochs": fitted.metrics["epochs"],
                                            "val_loss": round(fitted.metrics["best_val_loss"], 4),
                                            "chosen": {"dim": fitted.config.dim, "cf_beta": fitted.config.cf_beta,
                                                       "fusion": fitted.config.fusion,
                                                       "fusion_weights": fitted.config.fusion_weights,
                                                       "validation": fitted.metrics.get("chosen_on_validation")}})


def applied(fitted: align.Aligner | PcaAligner, catalog: Catalog, split: Split,
            details: dict) -> tuple[np.ndarray, dict]:
    """The fused vectors of a fitted alignment over ``catalog``. On the cold split, also text-to-image
    retrieval among the held-out items, which the fit never saw: evidence that the modalities share a space."""
    out = fitted.apply(catalog.item_ids, catalog.features)
    if split.held_out is not None and {"text", "image"} <= set(fitted.modalities):
        t, i = fitted.modalities.index("text"), fitted.modalities.index("image")
        rows = split.held_out[(out["mask"][split.held_out][:, [t, i]] > 0).all(1)]
        details = {**details, "text_to_image": ev.cross_modal_recall(out["aligned"][rows, t], out["aligned"][rows, i])}
    return out["fused"], details


def content_vectors(method: str, known: Catalog, catalog: Catalog, split: Split,
                    seed: int, epochs: int = 40) -> tuple[np.ndarray, dict]:
    """Vectors of every catalog item for a content method fitted on what ``known`` shows."""
    f = catalog.features
    if method in f:
        return f[method], {}
    if method == "concat":
        unit = [np.nan_to_num(v / np.linalg.norm(v, axis=1, keepdims=True)) for v in f.values()]
        vectors = np.concatenate(unit, 1)
        vectors[catalog.present().sum(1) == 0] = np.nan
        return vectors, {}
    if method == "pca":
        from mmfuse.transforms.pca import fit_in_memory
        return applied(fit_in_memory(known, dim=64), catalog, split, {})
    from mmfuse.models import align
    return fit_alignment(known, catalog, split, align.AlignConfig(**CONFIGS[method], seed=seed, epochs=epochs))


CONFIGS = {  # the contrastive methods; DEFAULT is the nightly job's
    "contrastive_mean": {"fusion": "mean", "collaborative": False},
    "contrastive_attention": {"fusion": "attention", "collaborative": False},
    "contrastive_cf": {},
}
FITTED = ("pca", *CONFIGS)


def run(inter: ev.Interactions, catalog: Catalog, methods: Sequence[str] | None = None, seed: int = 0,
        log: Callable[[str], None] = print, epochs: int = 40, processes: int = 2, verbose: bool = False) -> dict:
    """Every method (default: all that apply to the catalog's modalities) on both splits; contrastive fits
    train at most ``epochs``. Every fit of both splits starts at once, in ``processes`` worker processes
    (each fit is seeded, so where it runs does not change it); the rest runs here, in order, without Keras."""
    methods = methods_for(tuple(catalog.features)) if methods is None else methods
    train, test = ev.warm_split(inter)
    fit, val = ev.validation_split(train)
    cold_train, cold_test, held_out = ev.cold_split(inter, seed)
    cold_fit, cold_val = ev.validation_split(cold_train)
    hidden = np.zeros(inter.n_items, bool)
    hidden[held_out] = True
    cold_catalog = Catalog(catalog.item_ids, {m: np.where(hidden[:, None], np.nan, v)
                                                    for m, v in catalog.features.items()})
    splits = {
        "warm": (Split(train, fit, val, lambda s: ev.evaluate(s, train, test)), catalog),
        "cold": (Split(cold_train, cold_fit, cold_val, lambda s: ev.evaluate_cold(s, cold_test, held_out),
                       held_out), cold_catalog),
    }
    results = {"warm": {}, "cold": {}, "details": {},
               "sizes": {"users": inter.n_users, "items": inter.n_items, "interactions": len(inter),
                         "warm_train": len(train), "warm_test": len(test), "cold_train": len(cold_train),
                         "cold_test": len(cold_test), "cold_items": len(held_out)}, "seed": seed}
    fitted = {*(m for m in methods if m in FITTED), *([DEFAULT] if "prior" in methods else [])}
    context = multiprocessing.get_context("spawn")  # a fork would copy this process's TensorFlow state
    threads = max(1, len(os.sched_getaffinity(0)) // processes)
    with ProcessPoolExecutor(processes, context, initializer=_worker, initargs=(verbose, threads)) as pool:
        vectors = {name: {method: pool.submit(_timed, method, split_catalog, catalog,
                                              dataclasses.replace(split, score=None), seed, epochs)
                          for method in sorted(fitted)}
                   for name, (split, split_catalog) in splits.items()}
        for name, (split, split_catalog) in splits.items():
            _score_split(name, split, split_catalog, _Fitted(split, split_catalog, catalog, seed, vectors[name]),
                         methods, seed, results, log)
    return results


def _worker(verbose: bool, threads: int) -> None:
    """A fit worker: quiet, and on its share of the cores (TensorFlow reads the thread counts when it loads,
    after this), so that the workers' thread pools do not crowd each other out."""
    os.environ["TF_NUM_INTRAOP_THREADS"] = os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)
    process.quiet_console(verbose)


def _score_split(name: str, split: Split, split_catalog: Catalog, vectors: _Fitted, methods: Sequence[str],
                 seed: int, results: dict, log: Callable[[str], None]) -> None:
    """Every method on one split, in order, into ``results``."""
    for method in methods:
        if name == "cold" and method in COLD_ID_ONLY:
            continue
        fit_seconds = vectors.ready(method)
        start = time.perf_counter()
        details = {}
        if method == "popular":
            model = ev.MostPopular()
        elif method == "item_knn":
            model = ev.ItemKNN()
        elif method == "als":
            best, _ = ev.tune(split.fit, split.val, seed=seed)
            model, details = ev.ALS(**best, seed=seed), {"params": best}
        elif method == "random":
            model = ev.Random(seed)
        elif method == "prior":
            model, details = ev.ContentPrior(vectors[DEFAULT][0]), {"vectors": DEFAULT}
        elif method == "popularity_regressor":
            known = split_catalog.present().any(1)
            penalty = ev.PopularityRegressor.tune_penalty(vectors["concat"][0], known, split.fit, split.val)
            model, details = ev.PopularityRegressor(vectors["concat"][0], known, penalty), {"penalty": penalty}
        else:
            features, details = vectors[method]
            model = ev.ContentKNN(features)
        metrics = split.score(model.fit(split.train).score)
        results[name][method] = metrics
        seconds = fit_seconds + time.perf_counter() - start
        results["details"][f"{name}/{method}"] = {**details, "seconds": round(seconds, 1)}
        log(f"{name:4s} {method:22s} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            + f"  ({results['details'][f'{name}/{method}']['seconds']} s)")


class _Fitted(dict):
    """Content vectors by method for one split, each made once (the prior scores the default's), fits from
    the worker processes. On the cold split they are fitted without the held-out items and applied to their
    content to score them."""

    def __init__(self, split: Split, known: Catalog, catalog: Catalog, seed: int,
                 fits: dict[str, Future]):
        super().__init__()
        self._args, self._fits, self._seconds = (known, catalog, split, seed), fits, {}

    def ready(self, method: str) -> float:
        """Waits for ``method``'s fit, if it has one: the seconds it took in its process."""
        if method in self._fits and method not in self:
            self[method], self._seconds[method] = self._fits[method].result()
        return self._seconds.get(method, 0.0)

    def __missing__(self, method: str) -> tuple[np.ndarray, dict]:
        if method in self._fits:
            self.ready(method)
        else:
            self[method] = content_vectors(method, *self._args)
        return self[method]


def _timed(method: str, *args) -> tuple[tuple[np.ndarray, dict], float]:
    start = time.perf_counter()
    return content_vectors(method, *args), time.perf_counter() - start


LABELS = {"popular": "most popular", "item_knn": "item-kNN (cosine, 100 neighbours)",
          "als": "ALS (implicit, tuned on validation)", "random": "random",
          "concat": "fused, no alignment (normalised, concatenated)",
          "pca": "PCA alignment (tf.Transform), mean fusion", "contrastive_mean": "contrastive alignment, mean fusion",
          "contrastive_attention": "contrastive alignment, attention fusion",
          "contrastive_cf": "contrastive + collaborative modality (nightly default: dim, cf tilt and fusion "
                            "chosen on validation)",
          "prior": "content prior: the nightly default's vectors, one mean user for everyone",
          "popularity_regressor": "content to popularity (ridge on the concatenated vectors), same for everyone"}


def label(method: str) -> str:
    return LABELS.get(method, f"content kNN: {method}")


def markdown(results: dict) -> str:
    """The results as a Markdown table: one row per method, warm and cold columns side by side."""
    s = results["sizes"]
    lines = [f"Users {s['users']}, items {s['items']}, interactions {s['interactions']}; warm split: "
             f"{s['warm_train']} train / {s['warm_test']} test; cold split: {s['cold_items']} held-out items, "
             f"{s['cold_test']} test interactions. Seed {results['seed']}.", "",
             "| method | warm R@10 | warm R@20 | warm N@10 | warm N@20 | warm cov@20 | cold R@20 | cold N@20 | s |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for method in dict.fromkeys([*results["warm"], *results["cold"]]):
        warm, cold = results["warm"].get(method), results["cold"].get(method)
        cells = ([f"{warm[k]:.3f}" for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "coverage@20")]
                 if warm else ["-"] * 5)
        cells += [f"{cold[k]:.3f}" for k in ("recall@20", "ndcg@20")] if cold else ["n/a"] * 2
        seconds = sum(results["details"].get(f"{split}/{method}", {}).get("seconds", 0) for split in ("warm", "cold"))
        lines.append(f"| {label(method)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    retrieval = [(method, d["text_to_image"]) for method in results["cold"]
                 if "text_to_image" in (d := results["details"].get(f"cold/{method}", {}))]
    if retrieval:
        r = retrieval[0][1]
        lines += ["", f"Cross-modal retrieval on the cold split's {r['items']} held-out items (never seen by the "
                      f"fit): how often an item's text vector finds its own poster in the top 10 of them "
                      f"(chance {r['chance']:.3f}).", "", "| alignment | text-to-poster R@10 |", "|---|--:|"]
        lines += [f"| {label(method)} | {r['recall@10']:.3f} |" for method, r in retrieval]
    return "\n".join(lines) + "\n"


SEGMENTS = ("light", "medium", "heavy")  # users by how many interactions built their vector, in thirds


POPULARITY = ("head", "tail", "unseen")  # items by the night's interactions: the head as in the run report


def score_run(run_dir: str, holdout: str, columns: InteractionColumns = CONTRACT,
              interactions: str | None = None) -> dict:
    """A night's own recommendations scored against the held-out interactions of ``holdout`` (Parquet), on
    the night's catalogue items, overall and per user-activity segment; with ``interactions`` (what the night
    read), per item-popularity segment too. Holds the night's lists (users x k ids) and the held-out pairs."""
    lists: dict[str, list[str]] = {}
    recs = read_dataset(run_dir, "recommendations", ["user_id", "rank", "item_id"])
    recs = recs.sort_by([("user_id", "ascending"), ("rank", "ascending")])
    for user, item in zip(recs["user_id"].to_pylist(), recs["item_id"].to_pylist()):
        lists.setdefault(user, []).append(item)
    catalogue = set(read_dataset(run_dir, "items", ["item_id"])["item_id"].to_pylist())
    table = pq.read_table(holdout, columns=[columns.user_id, columns.item_id])
    held: dict[str, set[str]] = {}
    for user, item in zip(table[columns.user_id].to_pylist(), table[columns.item_id].to_pylist()):
        if str(item) in catalogue:
            held.setdefault(str(user), set()).add(str(item))
    users = read_dataset(run_dir, "users", ["user_id", "n_interactions"])
    activity = dict(zip(users["user_id"].to_pylist(), users["n_interactions"].to_pylist()))
    scored = sorted(u for u in held if u in activity)  # users the night knew: others had nothing to go on
    result = {"run": run_dir, "holdout": holdout, "items": len(catalogue),
              "overall": ev.score_lists(lists, {u: held[u] for u in scored}, len(catalogue))}
    if scored:
        cuts = np.quantile([activity[u] for u in scored], [1 / 3, 2 / 3])
        segment = {u: SEGMENTS[int(np.searchsorted(cuts, activity[u], side="right"))] for u in scored}
        result["by_activity"] = {name: ev.score_lists(lists, {u: held[u] for u in scored if segment[u] == name},
                                                      len(catalogue)) for name in SEGMENTS}
        result["activity_cuts"] = [float(c) for c in cuts]
    if interactions:
        segment_of = _popularity_segments(catalogue, interactions, columns.item_id)
        result["by_popularity"] = {name: ev.score_lists(
            lists, {u: {i for i in held[u] if segment_of[i] == name} for u in scored}, len(catalogue))
            for name in POPULARITY}
        result["popularity_items"] = {name: sum(s == name for s in segment_of.values()) for name in POPULARITY}
    with FileSystems.open(f"{run_dir.rstrip('/')}/metrics.json") as f:
        summary = json.load(f).get("summary", {})
    result["exposure"] = {k: v for k, v in summary.get("exposure", {}).items() if k != "histogram"}
    return result


def _popularity_segments(catalogue: set[str], interactions: str, item_column: str) -> dict[str, str]:
    """Each catalogue item's popularity segment by its count in ``interactions``: ``head`` (the most
    interacted fifth of the catalogue, as the run report counts it), ``tail`` (the other items with
    interactions) or ``unseen`` (none: cold items)."""
    items = pq.read_table(interactions, columns=[item_column])[item_column]
    counts = dict.fromkeys(catalogue, 0)
    for item, n in zip(*(c.to_pylist() for c in pc.value_counts(items.cast(pa.string())).flatten())):
        if item in counts:
            counts[item] = n
    threshold = head_threshold(collections.Counter(counts.values()))
    return {item: "unseen" if n == 0 else "head" if n >= threshold else "tail" for item, n in counts.items()}


def run_markdown(result: dict) -> str:
    rows = [("all users", result["overall"])]
    rows += [(f"{name} users", m) for name, m in result.get("by_activity", {}).items()]
    rows += [(f"all users, {name} items ({result['popularity_items'][name]})", m)
             for name, m in result.get("by_popularity", {}).items()]
    lines = ["| users | n | R@10 | R@20 | N@10 | N@20 | cov@20 |", "|---|--:|--:|--:|--:|--:|--:|"]
    lines += [f"| {name} | {m['users']} | {m['recall@10']:.4f} | {m['recall@20']:.4f} | {m['ndcg@10']:.4f} | "
              f"{m['ndcg@20']:.4f} | {m['coverage@20']:.4f} |" for name, m in rows]
    exposure = ", ".join(f"{k} {v}" for k, v in result["exposure"].items())
    return f"{result['run']} against {result['holdout']}\n\n" + "\n".join(lines) + f"\n\nExposure: {exposure}\n"


def main(argv: list[str] | None = None) -> int:
    process.prepare()
    parser = argparse.ArgumentParser(prog="mmfuse evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", help="A complete night (ROOT/<date>) whose recommendations are scored against "
                                      "--holdout")
    parser.add_argument("--holdout", help="With --run: held-out interactions Parquet (user and item columns)")
    parser.add_argument("--catalog", help="Catalog Parquet (its item order breaks time ties)")
    parser.add_argument("--interactions", help="Interactions Parquet (with --run, optional: what the night read, "
                                               "for recall per item-popularity segment)")
    parser.add_argument("--embeddings", help="A complete run folder (with _SUCCESS) holding an `embeddings` dataset")
    parser.add_argument("--output", required=True, help="Folder for evaluation.json and evaluation.md")
    parser.add_argument("--methods", default="", help="Comma-separated among "
                        f"{', '.join(methods_for(['<modality>']))}, where <modality> is any the embeddings hold "
                        f"(content kNN on it); `all`; empty: all but the ablations ({', '.join(ABLATIONS)})")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the cold split and of every fit")
    parser.add_argument("--align_epochs", type=int, default=40,
                        help="Most epochs of each contrastive fit, as the nightly job's option (early stopping "
                             "on the validation split usually ends it sooner)")
    parser.add_argument("--verbose", action="store_true", help="Show the libraries' log lines")
    columns = parser.add_argument_group("columns", "as the nightly job names them (interaction columns name the "
                                                   "holdout's too)")
    c, i = CatalogColumns(), InteractionColumns()
    columns.add_argument("--item_id_column", default=c.item_id, help="The catalog's item id")
    columns.add_argument("--user_id_column", default=i.user_id, help="User id")
    columns.add_argument("--interaction_item_id_column", default=i.item_id, help="Item id")
    columns.add_argument("--timestamp_column", default=i.timestamp, help="Timestamp (only the order counts)")
    columns.add_argument("--weight_column", default=i.weight, help="Optional weight, e.g. a rating")
    args = parser.parse_args(argv)
    interaction_columns = InteractionColumns(user_id=args.user_id_column, item_id=args.interaction_item_id_column,
                                             timestamp=args.timestamp_column, weight=args.weight_column)
    if args.run:
        return _main_run(args, interaction_columns)
    missing = [f"--{n}" for n in ("catalog", "interactions", "embeddings") if not getattr(args, n)]
    if missing:
        print(f"mmfuse evaluate: error: missing {' '.join(missing)} (or --run and --holdout)", file=sys.stderr)
        return 2
    if incomplete("evaluate", args.embeddings):
        return 2
    try:
        inter, catalog = load(args.catalog, args.interactions, args.embeddings, args.item_id_column,
                              interaction_columns)
    except (OSError, KeyError, pa.ArrowException) as e:
        print(f"mmfuse evaluate: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    known = methods_for(tuple(catalog.features))
    methods = ([m for m in args.methods.split(",") if m] or list(default_methods(tuple(catalog.features)))
               if args.methods != "all" else list(known))
    unknown = set(methods) - set(known)
    if unknown:
        print(f"mmfuse evaluate: error: unknown methods {sorted(unknown)} (these embeddings allow "
              f"{', '.join(known)})", file=sys.stderr)
        return 2
    if "als" in methods and importlib.util.find_spec("implicit") is None:  # fail now, not after the fits
        print("mmfuse evaluate: error: the als baseline needs the implicit package: pip install 'mmfuse[evaluate]', "
              "or leave als out of --methods", file=sys.stderr)
        return 2
    results = run(inter, catalog, methods, args.seed, log=lambda line: print(line, flush=True),
                  epochs=args.align_epochs, verbose=args.verbose)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(results, indent=1))
    (out / "evaluation.md").write_text(markdown(results))
    print(f"mmfuse evaluate: wrote {out / 'evaluation.json'} and {out / 'evaluation.md'}")
    return 0


def _main_run(args: argparse.Namespace, columns: InteractionColumns) -> int:
    if not args.holdout:
        print("mmfuse evaluate: error: --run needs --holdout", file=sys.stderr)
        return 2
    if incomplete("evaluate", args.run):
        return 2
    try:
        result = score_run(args.run, args.holdout, columns, args.interactions)
    except (OSError, KeyError, pa.ArrowException) as e:
        print(f"mmfuse evaluate: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result, indent=1))
    (out / "evaluation.md").write_text(run_markdown(result))
    o = result["overall"]
    print(f"mmfuse evaluate: {o['users']} users, R@20 {o['recall@20']:.4f}, N@20 {o['ndcg@20']:.4f}; wrote "
          f"{out / 'evaluation.json'} and {out / 'evaluation.md'}")
    return 0


if __name__ == "__main__":
    from mmfuse.runners import process
    process.quiet_console(verbose="--verbose" in sys.argv)
    sys.exit(main())
