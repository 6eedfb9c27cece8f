"""Top-k benchmark: ``transforms.topk.TopK`` on the FnApiRunner against FAISS ``IndexFlatIP`` and the BLAS peak.

    .venv/bin/python -m bench.topk            # 100,000 users x 100,000 items x 64 dims, k=20, 50 excluded
    .venv/bin/python -m bench.topk --quick    # 10,000 x 20,000: a smoke run that prints only

Every measurement is a subprocess with its own peak memory, on the same generated data (seeded blocks, so
both venvs make identical arrays without passing files): ``blas`` times numpy sgemm of one (batch, shard)
product's shape (the machine's peak for this work, measured in the same run); ``ours`` runs the Beam transform;
``inputs`` runs the same pipeline with only the input generation, whose time is subtracted for the net
rate; ``faiss`` (in ``.venv-bench``, never a product dependency) adds the items to ``IndexFlatIP`` and
searches k + 50 neighbours, then drops each user's excluded items and keeps the first k (a user excludes
at most 50, so k always remain). Both sides' top-k of the first users are compared. Rounds are
interleaved and the best of each kind is kept, because the machine is shared.

OpenBLAS kernels: a machine may set ``OPENBLAS_CORETYPE`` (and ``OPENBLAS_L2_SIZE``) for the sake of old
OpenBLAS builds, which slows a current numpy. Our measurements run without both, so numpy's OpenBLAS
picks its own kernel, as on a worker; FAISS (which bundles an older OpenBLAS) runs once as the machine
sets it and, on an AVX-512 CPU, once with the AVX-512 kernel, and the faster is the reference. Each
result names the kernel it ran (threadpoolctl).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mmfuse import transforms  # noqa: F401  (the inputs-only pipeline's workers exit as the product's do)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
BLOCK = 10_000  # rows generated per seeded block
CHECKED = 200   # users whose lists both sides must agree on


def item_block(start: int, stop: int, dim: int):
    """Unit item vectors and two modality parts (text share a, image share 1 - a) of rows start..stop."""
    rng = np.random.default_rng(start)
    vectors = rng.standard_normal((stop - start, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    share = rng.uniform(0.2, 0.8, (stop - start, 1)).astype(np.float32)
    return vectors, share * vectors, vectors - share * vectors


def user_block(start: int, stop: int, dim: int, n_items: int, excluded: int):
    rng = np.random.default_rng(10**9 + start)
    vectors = rng.standard_normal((stop - start, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), rng.integers(0, n_items, (stop - start, excluded))


OWN_KERNEL = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # unset: numpy's OpenBLAS picks its kernel
FAISS_ENVS = {"faiss": {}, "faiss-avx512": {"OPENBLAS_CORETYPE": "SkylakeX", "OPENBLAS_L2_SIZE": None}}


def _kernels() -> str:
    from threadpoolctl import threadpool_info
    return ", ".join(sorted({str(lib.get("architecture")) for lib in threadpool_info()
                             if lib.get("internal_api") == "openblas"}))


def _avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _blocks(n: int):
    return [(s, min(s + BLOCK, n)) for s in range(0, n, BLOCK)]


def measure_blas(a) -> dict:
    """Best sgemm rate for one (batch, shard) product's shape, (user batch x dim) @ (dim x item shard), done
    whole (OpenBLAS's own threads; 1,024 rows at a time, as a whole 8192 x 131072 result is 4 GiB) and in
    the top-k kernel's 512 x 512 tiles, one thread per core over an equal share of the rows (in cache: the peak
    for this shape). The peak is the faster."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from mmfuse.models.topk import COLUMNS_PER_TILE, ROWS_PER_TILE
    from mmfuse.transforms.topk import ITEM_SHARD, USER_BATCH
    rng = np.random.default_rng(0)
    q = rng.standard_normal((USER_BATCH, a.dim)).astype(np.float32)
    x_t = rng.standard_normal((ITEM_SHARD, a.dim)).astype(np.float32).T
    cores = os.cpu_count() or 1

    def whole():
        for start in range(0, USER_BATCH, 1024):
            q[start:start + 1024] @ x_t

    def tiles(rows):
        tile = np.empty((ROWS_PER_TILE, COLUMNS_PER_TILE), dtype=np.float32)
        for r0 in rows:
            for c0 in range(0, ITEM_SHARD, COLUMNS_PER_TILE):
                np.matmul(q[r0:r0 + ROWS_PER_TILE], x_t[:, c0:c0 + COLUMNS_PER_TILE], out=tile)

    def tiled():
        starts = range(0, USER_BATCH, ROWS_PER_TILE)
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(cores) as pool:
            list(pool.map(tiles, [starts[i::cores] for i in range(cores)]))

    rates = {}
    for name, way in (("whole", whole), ("tiled", tiled)):
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            way()
            best = min(best, time.perf_counter() - t)
        rates[name] = 2 * USER_BATCH * ITEM_SHARD * a.dim / best / 1e9
    return {"gflops": max(rates.values()), **{f"{k}_gflops": v for k, v in rates.items()}, "kernel": _kernels()}


