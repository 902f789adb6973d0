"""Benchmark data_prep/preprocess.py against the tokenizer's own ceiling on the same text/cores.

    python tools/bench/preprocess.py --input corpus.jsonl --tokenizer tok.model --workers 1 2 \
        [--repeat 2] [--make-corpus-mb 300] [--json out.json]

For each worker count W it measures:
  * ceiling: SentencePiece alone encoding the same documents (already parsed, in memory) with
    its C++ batch encoder, on W threads in one process and on W forked processes; the faster of
    the two is the ceiling: no reading, no JSON, no writing;
  * preprocess: the real CLI in a fresh process (W workers), timed from after the one-time imports
    (megatron-core + torch, ~5 CPU-s, reported as startup_cpu_s) to the end:
    MB/s, tokens/s, per core, % of the ceiling; peak RSS and PSS of the whole process tree
    (RSS sampled every 0.2 s, PSS every 2 s: reading smaps costs ~5 ms per process, which at 10 Hz
    would steal ~4% of a 2-core machine from the run); coordinator CPU share = coordinator CPU / all CPU during the run.
  * % of the ceiling per CPU-second (MB per CPU-s of preprocess / of the ceiling): the same
    comparison in CPU time, which a machine shared with other jobs distorts much less than wall time.
All MB/s are input-file MB (what a user has on disk; the ceiling's text MB are scaled by
file bytes / text bytes). --make-corpus-mb builds a JSONL of that size from the default corpus (copies, each doc tagged).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import sentencepiece as spm
from rich.console import Console
from rich.table import Table

from data_prep.readers import ChunkReader, detect_format, expand_inputs

REPO = Path(__file__).resolve().parents[2]

_RUNNER = r"""
import json, resource, sys, time
t_imp = time.time()
from data_prep.preprocess import main
from data_prep.worker import indexed_dataset
indexed_dataset()  # one-time start-up (megatron-core + torch import), reported apart from the run
imp = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.time()
rc = main(sys.argv[1:])
t1 = time.time()
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print("BENCH" + json.dumps({"rc": rc, "wall_s": t1 - t0, "import_s": t0 - t_imp,
      "startup_cpu_s": imp.ru_utime + imp.ru_stime,
      "coord_cpu_s": me.ru_utime + me.ru_stime - imp.ru_utime - imp.ru_stime,
      "workers_cpu_s": kids.ru_utime + kids.ru_stime, "coord_maxrss_mb": me.ru_maxrss / 1024,
      "worker_maxrss_mb": kids.ru_maxrss / 1024}))
"""


def make_corpus(src_dir: Path, out: Path, mb: float) -> Path:
    """Copies of the default corpus's documents into one JSONL of ~mb MB (each copy tagged)."""
    from data_prep.corpus import build_default_corpus
    docs = []
    for p in build_default_corpus(src_dir):
        kind, comp = detect_format(p)
        docs += [r.data.decode() for r in ChunkReader(p, kind, comp, 0, None) if r.data]
    size, k = 0, 0
    with open(out, "w") as f:
        while size < mb * 1e6:
            for d in docs:
                line = json.dumps({"text": f"[copy {k}] {d}"}) + "\n"
                f.write(line)
                size += len(line.encode())
            k += 1
    return out


_BATCHES: list = []


def _encode_share(args) -> int:
    model, w, n = args
    sp = spm.SentencePieceProcessor(model_file=model)
    return sum(len(x) for b in _BATCHES[w::n] for x in sp.encode(b, out_type="numpy", num_threads=1))


def ceiling(paths, model: str, threads: int, batch_bytes: int = 1 << 20) -> dict:
    """SentencePiece alone on the parsed documents: `threads` C++ threads in one process, and
    `threads` forked processes each encoding every n-th batch (the better of the two is the ceiling)."""
    global _BATCHES
    sp = spm.SentencePieceProcessor(model_file=model)
    batches, cur, size, text_bytes = [], [], 0, 0
    for p in paths:
        kind, comp = detect_format(p)
        for r in ChunkReader(p, kind, comp, 0, None):
            if r.data:
                cur.append(r.data)
                size += len(r.data)
                if size >= batch_bytes:
                    batches.append(cur)
                    text_bytes += size
                    cur, size = [], 0
    if cur:
        batches.append(cur)
        text_bytes += size
    t0, c0, tokens = time.perf_counter(), time.process_time(), 0
    for b in batches:
        tokens += sum(len(x) for x in sp.encode(b, out_type="numpy", num_threads=threads))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    threads_mb_s = text_bytes / dt / 1e6
    _BATCHES = batches
    import multiprocessing as mp
    with mp.get_context("fork").Pool(threads) as pool:
        pool.map(int, range(threads))  # start the processes before timing
        t1 = time.perf_counter()
        pool.map(_encode_share, [(model, w, threads) for w in range(threads)])
        procs_s = time.perf_counter() - t1
    _BATCHES = []
    procs_mb_s = text_bytes / procs_s / 1e6
    best = max(threads_mb_s, procs_mb_s)
    return {"threads": threads, "text_bytes": text_bytes, "seconds": dt, "cpu_s": cpu,
            "threads_mb_per_s": threads_mb_s, "processes_mb_per_s": procs_mb_s, "mb_per_s": best,
            "mb_per_cpu_s": text_bytes / cpu / 1e6,
            "tokens_per_s": (tokens + sum(len(b) for b in batches)) / (text_bytes / best / 1e6)}


