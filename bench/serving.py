"""Serving benchmark: ``mmfuse serve`` answering ``recommend`` over HTTP, against the SavedModel alone.

    .venv/bin/python -m bench.serving              # 100,000 items x 64 dims, 20,000 users, k=20
    .venv/bin/python -m bench.serving --quick      # 10,000 items: a smoke run that prints only

A seeded synthetic night (``bench.topk``'s item blocks: unit vectors split into two modality parts; users
with 50 seen items each; a popular list of 1,020) is exported as ``mmfuse export`` would and served by
``mmfuse serve`` in its own process. Load comes from ``--clients`` threads on localhost, each sending one
request after another (bounded load: at most ``clients`` requests in flight), one user per request, for
``--requests`` requests after a warm-up. The same users' calls, from as many threads, are timed on the
SavedModel in-process: the model's own rate, which the server can approach but not pass. The answers of
the first 1,000 users are checked against a numpy ranking of the same arrays. One row per ``--dtypes``
(how the export keeps its item and user matrices): float32 must give numpy's rankings; bfloat16 and int8
report their size on disk and how much of numpy's float32 top-k they return.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.topk import item_block

HERE = Path(__file__).resolve().parent
CHECKED = 1000  # users whose lists are checked against numpy


def night(items: int, users: int, dim: int, seen: int = 50, popular: int = 1020):
    from mmfuse.models.serving import Arrays
    vectors, text, image = item_block(0, items, dim)
    rng = np.random.default_rng(1)
    user_vectors = rng.standard_normal((users, dim)).astype(np.float32)
    user_vectors /= np.linalg.norm(user_vectors, axis=1, keepdims=True)
    seen_rows = np.sort(rng.integers(0, items, (users, seen)), axis=1)
    return Arrays(np.array([f"item-{i:07d}" for i in range(items)], dtype=object), vectors, ("image", "text"),
                  np.stack([image, text]), np.ones((items, 2), bool),
                  np.array([f"user-{u:07d}" for u in range(users)], dtype=object), user_vectors, np.ones(users, bool),
                  np.arange(0, users * seen + 1, seen, dtype=np.int64), seen_rows.ravel().astype(np.int64),
                  rng.choice(items, popular, replace=False).astype(np.int64),
                  np.sort(rng.random(popular).astype(np.float32))[::-1].copy())


def agreement(a, user: int, got: list[str]) -> tuple[str, float]:
    """("same", "tie" or "no", the share of numpy's top-k in ``got``): "same": ``got`` is numpy's ranking of
    the user's unseen items; "tie": it differs only where scores agree within 1e-6 (two float32 products of
    different kernels order such items either way)."""
    scores = a.vectors @ a.user_vectors[user]
    scores[a.seen_rows[a.seen_splits[user]:a.seen_splits[user + 1]]] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -scores))[:len(got)]
    best = [a.item_ids[i] for i in order]
    overlap = len(set(best) & set(got)) / len(got)
    if best == got:
        return "same", overlap
    rows = {item: row for row, item in enumerate(a.item_ids)}
    mine = scores[[rows[i] for i in got]]
    return "tie" if np.allclose(mine, scores[order], rtol=0, atol=1e-6) else "no", overlap


def load(call, users: list[str], clients: int) -> tuple[np.ndarray, float]:
    """``clients`` threads each ``call`` their share of ``users``, one at a time; returns every latency (s)
    and the wall time."""
    latencies, lock = [], threading.Lock()

    def client(mine: list[str]) -> None:
        for user in mine:
            start = time.perf_counter()
            call(user)
            with lock:
                latencies.append(time.perf_counter() - start)
    threads = [threading.Thread(target=client, args=(users[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.array(latencies), time.perf_counter() - start


def http(url: str, k: int):
    def call(user: str) -> None:
        body = json.dumps({"instances": [{"user_id": user, "k": k}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60) as r:
            r.read()
    return call


def measure(a, dtype: str, users: list[str], args: argparse.Namespace) -> dict:
    """One dtype's row: the export's size, the model's and the server's rates, its answers against numpy."""
    import tensorflow as tf

    from mmfuse.models.serving import Night
    with tempfile.TemporaryDirectory() as tmp:
        model = f"{tmp}/mmfuse/1"
        Night(a, dtype=dtype).save(model)
        size = sum(f.stat().st_size for f in Path(model).rglob("*") if f.is_file())
        loaded = tf.saved_model.load(model)

        def direct(user: str) -> None:
            loaded.recommend(tf.constant([user]), tf.constant(args.k))
        load(direct, users[:100], args.clients)  # warm-up
        _, model_wall = load(direct, users[100:], args.clients)
        got = np.concatenate([loaded.recommend(tf.constant(list(a.user_ids[lo:lo + 100])), tf.constant(args.k))[
            "item_id"].numpy() for lo in range(0, CHECKED, 100)])
        verdicts, overlaps = zip(*(agreement(a, u, [i.decode() for i in got[u]]) for u in range(CHECKED)))

        proc = subprocess.Popen([Path(sys.executable).parent / "mmfuse", "serve", f"--model={model}", "--port=0"],
                                stdout=subprocess.PIPE, text=True, env={**os.environ})
        try:
            call = http(proc.stdout.readline().split("listening on ")[1].strip() + ":predict", args.k)
            load(call, users[:100], args.clients)  # warm-up
            latencies, wall = load(call, users[100:], args.clients)
        finally:
            proc.terminate()
            proc.wait(30)
    return {"dtype": dtype, "items": args.items, "users": args.users, "dim": args.dim, "k": args.k,
            "clients": args.clients, "requests": args.requests, "size_mb": round(size / 2**20, 1),
            "rps": round(args.requests / wall, 1), "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2),
            "model_calls_per_s": round(args.requests / model_wall, 1),
            "agree": {v: verdicts.count(v) for v in ("same", "tie", "no")},
            "overlap": round(float(np.mean(overlaps)), 4), "cpu": _cpu(), "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.users, args.requests = 10_000, 2_000, 200
    a = night(args.items, args.users, args.dim)
    users = [a.user_ids[u] for u in np.random.default_rng(2).integers(0, args.users, args.requests + 100)]
    rows = []
    for dtype in args.dtypes.split(","):
        rows.append(measure(a, dtype, users, args))
        print(json.dumps(rows[-1]), flush=True)
    if not args.quick:
        (HERE / "results" / "serving.json").write_text(json.dumps(rows, indent=1) + "\n")
        (HERE / "results" / "serving.md").write_text(
            "# Serving: `mmfuse serve`, recommend over HTTP\n\n"
            "Generated by `python -m bench.serving`; one user per request, bounded load from localhost. dtype: how "
            "the export keeps the item and user matrices (`mmfuse export --dtype`); overlap: the share of numpy's "
            f"float32 top-{args.k} in the answers, over {CHECKED:,} users.\n\n"
            "| dtype | items | users | dim | k | size MB | clients | requests/s | p50 ms | p99 ms "
            f"| SavedModel alone, calls/s | answers of {CHECKED:,} users against numpy | overlap | CPU | date |\n"
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|---|---|\n" + "".join(
                f"| {r['dtype']} | {r['items']:,} | {r['users']:,} | {r['dim']} | {r['k']} | {r['size_mb']} "
                f"| {r['clients']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['model_calls_per_s']} "
                f"| {r['agree']['same']} same, {r['agree']['tie']} by a float tie, {r['agree']['no']} not "
                f"| {r['overlap']} | {r['cpu']} | {r['date']} |\n" for r in rows))
    return 0 if all(not r["agree"]["no"] for r in rows if r["dtype"] == "float32") else 1


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