def measure_select(a) -> dict:
    """ns per score of one block (1024 queries x one item shard) on one core: the product alone, and
    the product plus each way to select the top k with the exclusions masked."""
    import tensorflow as tf
    from threadpoolctl import threadpool_limits

    tf.config.threading.set_intra_op_parallelism_threads(1)

    from mmfuse.models import topk
    from mmfuse.transforms.topk import ITEM_SHARD
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1024, a.dim)).astype(np.float32)
    x = rng.standard_normal((ITEM_SHARD, a.dim)).astype(np.float32)
    rows, cols = np.repeat(np.arange(1024), a.excluded), rng.integers(0, ITEM_SHARD, 1024 * a.excluded)

    def masked():
        block = q @ x.T
        block[rows, cols] = -np.inf
        return block

    def argpartition():
        block = masked()
        best = np.argpartition(block, ITEM_SHARD - a.k, axis=1)[:, ITEM_SHARD - a.k:]
        return np.take_along_axis(best, np.argsort(-np.take_along_axis(block, best, 1), axis=1), 1)

    ways = {"product and exclusions only": masked,
            "compiled scan of cached tiles (ours, models/topk.py)": lambda: topk.top_k(q, x, a.k, (rows, cols)),
            "np.argpartition of whole rows, then sort k": argpartition,
            "tf.math.top_k of whole rows": lambda: tf.math.top_k(masked(), a.k)}
    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for name, way in ways.items():
            way()
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                way()
                best = min(best, time.perf_counter() - t)
            out[name] = best * 1e9 / (1024 * ITEM_SHARD)
    return out