def run_preprocess(paths, model: str, workers: int, out_dir: Path) -> dict:
    cmd = [sys.executable, "-c", _RUNNER, "--input", *map(str, paths), "--tokenizer", model,
           "--output-dir", str(out_dir), "--workers", str(workers), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    ps, peak_rss, peak_pss, tick = psutil.Process(proc.pid), 0, 0, 0
    while proc.poll() is None:  # RSS every 0.2 s (cheap); PSS (reads smaps: ~5 ms/process) every 2 s
        try:
            procs = [ps] + ps.children(recursive=True)
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in procs))
            if tick % 10 == 5:
                peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in procs))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        tick += 1
        time.sleep(0.2)
    out = proc.stdout.read()
    stats = json.loads(out[out.index("BENCH") + 5:].splitlines()[0])
    manifest = json.loads((out_dir / "manifest.json").read_text())
    run = manifest["run"]
    total_cpu = stats["coord_cpu_s"] + stats["workers_cpu_s"]
    return {"workers": workers, "bytes": run["bytes"], "wall_s": stats["wall_s"],
            "mb_per_s": run["bytes"] / stats["wall_s"] / 1e6, "tokens": run["tokens"],
            "tokens_per_s": run["tokens"] / stats["wall_s"], "peak_rss_mb": peak_rss / 2**20,
            "peak_pss_mb": peak_pss / 2**20, "coordinator_cpu_s": stats["coord_cpu_s"],
            "workers_cpu_s": stats["workers_cpu_s"], "coordinator_cpu_share": stats["coord_cpu_s"] / total_cpu,
            "mb_per_cpu_s": run["bytes"] / total_cpu / 1e6, "import_s": stats["import_s"],
            "startup_cpu_s": stats["startup_cpu_s"],
            "chunks": run["chunks"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", help="corpus files/dirs/globs (or use --make-corpus-mb)")
    ap.add_argument("--make-corpus-mb", type=float, default=None)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=Path("bench_preprocess.json"))
    a = ap.parse_args(argv)
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.make_corpus_mb:
        a.input = [make_corpus(work / "default", work / "bench.jsonl", a.make_corpus_mb)]
    paths = expand_inputs(a.input)
    results = []
    for rep in range(a.repeat):
        for w in a.workers:
            c = ceiling(paths, a.tokenizer, w)
            out = work / f"out_w{w}_r{rep}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            p = run_preprocess(paths, a.tokenizer, w, out)
            # rates on the same basis: input file bytes (JSON syntax included) per second
            scale = sum(x.stat().st_size for x in paths) / c["text_bytes"]
            for k in ("threads_mb_per_s", "processes_mb_per_s", "mb_per_s", "mb_per_cpu_s"):
                c["input_" + k] = c[k] * scale
            p["pct_of_ceiling"] = 100 * p["mb_per_s"] / c["input_mb_per_s"]
            p["pct_of_ceiling_per_cpu_s"] = 100 * p["mb_per_cpu_s"] / c["input_mb_per_cpu_s"]
            results.append({"repeat": rep, "ceiling": c, "preprocess": p,
                            "load_avg": os.getloadavg()})
    t = Table(title="preprocess vs SentencePiece ceiling (same text, same cores)")
    for col in ("W", "rep", "ceil thr MB/s", "ceil proc MB/s", "prep MB/s", "% ceil", "% ceil /CPU-s", "MB/s/core", "Mtok/s",
                "peak RSS MB", "peak PSS MB", "coord CPU %", "load"):
        t.add_column(col, justify="right")
    for r in results:
        c, p = r["ceiling"], r["preprocess"]
        t.add_row(str(p["workers"]), str(r["repeat"]), f"{c['input_threads_mb_per_s']:.2f}",
                  f"{c['input_processes_mb_per_s']:.2f}", f"{p['mb_per_s']:.2f}",
                  f"{p['pct_of_ceiling']:.1f}", f"{p['pct_of_ceiling_per_cpu_s']:.1f}",
                  f"{p['mb_per_s'] / p['workers']:.2f}",
                  f"{p['tokens_per_s'] / 1e6:.2f}", f"{p['peak_rss_mb']:.0f}", f"{p['peak_pss_mb']:.0f}",
                  f"{100 * p['coordinator_cpu_share']:.2f}", f"{r['load_avg'][0]:.1f}")
    Console(width=160).print(t)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version(), "sentencepiece": spm.__version__}
    a.json.write_text(json.dumps({"machine": machine, "inputs": [str(p) for p in paths],
                                  "input_bytes": sum(p.stat().st_size for p in paths),
                                  "tokenizer": a.tokenizer, "results": results}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
