"""Scale benchmark: the whole nightly job on synthetic catalogs of 10^4 to 10^6 items, its time and memory.

    .venv/bin/python -m bench.scale                          # 10^4, 10^5, 10^6 items; writes bench/results/
    .venv/bin/python -m bench.scale --quick                  # 2,000 items, prints only
    .venv/bin/python -m bench.scale --items=1000000 --generate_only

Each size gets a seeded data set in the mmfuse data contract (``WORK/data-N/``, reused while its size, seed
and columns match): N items whose 32-dim ``features`` are their cluster's centroid plus noise, N/5 users
who each prefer 1-3 of 64 clusters, and 4N events, each on a preferred cluster (10% on any) and, within it,
on an item chosen by a Zipf-like popularity, so both collaborative filtering and content have signal. It
is made in chunks with vectorised numpy, so the generator's memory does not grow with the event count.

``mmfuse nightly`` then runs on it in a subprocess on the multi-process local runner. The memory of its
whole process tree (the driver, the SDK workers, anything else they start) is sampled from /proc every
0.5 s, because the job's peak is where a process holds a stage's data and ru_maxrss of the driver alone
would not show which. The fit's own time and the size of the sample it trained on come from the
artifact's ``alignment.json`` (``metrics.fit``) when it has them. A size that fails is recorded and the next
one runs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MMFUSE = Path(sys.executable).parent / "mmfuse"
RUN_DATE = "2026-06-01"
DAYS = 180          # events spread over the days before RUN_DATE
DIM = 32            # features
CLUSTERS = 64
NOISE = 0.6         # per-dimension noise around a unit-variance centroid: clusters overlap a little
ZIPF = 1.0          # popularity of the item of rank r within its cluster: 1 / (r + 1) ** ZIPF
EXPLORE = 0.1       # share of events on a random cluster rather than a preferred one
ROWS_PER_FILE = 1_000_000
ROW_GROUP = 65_536  # the job reads a row group per work item (transforms/parquet.py), as a data set would
SAMPLE_S = 0.5
TITLE_WORDS = (["jazz", "rock", "folk", "opera", "blues", "techno", "choir", "reggae"],
               ["ocean", "forest", "city", "desert", "winter", "space", "river", "garden"],
               ["classic", "new", "bright", "quiet", "bold", "simple", "warm", "rare", "daily", "soft"])


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    """String ids made by Arrow (a Python f-string per row would dominate the generator's time)."""
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def _chunks(n: int):
    return [(s, min(s + ROWS_PER_FILE, n)) for s in range(0, n, ROWS_PER_FILE)]


def generate(out: Path, n_items: int, seed: int, text: bool) -> dict:
    """Write ``out/catalog`` and ``out/interactions`` (Parquet, one file per chunk) and return the sizes.

    Everything comes from one ``default_rng(seed)``, drawn in a fixed order, so a seed gives the same files."""
    n_users, n_events = max(n_items // 5, 1), 4 * n_items
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
    cluster = rng.permutation(n_items) % CLUSTERS  # balanced: no cluster is empty once n_items >= CLUSTERS
    # Items of each cluster in popularity order: a random order, stably sorted by cluster.
    order = rng.permutation(n_items)
    members = order[np.argsort(cluster[order], kind="stable")]
    starts = np.searchsorted(cluster[members], np.arange(CLUSTERS + 1))
    rank = np.arange(n_items) - np.repeat(starts[:-1], np.diff(starts))
    cum = np.concatenate([[0.0], np.cumsum(1.0 / (rank + 1.0) ** ZIPF)])  # per cluster: cum[start:end + 1]
    preferred = rng.integers(0, CLUSTERS, (n_users, 3))
    n_preferred = rng.integers(1, 4, n_users)
    activity = np.cumsum(rng.lognormal(0.0, 1.0, n_users))  # some users far more active than others

    for sub in ("catalog", "interactions"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    for part, (lo, hi) in enumerate(_chunks(n_items)):
        features = rng.standard_normal((hi - lo, DIM), dtype=np.float32)
        features *= NOISE
        features += centroids[cluster[lo:hi]]
        columns = {"item_id": _ids("item-", np.arange(lo, hi)),
                   "features": pa.ListArray.from_arrays(np.arange(0, (hi - lo + 1) * DIM, DIM, dtype=np.int32),
                                                        features.ravel())}
        if text:  # the cluster shows in two words of the title, so text has the same signal
            genre, place = (pa.array(words).take(pa.array(index)) for words, index in
                            ((TITLE_WORDS[0], cluster[lo:hi] // 8), (TITLE_WORDS[1], cluster[lo:hi] % 8)))
            adjective = pa.array(TITLE_WORDS[2]).take(pa.array(rng.integers(0, len(TITLE_WORDS[2]), hi - lo)))
            columns["title"] = pc.binary_join_element_wise(adjective, genre, place,
                                                           pc.cast(pa.array(np.arange(lo, hi)), pa.string()), " ")
        pq.write_table(pa.table(columns), out / "catalog" / f"part-{part:05d}.parquet", row_group_size=ROW_GROUP)
    end = int(dt.datetime.fromisoformat(RUN_DATE).replace(tzinfo=dt.timezone.utc).timestamp())
    for part, (lo, hi) in enumerate(_chunks(n_events)):
        n = hi - lo
        user = np.minimum(np.searchsorted(activity, rng.random(n) * activity[-1], side="right"), n_users - 1)
        chosen = preferred[user, (rng.random(n) * n_preferred[user]).astype(np.int64)]
        explore = rng.random(n) < EXPLORE
        chosen[explore] = rng.integers(0, CLUSTERS, int(explore.sum()))
        first, last = starts[chosen], starts[chosen + 1]
        target = cum[first] + rng.random(n) * (cum[last] - cum[first])
        position = np.clip(np.searchsorted(cum, target, side="right") - 1, first, last - 1)
        table = pa.table({"user_id": _ids("user-", user), "item_id": _ids("item-", members[position]),
                          "timestamp": end - rng.integers(1, DAYS * 86_400 + 1, n)})
        pq.write_table(table, out / "interactions" / f"part-{part:05d}.parquet", row_group_size=ROW_GROUP)
    return {"items": n_items, "users": n_users, "events": n_events, "seed": seed, "text": text}


def data_set(work: Path, n_items: int, seed: int, text: bool) -> tuple[Path, dict]:
    """The data folder for this size, generated unless a complete one with the same key is there.

    The key file is written last, so a generation cut short is made again."""
    out = work / f"data-{n_items}"
    key_file = out / "_GENERATED.json"
    if key_file.exists():
        made = json.loads(key_file.read_text())
        if (made["items"], made["seed"], made["text"]) == (n_items, seed, text):
            return out, made
    start = time.perf_counter()
    made = generate(out, n_items, seed, text)
    made["generate_seconds"] = time.perf_counter() - start
    made["generator_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process
    key_file.write_text(json.dumps(made, indent=1) + "\n")
    print(f"generated {out}: {made}", flush=True)
    return out, made


def _processes() -> dict[int, tuple[int, str]]:
    """Every visible process: pid -> (parent pid, command line)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return found


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _role(pid: int, root: int, cmd: str) -> str:
    """driver, worker (the Python of an SDK worker, not the ``sh -c`` that starts it) or other."""
    if pid == root:
        return "driver"
    return "worker" if "sdk_worker_main" in cmd and "python" in cmd.split(" ", 1)[0] else "other"


DATASETS = ("embeddings", "alignment", "items", "users", "recommendations", "similar_items", "dead_letter")


def _first_seen(output: Path, seen: dict, now: float) -> None:
    """Record when each dataset's first file appears in the run's staging folder (a writer opens a file when
    its first record arrives, so the stage that makes the dataset is producing): a coarse stage timeline."""
    for parent, _, files in os.walk(output):
        if files:
            for name in Path(parent).relative_to(output).parts:
                if name in DATASETS:
                    seen.setdefault(name, round(now))


def run_nightly(cmd: list[str], log: Path, output: Path) -> dict:
    """Run the job, sampling the RSS of its process tree until it exits; wall time, exit code, peaks, and
    when each dataset's first file appeared (seconds from the start).

    ``kernel_max_rss_mib`` is the kernel's exact peak of the largest single process among the driver and
    the descendants it waited for (wait4), which catches spikes shorter than the sampling interval."""
    peaks: dict[int, dict] = {}
    started: dict[str, int] = {}
    tree_peak = 0.0
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            processes, tree, total = _processes(), [proc.pid], 0.0
            for parent in tree:  # grows while it is walked: breadth first from the driver
                tree += [p for p, (ppid, _) in processes.items() if ppid == parent]
            for p in tree:
                rss = _rss_mib(p)
                total += rss
                cmd_line = processes.get(p, (0, ""))[1]
                seen = peaks.setdefault(p, {"role": _role(p, proc.pid, cmd_line), "cmd": cmd_line[:200],
                                            "peak_mib": 0.0})
                seen["peak_mib"] = max(seen["peak_mib"], rss)
            tree_peak = max(tree_peak, total)
            _first_seen(output, started, time.perf_counter() - start)
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    workers = [p["peak_mib"] for p in peaks.values() if p["role"] == "worker"]
    return {"exit_code": proc.returncode, "wall_seconds": wall, "tree_peak_mib": tree_peak,
            "driver_peak_mib": max((p["peak_mib"] for p in peaks.values() if p["role"] == "driver"), default=0.0),
            "worker_peak_mib": max(workers, default=None), "workers": len(workers),
            "kernel_max_rss_mib": usage.ru_maxrss / 1024, "first_file_s": started,
            "processes": {str(pid): p for pid, p in peaks.items()}}


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def measure(a, n_items: int) -> dict:
    """Generate (or reuse) one size's data, run the nightly job on it and read back what it reports."""
    data, made = data_set(a.work, n_items, a.seed, a.text)
    output = a.work / f"out-{n_items}"
    shutil.rmtree(output, ignore_errors=True)  # a stale _SUCCESS or artifact must not pass for this run's
    cmd = [str(MMFUSE), "nightly", f"--catalog={data / 'catalog'}", f"--interactions={data / 'interactions'}",
           f"--output={output}", f"--run_date={RUN_DATE}", f"--vector_columns=features:{DIM}", "--previous=none",
           "--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2",
           *([] if a.text else ["--text_columns="]), *shlex.split(a.extra)]
    print(f"{n_items:,} items: {shlex.join(cmd)}", flush=True)
    log = a.work / f"nightly-{n_items}.log"
    result = {"data": made, "command": shlex.join(cmd), "log": str(log), **run_nightly(cmd, log, output)}
    run = output / RUN_DATE
    if result["exit_code"] or not (run / "_SUCCESS").exists():
        result["failure"] = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-15:]
        return result
    result["metrics"] = json.loads((run / "metrics.json").read_text())
    alignment = json.loads((run / "alignment" / "alignment.json").read_text())
    result["fit"] = alignment.get("metrics", {}).get("fit", {})
    result["artifact_bytes"] = _size(run / "alignment")
    return result


def _n(value, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# Scale benchmark", "",
             f"Written by `{env['command']}` (`make bench`) on {env['date']}: {env['cores']} cores (shared). "
             f"Synthetic data (seed {env['seed']}, {'with' if env['text'] else 'without'} a title text column); "
             f"each size runs:", "", f"`{env['nightly']}`", "",
             "| items | users | events | wall s | fit s | fit sample events / items | artifact MiB | "
             "driver peak MiB | largest worker peak MiB | tree total peak MiB |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in report["runs"]:
        d = r["data"]
        head = f"| {d['items']:,} | {d['users']:,} | {d['events']:,} | {r['wall_seconds']:,.0f} |"
        if "failure" in r:
            tail = " / ".join(line.strip() for line in r["failure"][-3:]).replace("|", "\\|")
            lines.append(f"{head} failed: exit code {r['exit_code']}: {tail} | | | | | |")
            continue
        fit = r["fit"]
        lines.append(f"{head} {_n(fit.get('seconds'), ',.1f')} | {_n(fit.get('events'))} / {_n(fit.get('items'))} | "
                     f"{r['artifact_bytes'] / 2**20:,.1f} | {r['driver_peak_mib']:,.0f} | {_n(r['worker_peak_mib'])} | "
                     f"{r['tree_peak_mib']:,.0f} |")
    lines += ["", "When each dataset's first file appeared, in seconds from the start (a coarse timeline of the "
              "stages; sampled with the memory):", "",
              "| items | " + " | ".join(DATASETS) + " | end |", "|--:|" + "--:|" * (len(DATASETS) + 1)]
    for r in report["runs"]:
        started = r.get("first_file_s", {})
        lines.append(f"| {r['data']['items']:,} | " + " | ".join(_n(started.get(d)) for d in DATASETS)
                     + f" | {r['wall_seconds']:,.0f} |")
    lines += ["", "## Columns", "",
              "- items, users, events: the generated data set (N items, N/5 users, 4N events over 180 days).",
              "- wall s: the whole `mmfuse nightly` subprocess, from start to exit, runner start-up included.",
              "- fit s: the alignment fit's own wall time; fit sample: the events and items it trained on (the "
              "`metrics.fit` of `alignment/alignment.json`; n/a where the artifact does not record it).",
              "- artifact MiB: every file under the run's `alignment/` folder.",
              f"- peaks: VmRSS from /proc, sampled every {SAMPLE_S} s over the job's whole process tree. *driver* is "
              "the `mmfuse` process (it runs the local runner and holds its shuffles), *largest worker* the "
              "highest of the `sdk_worker_main` processes, *tree total* the highest sum over all live processes "
              "at one sample. Spikes shorter than the interval can be missed; `scale.json` also has each "
              "process's peak and the kernel's exact peak of the largest single process (`kernel_max_rss_mib`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="10000,100000,1000000", help="comma-separated catalog sizes, run in order")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmfuse-bench-scale",
                        help="where data sets (kept and reused), job outputs and logs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", action="store_true", help="add a title column, encoded as text (slow: MiniLM)")
    parser.add_argument("--extra", default="", help="more nightly options, shell-quoted, e.g. '--align=pca'")
    parser.add_argument("--generate_only", action="store_true", help="make the data sets, run nothing")
    parser.add_argument("--quick", action="store_true", help="2,000 items, prints only (a smoke run)")
    a = parser.parse_args(argv)
    sizes = [2_000] if a.quick else [int(s) for s in a.items.split(",") if s.strip()]
    a.work.mkdir(parents=True, exist_ok=True)
    if a.generate_only:
        for n in sizes:
            data_set(a.work, n, a.seed, a.text)
        return 0
    report = {"environment": {
        "command": shlex.join(["python", "-m", "bench.scale", *(sys.argv[1:] if argv is None else argv)]),
        "date": dt.date.today().isoformat(), "cores": os.cpu_count(), "seed": a.seed, "text": a.text,
        "nightly": shlex.join(["mmfuse", "nightly", "--catalog=WORK/data-N/catalog",
                               "--interactions=WORK/data-N/interactions", "--output=WORK/out-N",
                               f"--run_date={RUN_DATE}", f"--vector_columns=features:{DIM}", "--previous=none",
                               "--runner=DirectRunner", "--direct_running_mode=multi_processing",
                               "--direct_num_workers=2", *([] if a.text else ["--text_columns="]),
                               *shlex.split(a.extra)])},
        "runs": []}
    for n in sizes:
        report["runs"].append(measure(a, n))
        r = report["runs"][-1]
        print(json.dumps({k: v for k, v in r.items() if k not in ("processes", "metrics")}, indent=1), flush=True)
        if not a.quick:  # after each size, so a later size that never ends leaves the earlier ones
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "scale.json").write_text(json.dumps(report, indent=1) + "\n")
            (RESULTS / "scale.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all("failure" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