def measure_ours(a, with_topk: bool) -> dict:
    import pickle

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from mmfuse import runners
    from mmfuse.transforms.topk import ITEM_SHARD, USER_BATCH, TopK

    def items(block):
        vectors, text, image = item_block(*block, a.dim)
        for j, row in enumerate(range(*block)):
            yield {"item_id": f"i{row}", "vector": vectors[j], "parts": {"text": text[j], "image": image[j]}}

    def users(block):  # the ids made by numpy: formatting 50 ids per user one by one costs more than ranking
        vectors, excluded = user_block(*block, a.dim, a.items, a.excluded)
        # Only the ids it needs, as short strings: a lookup table of every item id (numpy's default str of an
        # int is 21 characters, 84 bytes) would sit in the worker while its users are ranked, 70 MB at 800,000
        # items, and the memory check would charge it to the transform.
        excluded = np.strings.add("i", excluded.astype(f"U{len(str(a.items))}")).tolist()
        yield from zip(np.strings.add("u", np.arange(*block).astype(str)).tolist(), vectors, excluded)

    sample = Path(a.out) / f"ours-{a.users}x{a.items}.pkl"
    flags = [f"--direct_running_mode={a.mode}"] + ([f"--direct_num_workers={a.workers}"] if a.mode != "in_memory"
                                                   else [])
    t = time.perf_counter()
    with runners.create_pipeline(PipelineOptions(flags)) as p:
        i = p | "ItemBlocks" >> beam.Create(_blocks(a.items)) | "Items" >> beam.FlatMap(items)
        u = p | "UserBlocks" >> beam.Create(_blocks(a.users)) | "Users" >> beam.FlatMap(users)
        if with_topk:
            ranked = {"queries": u, "items": i} | TopK(a.k, a.batch or USER_BATCH, a.shard or ITEM_SHARD)
            _ = (ranked
                 | "Sample" >> beam.Filter(lambda r: int(r[0][1:]) < CHECKED)
                 | "Ids" >> beam.Map(lambda r: (r[0], r[1].item_ids.tolist()))
                 | "All" >> beam.combiners.ToList()
                 | "Keep" >> beam.Map(lambda rows: sample.write_bytes(pickle.dumps(dict(rows)))))
        else:  # each counted where it is made: a Flatten would ship every record to the runner
            _ = i | "CountItems" >> beam.combiners.Count.Globally()
            _ = u | "CountUsers" >> beam.combiners.Count.Globally()
    seconds = time.perf_counter() - t
    import resource
    return {"seconds": seconds, "rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "sample": str(sample) if with_topk else None, "kernel": _kernels()}


def measure_faiss(a) -> dict:
    import faiss
    vectors = np.concatenate([item_block(*b, a.dim)[0] for b in _blocks(a.items)])
    blocks = [user_block(*b, a.dim, a.items, a.excluded) for b in _blocks(a.users)]
    queries = np.concatenate([b[0] for b in blocks])
    excluded = np.concatenate([b[1] for b in blocks])
    t = time.perf_counter()
    index = faiss.IndexFlatIP(a.dim)
    index.add(vectors)
    result = np.empty((a.users, a.k), dtype=np.int64)
    for start in range(0, a.users, BLOCK):
        _, found = index.search(queries[start:start + BLOCK], a.k + a.excluded)
        banned = (found[:, :, None] == excluded[start:start + BLOCK, None, :]).any(axis=2)
        keep = np.argsort(banned, axis=1, kind="stable")[:, :a.k]  # first k not excluded, in FAISS's order
        result[start:start + BLOCK] = np.take_along_axis(found, keep, 1)
    seconds = time.perf_counter() - t
    import resource
    return {"seconds": seconds, "threads": faiss.omp_get_max_threads(), "kernel": _kernels(),
            "rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "sample": {f"u{u}": [f"i{i}" for i in result[u]] for u in range(min(CHECKED, a.users))}}


def _child(a, kind: str) -> dict:
    """One measurement in a fresh process (its own peak memory); FAISS in the peers' venv, in the
    environment ``FAISS_ENVS`` names, ours with OpenBLAS choosing its kernel."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kind in FAISS_ENVS:
        python, measure = PEER_PYTHON, "faiss"
        env.update(FAISS_ENVS[kind])
    else:
        python, measure = sys.executable, kind
        env.update(dict.fromkeys(OWN_KERNEL))
    env = {k: v for k, v in env.items() if v is not None}
    args = [str(python), "-m", "bench.topk", f"--measure={measure}", f"--users={a.users}", f"--items={a.items}",
            f"--dim={a.dim}", f"--k={a.k}", f"--excluded={a.excluded}", f"--mode={a.mode}",
            f"--workers={a.workers}", f"--out={a.out}", f"--batch={a.batch}", f"--shard={a.shard}"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"bench.topk {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, one round, print only")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--excluded", type=int, default=50)
    parser.add_argument("--batch", type=int, default=0, help="user batch size (0: the transform's default)")
    parser.add_argument("--shard", type=int, default=0, help="item shard size (0: the transform's default)")
    parser.add_argument("--mode", default="multi_processing", choices=["in_memory", "multi_processing"])
    parser.add_argument("--workers", type=int, default=2, help="SDK worker processes")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--memory_users", type=int, default=20_000,
                        help="users of the memory check (items doubled three times, shard size fixed)")
    parser.add_argument("--memory_rounds", type=int, default=2)
    parser.add_argument("--out", help=argparse.SUPPRESS)  # where measurements leave their samples
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.measure:
        measure = {"blas": measure_blas, "faiss": measure_faiss, "select": measure_select,
                   "ours": lambda a: measure_ours(a, True),
                   "inputs": lambda a: measure_ours(a, False)}[a.measure]
        print(json.dumps(measure(a)))
        return 0
    if a.quick:
        a.users, a.items, a.rounds, a.memory_users, a.memory_rounds = 10_000, 20_000, 1, 5_000, 1
    a.out = tempfile.mkdtemp(prefix="bench-topk-")
    selection = _child(a, "select")
    print("selection", selection, flush=True)
    kinds = ["blas", "inputs", "ours"] + ([kind for kind in FAISS_ENVS if kind == "faiss" or _avx512()]
                                          if PEER_PYTHON.exists() else [])
    samples = {kind: [] for kind in kinds}
    for _ in range(a.rounds):
        for kind in samples:
            samples[kind].append(_child(a, kind))
            print(kind, {k: v for k, v in samples[kind][-1].items() if k != "sample"}, flush=True)
    memory = {a.items: [], 2 * a.items: [], 4 * a.items: [], 8 * a.items: []}
    shard = a.items // 2  # every shard the same size at every item count
    for _ in range(a.memory_rounds):  # interleaved: the peaks move by a few percent from run to run
        for n_items, runs in memory.items():
            runs.append(_child(argparse.Namespace(**{**vars(a), "users": a.memory_users, "items": n_items,
                                                     "shard": shard}), "ours"))
            print("memory", n_items, {k: v for k, v in runs[-1].items() if k != "sample"}, flush=True)
    result = summarise(a, samples, memory)
    result["selection_ns_per_score"] = selection
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if not a.quick:
        (HERE / "results" / "topk.json").write_text(json.dumps(result, indent=1) + "\n")
        (HERE / "results" / "topk.md").write_text(markdown(result))
    return 0


def summarise(a, samples, memory) -> dict:
    import pickle
    best = {kind: min(s, key=lambda r: r.get("seconds", -r.get("gflops", 0))) for kind, s in samples.items() if s}
    flops = 2.0 * a.users * a.items * a.dim
    ours = best["ours"]
    net = max(ours["seconds"] - best["inputs"]["seconds"], 1e-9)
    result = {"shape": {"users": a.users, "items": a.items, "dim": a.dim, "k": a.k, "excluded": a.excluded},
              "runner": f"FnApiRunner, direct_running_mode={a.mode}" + (f", {a.workers} workers"
                                                                        if a.mode != "in_memory" else ""),
              "cores": os.cpu_count(), "blas_gflops": best["blas"]["gflops"],
              "ours": {"seconds": ours["seconds"], "users_per_s": a.users / ours["seconds"],
                       "net_seconds": net, "net_users_per_s": a.users / net,
                       "gflops": flops / ours["seconds"] / 1e9, "net_gflops": flops / net / 1e9,
                       "rss_worker_mb": ours["rss_workers_mb"], "rss_runner_mb": ours["rss_self_mb"],
                       "inputs_seconds": best["inputs"]["seconds"]},
              "memory": {str(n): {"users": a.memory_users, "shard": a.items // 2,
                                  "rss_worker_mb": [r["rss_workers_mb"] for r in runs],
                                  "rss_runner_mb": [r["rss_self_mb"] for r in runs]} for n, runs in memory.items()},
              "samples": {kind: [{k: v for k, v in r.items() if k != "sample"} for r in runs]
                          for kind, runs in samples.items()}}
    peers = {kind: best[kind] for kind in FAISS_ENVS if kind in best}
    if peers:
        mine = pickle.loads(Path(ours["sample"]).read_bytes())
        result["faiss"] = {kind: {"seconds": f["seconds"], "users_per_s": a.users / f["seconds"],
                                  "gflops": flops / f["seconds"] / 1e9, "threads": f["threads"],
                                  "rss_mb": f["rss_self_mb"], "kernel": f["kernel"],
                                  "same_top_k": sum(mine.get(u) == v for u, v in f["sample"].items()),
                                  "checked": len(f["sample"])} for kind, f in peers.items()}
        fastest = min(peers.values(), key=lambda f: f["seconds"])
        result["ratio_vs_faiss"] = fastest["seconds"] / ours["seconds"]
        result["net_ratio_vs_faiss"] = fastest["seconds"] / net
    result["kernel"] = {"ours": ours["kernel"], "blas": best["blas"]["kernel"]}
    return result


def _mib(values) -> str:
    return ", ".join(f"{v:.0f}" for v in values) + " MiB"


def markdown(r: dict) -> str:
    s, o = r["shape"], r["ours"]
    lines = [
        "# Top-k benchmark",
        "",
        f"{s['users']:,} users x {s['items']:,} items x {s['dim']} dims, k={s['k']}, {s['excluded']} excluded "
        f"items per user; {r['runner']}; {r['cores']} cores (shared machine). Produced by "
        "`python -m bench.topk` (`make bench`).",
        "",
        "| | seconds | users/s | GFLOP/s | share of BLAS peak | peak memory |",
        "|---|---:|---:|---:|---:|---|",
        f"| numpy sgemm, one (batch, shard) product's shape, whole or in 512 x 512 tiles on every core (peak) | | | "
        f"{r['blas_gflops']:.0f} | 100% | |",
        f"| TopK pipeline, end to end | {o['seconds']:.1f} | {o['users_per_s']:,.0f} | {o['gflops']:.0f} | "
        f"{o['gflops'] / r['blas_gflops']:.0%} | worker {o['rss_worker_mb']:.0f} MiB, runner "
        f"{o['rss_runner_mb']:.0f} MiB |",
        f"| TopK pipeline, net of generating the inputs ({o['inputs_seconds']:.1f} s) | {o['net_seconds']:.1f} | "
        f"{o['net_users_per_s']:,.0f} | {o['net_gflops']:.0f} | {o['net_gflops'] / r['blas_gflops']:.0%} | |",
    ]
    for kind, f in r.get("faiss", {}).items():
        lines.append(f"| FAISS IndexFlatIP, k+{s['excluded']} then filtered ({f['threads']} threads, OpenBLAS "
                     f"{f['kernel']} kernel{'' if kind == 'faiss' else ', forced'}) | "
                     f"{f['seconds']:.1f} | {f['users_per_s']:,.0f} | {f['gflops']:.0f} | "
                     f"{f['gflops'] / r['blas_gflops']:.0%} | {f['rss_mb']:.0f} MiB |")
    if "faiss" in r:
        same = " and ".join(f"{f['same_top_k']} of {f['checked']}" for f in r["faiss"].values())
        lines += ["", f"**Ours / FAISS throughput: {r['net_ratio_vs_faiss']:.2f} for the search** (net of "
                      f"generating the inputs, as FAISS is timed; target 0.8), {r['ratio_vs_faiss']:.2f} end to end "
                      f"with the runner's start-up, against the faster FAISS. Top-k lists identical to FAISS's for "
                      f"{same} users compared. OpenBLAS kernel: ours {r['kernel']['ours']}."]
    lines += ["", "Peak memory as the item count doubles, shard size fixed (each run's peak, runs interleaved):", "",
              "| items | shards | users | worker peak RSS | runner peak RSS |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {int(n):,} | {int(n) // m['shard']} x {m['shard']:,} | {m['users']:,} | {_mib(m['rss_worker_mb'])} | "
              f"{_mib(m['rss_runner_mb'])} |" for n, m in r["memory"].items()]
    if "selection_ns_per_score" in r:
        sel = r["selection_ns_per_score"]
        base = sel["product and exclusions only"]
        lines += ["", "Selecting the top k of one block (1,024 users x one shard, on one core), "
                      "nanoseconds per score:", "", "| | ns/score | selection alone |", "|---|---:|---:|"]
        lines += [f"| {name} | {ns:.2f} | {ns - base:+.2f} |" for name, ns in sel.items()]
    lines += ["", "## How each number is measured", "",
              "- Each row is a fresh subprocess; rounds are interleaved and the best time of each kind is kept.",
              "- seconds: wall time from building the pipeline (or the index) to the last result; it includes "
              "making the input records from seeded numpy blocks. *Net* subtracts the same pipeline with "
              "only that generation and a count.",
              "- GFLOP/s: 2 x users x items x dims / seconds. BLAS peak: numpy sgemm over one (user batch x item "
              "shard) product, the best of 5 timings done whole (1,024 rows at a time, OpenBLAS's threads) or in "
              "the kernel's 512 x 512 tiles with one thread per core (in cache), whichever is faster, in the "
              "same run.",
              "- Peak memory: ru_maxrss. *worker* is the largest SDK worker process (RUSAGE_CHILDREN of the "
              "runner process), *runner* the process that runs the pipeline and holds its shuffles.",
              "- Memory check: the same pipeline for fewer users, at 1x, 2x, 4x and 8x the items, shards of half the "
              "first count (so all the same size). A worker holds one shard and one user batch at a time, so its "
              "peak should not follow the item count. The runner's does: the FnApiRunner keeps every shuffled and "
              "side-input record in its own memory (on Dataflow that is the shuffle service's job).",
              "- FAISS: `IndexFlatIP` in `.venv-bench` with its default OpenMP threads; exclusion by searching "
              "k + 50 and dropping each user's excluded items (exact, since a user excludes at most 50). Timed "
              "from building the index to the filtered lists: its input arrays are made before the clock starts.",
              "- OpenBLAS kernels: ours run without `OPENBLAS_CORETYPE`/`OPENBLAS_L2_SIZE`, which a machine may "
              "set for old OpenBLAS builds, so numpy's OpenBLAS picks its kernel as on a worker. FAISS bundles an "
              "older OpenBLAS: it runs as the machine sets it and, on an AVX-512 CPU, with the AVX-512 kernel "
              "forced (`OPENBLAS_CORETYPE=SkylakeX`); the ratio is against the faster of the two.",
              "- *For the search* is the bar: both sides from their inputs in hand to the top-k lists. *End to end* "
              "adds what only the pipeline has: starting the runner and its workers and making the records."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
