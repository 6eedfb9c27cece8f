"""``mmfuse explain --run=ROOT/<date> --user=ID``: one user's recommendations from a complete night, each with
its score's modality shares and the history items it comes from ("because you liked").

Reads only that user's rows and the items they name (Parquet row filters), so it answers in seconds on any
catalogue. The night's ``users`` dataset keeps each user's history items of largest weight
(``transforms.users.HISTORY``), scaled so that the user vector is their weighted sum: a score splits
exactly into one share per history item (``models.ranking.because``); ``rest`` is what history items beyond
those kept add. User ids are as the night wrote them (pseudonyms where the night used ``--pseudonymize``).

    mmfuse explain --run=out/2026-06-01 --user=u0042 --catalog=data/catalog --title_column=title
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pyarrow as pa

from mmfuse.models.ranking import because
from mmfuse.pipelines.cli import incomplete
from mmfuse.transforms.contract import ContractError
from mmfuse.transforms.parquet import list_files, read_dataset, read_files

BECAUSE = 3  # history items named per recommendation


def explain(run_dir: str, user: str, n: int = BECAUSE) -> dict:
    """The user's recommendations with ``contributions`` (by modality) and ``because`` (the ``n`` history
    items with the largest shares of the score, and ``rest``: the score's part from history not kept)."""
    users = read_dataset(run_dir, "users", ["user_id", "n_interactions", "fallback", "history"],
                         [("user_id", "=", user)]).to_pylist()
    if not users:
        raise ContractError(f"user {user!r} is not in {run_dir}/users")
    [row] = users
    recs = sorted(read_dataset(run_dir, "recommendations", ["rank", "item_id", "score", "contributions"],
                               [("user_id", "=", user)]).to_pylist(), key=lambda r: r["rank"])
    history = row["history"] or []
    wanted = sorted({h["item_id"] for h in history} | {r["item_id"] for r in recs})
    items = read_dataset(run_dir, "items", ["item_id", "vector"], [("item_id", "in", wanted)]) if wanted else None
    vectors = dict(zip(items["item_id"].to_pylist(), items["vector"].to_pylist())) if items else {}
    kept = [h for h in history if vectors.get(h["item_id"]) is not None]
    out = {"user_id": user, "n_interactions": row["n_interactions"], "fallback": row["fallback"],
           "history": [{"item_id": h["item_id"], "weight": h["weight"]} for h in kept], "recommendations": []}
    for r in recs:
        out["recommendations"].append({"rank": r["rank"], "item_id": r["item_id"], "score": r["score"],
                                       "contributions": dict(r["contributions"])})
    if kept and recs and not row["fallback"]:
        matrix = np.array([vectors[h["item_id"]] for h in kept], np.float32)
        weights = np.array([h["weight"] for h in kept], np.float32)
        targets = np.array([vectors[r["item_id"]] for r in recs], np.float32)
        rows, shares = because(matrix, weights, targets, n)
        total = (targets @ matrix.T) @ weights
        for rec, picked, share, explained in zip(out["recommendations"], rows, shares, total):
            rec["because"] = [{"item_id": kept[j]["item_id"], "share": float(s)} for j, s in zip(picked, share)]
            rec["rest"] = float(rec["score"] - explained)
    return out


def titled(explained: dict, catalog: str, id_column: str, title_column: str) -> dict:
    """``explained`` with a ``title`` beside every item id, from the catalog (only the items it names)."""
    ids = {h["item_id"] for h in explained["history"]} | {r["item_id"] for r in explained["recommendations"]}
    ids |= {b["item_id"] for r in explained["recommendations"] for b in r.get("because", [])}
    table = read_files(list_files(catalog), [id_column, title_column],
                       [(id_column, "in", pa.array(sorted(ids)).cast(_id_type(catalog, id_column)))])
    titles = {str(i): t for i, t in zip(table[id_column].to_pylist(), table[title_column].to_pylist())}

    def add(entry: dict) -> None:
        entry["title"] = titles.get(entry["item_id"])
    for entry in explained["history"]:
        add(entry)
    for rec in explained["recommendations"]:
        add(rec)
        for b in rec.get("because", []):
            add(b)
    return explained


def _id_type(catalog: str, id_column: str) -> pa.DataType:
    """The catalog's item id type (ids are written as strings; the filter needs the column's own type)."""
    return read_files(list_files(catalog)[:1], [id_column]).schema.field(id_column).type


def text(explained: dict) -> str:
    """The console form: one line for the user, one per recommendation."""
    def name(entry: dict) -> str:
        return f"{entry['item_id']} {entry['title']!r}" if entry.get("title") else entry["item_id"]
    kind = "popular fallback (no usable history)" if explained["fallback"] else (
        f"{explained['n_interactions']} interactions")
    lines = [f"user {explained['user_id']}: {kind}"]
    for r in explained["recommendations"]:
        modalities = ", ".join(f"{m} {c:.3f}" for m, c in r["contributions"].items())
        line = f"{r['rank']:3d}. {name(r)}  score {r['score']:.3f} ({modalities})"
        if r.get("because"):
            line += "  because: " + ", ".join(f"{name(b)} {b['share']:.3f}" for b in r["because"])
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmfuse explain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", required=True, help="A complete night (ROOT/<date>)")
    parser.add_argument("--user", required=True, help="A user id as the night wrote it")
    parser.add_argument("--because", type=int, default=BECAUSE, help="History items named per recommendation")
    parser.add_argument("--catalog", help="The catalog (Parquet file, folder or glob), for titles")
    parser.add_argument("--item_id_column", default="item_id", help="The catalog's item id column")
    parser.add_argument("--title_column", default="title", help="The catalog's title column")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of text")
    parser.add_argument("--verbose", action="store_true", help="Show the libraries' log lines")
    args = parser.parse_args(argv)
    if incomplete("explain", args.run):
        return 2
    try:
        explained = explain(args.run, args.user, args.because)
        if args.catalog:
            explained = titled(explained, args.catalog, args.item_id_column, args.title_column)
    except (ContractError, KeyError, OSError, pa.ArrowException) as e:
        print(f"mmfuse explain: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(explained, indent=1) if args.json else text(explained))
    return 0


if __name__ == "__main__":
    sys.exit(main())
