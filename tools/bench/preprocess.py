"""Benchmark data_prep/preprocess.py, per encoder, against SentencePiece's own ceiling on the same text and cores.

    python tools/bench/preprocess.py --tokenizer tok.model --workers 2 \
        --text-dir prose=/usr/share/doc --text-dir 'code=/usr/lib/python3.11:*.py' --text-mb 100 \
        [--encoders sentencepiece fastokens tokenizers] [--input FILE ...] [--make-corpus-mb 300] [--json out.json]

Text sets: `--text-dir NAME=DIR[:GLOB]` builds NAME.jsonl from the files under DIR (one document
per file, .gz decompressed, binary and non-UTF-8 files skipped, sorted, up to --text-mb MB);
`--input` benchmarks existing files as one set; `--make-corpus-mb` copies the default corpus.
Each set is measured on its own (prose and code tokenize at different rates).
Encoders: sentencepiece and fastokens run the .model; tokenizers (the Hugging Face `tokenizers`
library) runs the same model converted to a tokenizer.json (data_prep/hf_tokenizer.py: the same
ids), passed to preprocess as --tokenizer: the path a user's own tokenizer.json takes.

For each set and worker count W:
  * raw rates: each encoder alone on the already-parsed documents, in memory, W forked processes
    (SentencePiece also W threads in one process; the faster of its two is *the ceiling*): no
    reading, JSON, hashing or writing;
  * preprocess: the real CLI in a fresh process with --encoder E, timed from after the one-time
    imports (megatron-core + torch, reported as startup_cpu_s) to the end; MB/s, x the ceiling,
    % of the encoder's own raw rate; its start-up (sample, encoder check: fixed, whatever the
    input size) and the steady state a large input sees: one worker's MB/s while busy on chunks,
    x one ceiling core; peak RSS and PSS of the process tree (RSS every 0.2 s, PSS
    every 2 s: reading smaps costs ~5 ms per process) and the largest single process (max RSS of
    the workers); coordinator CPU share = its CPU / all CPU during the run (start-up included),
    and while tokenizing (its CPU / (its CPU + the workers' busy time)); whether the merged
    shards are byte-identical to the sentencepiece run's.
All MB/s are input-file MB (the in-memory rates are scaled by file bytes / text bytes). Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import sentencepiece as spm
import tokenizers
from rich.console import Console
from rich.table import Table

from data_prep import encoders
from data_prep.progress import HelpFormatter
from data_prep.readers import ChunkReader, detect_format, expand_inputs
from data_prep.tokenizer import HF_ENCODER, Tokenizer, file_sha256

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


def text_dir_corpus(spec: str, out: Path, mb: float) -> Path:
    """NAME=DIR[:GLOB] -> out/NAME.jsonl: one document per text file under DIR (sorted walk)."""
    name, _, rest = spec.partition("=")
    root, _, pattern = rest.partition(":")
    path, size = out / f"{name}.jsonl", 0
    with open(path, "w") as f:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                p = os.path.join(dirpath, fn)
                if (pattern and not fnmatch.fnmatch(fn, pattern)) or os.path.islink(p):
                    continue
                try:
                    data = Path(p).read_bytes()
                    text = (gzip.decompress(data) if fn.endswith(".gz") else data).decode("utf-8")
                except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
                    continue
                if "\0" in text or not text.strip():
                    continue  # binary, or nothing to tokenize
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                size += len(line.encode())
                if size >= mb * 1e6:
                    return path
    return path


def make_corpus(src_dir: Path, out: Path, mb: float) -> Path:
    """Copies of the default corpus's documents into one JSONL of ~mb MB (each copy tagged)."""
    from data_prep.corpus import build_default_corpus
    docs = []
    for p in build_default_corpus(src_dir):
        kind, comp = detect_format(p)
        docs += [r.text for r in ChunkReader(p, kind, comp, 0, None) if r.text]
    size, k = 0, 0
    with open(out, "w") as f:
        while size < mb * 1e6:
            for d in docs:
                line = json.dumps({"text": f"[copy {k}] {d}"}) + "\n"
                f.write(line)
                size += len(line.encode())
            k += 1
    return out


_BATCHES: list = []  # [batches of documents], set before forking the raw-rate processes


def load_batches(paths, batch_bytes: int = 1 << 20) -> tuple[list[list[str]], int]:
    batches, cur, size, text_bytes = [], [], 0, 0
    for p in paths:
        kind, comp = detect_format(p)
        for r in ChunkReader(p, kind, comp, 0, None):
            if r.text:
                cur.append(r.text)
                size += len(r.data)
                text_bytes += len(r.data)
                if size >= batch_bytes:
                    batches.append(cur)
                    cur, size = [], 0
    return batches + ([cur] if cur else []), text_bytes


def _encode_share(args) -> tuple[int, float]:
    """Process w of n: encode every n-th batch; (tokens, CPU seconds)."""
    encoder, model, tokenizer_json, w, n = args
    if encoder == "sentencepiece":
        sp = spm.SentencePieceProcessor(model_file=model)
        enc = lambda b: sp.encode(b, out_type="numpy", num_threads=1)  # noqa: E731
    elif encoder == HF_ENCODER:
        enc = Tokenizer(tokenizer_json).encode_batch  # as preprocess runs it: one thread, numpy ids
    else:
        enc = encoders.FastEncoder(tokenizer_json).encode_batch
    c0 = time.process_time()
    tokens = sum(len(x) for b in _BATCHES[w::n] for x in enc(b))
    return tokens, time.process_time() - c0


def raw_rate(batches, text_bytes: int, encoder: str, model: str, tokenizer_json: str, workers: int) -> dict:
    """One encoder alone on in-memory documents: `workers` forked processes (SentencePiece: also
    `workers` threads in one process; the better of the two counts)."""
    global _BATCHES
    _BATCHES = batches
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(int, range(workers))  # start the processes before timing
        t0 = time.perf_counter()
        shares = pool.map(_encode_share, [(encoder, model, tokenizer_json, w, workers) for w in range(workers)])
        seconds = time.perf_counter() - t0
    _BATCHES = []
    out = {"encoder": encoder, "processes_mb_per_s": text_bytes / seconds / 1e6,
           "mb_per_cpu_s": text_bytes / sum(c for _, c in shares) / 1e6, "tokens": sum(t for t, _ in shares)}
    out["mb_per_s"] = out["processes_mb_per_s"]
    if encoder == "sentencepiece":
        sp = spm.SentencePieceProcessor(model_file=model)
        t0 = time.perf_counter()
        for b in batches:
            sp.encode(b, out_type="numpy", num_threads=workers)
        out["threads_mb_per_s"] = text_bytes / (time.perf_counter() - t0) / 1e6
        out["mb_per_s"] = max(out["mb_per_s"], out["threads_mb_per_s"])
    return out


def run_preprocess(paths, model: str, workers: int, encoder: str, out_dir: Path) -> dict:
    """The CLI on `paths` with `model` (.model or tokenizer.json) and `encoder`, measured."""
    cmd = [sys.executable, "-c", _RUNNER, "--input", *map(str, paths), "--tokenizer", model,
           "--output-dir", str(out_dir), "--workers", str(workers), "--encoder", encoder, "--quiet"]
    cmd += ["--valid-fraction", "0"]  # no valid split: a small text set may put no document in it (refused)
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
    if proc.returncode or "BENCH" not in out:
        raise RuntimeError(f"preprocess failed ({proc.returncode}): {' '.join(cmd[3:])}")
    stats = json.loads(out[out.index("BENCH") + 5:].splitlines()[0])
    manifest = json.loads((out_dir / "manifest.json").read_text())
    run, total_cpu = manifest["run"], stats["coord_cpu_s"] + stats["workers_cpu_s"]
    digest = hashlib.sha256()
    for p in sorted((out_dir / "merged").iterdir()):
        digest.update(p.name.encode() + p.read_bytes())
    return {"encoder": manifest["encoder"]["used"], "workers": workers, "bytes": run["bytes"],
            "wall_s": stats["wall_s"], "mb_per_s": run["bytes"] / stats["wall_s"] / 1e6, "tokens": run["tokens"],
            "tokens_per_s": run["tokens"] / stats["wall_s"], "peak_rss_mb": peak_rss / 2**20,
            "peak_pss_mb": peak_pss / 2**20, "worker_maxrss_mb": stats["worker_maxrss_mb"],
            "coordinator_maxrss_mb": stats["coord_maxrss_mb"], "coordinator_cpu_s": stats["coord_cpu_s"],
            "workers_cpu_s": stats["workers_cpu_s"], "coordinator_cpu_share": stats["coord_cpu_s"] / total_cpu,
            "mb_per_cpu_s": run["bytes"] / total_cpu / 1e6, "import_s": stats["import_s"],
            "startup_cpu_s": stats["startup_cpu_s"], "chunks": run["chunks"], "merged_sha256": digest.hexdigest(),
            "phases_s": run["phases_s"], "busy_mb_per_s_per_worker": run["bytes"] / run["worker_busy_s"] / 1e6,
            # while tokenizing: the coordinator's CPU against the workers' busy time
            "coordinator_tokenize_share": run["coordinator_tokenize_cpu_s"]
            / (run["coordinator_tokenize_cpu_s"] + run["worker_busy_s"])}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="SentencePiece .model to benchmark with")
    ap.add_argument("--text-dir", action="append", default=[], metavar="NAME=DIR[:GLOB]",
                    help="a text set built from the files under DIR (repeatable: e.g. prose and code)")
    ap.add_argument("--text-mb", type=float, default=100.0, help="MB of JSONL per --text-dir set")
    ap.add_argument("--input", nargs="+", default=None, help="existing corpus files/dirs/globs, as one set")
    ap.add_argument("--make-corpus-mb", type=float, default=None,
                    help="a set of this many MB of copies of the default corpus")
    ap.add_argument("--encoders", nargs="+", default=["sentencepiece", "fastokens", HF_ENCODER],
                    choices=["sentencepiece", "fastokens", HF_ENCODER],
                    help="encoders to run preprocess with (tokenizers: the model converted to a tokenizer.json)")
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts to measure")
    ap.add_argument("--repeat", type=int, default=1, help="measure every configuration this many times")
    ap.add_argument("--work-dir", type=Path, default=None, help="for the sets and outputs (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=Path("bench_preprocess.json"), help="where to write the results")
    return ap


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    work.mkdir(parents=True, exist_ok=True)
    sets = {spec.partition("=")[0]: [text_dir_corpus(spec, work, a.text_mb)] for spec in a.text_dir}
    if a.make_corpus_mb:
        sets["default-copies"] = [make_corpus(work / "default", work / "bench.jsonl", a.make_corpus_mb)]
    if a.input:
        sets["input"] = expand_inputs(a.input)
    if not sets:
        raise SystemExit("nothing to measure: pass --text-dir, --input or --make-corpus-mb")
    tokenizer_json = str(work / "tokenizer.json")  # (also kept next to the model: preprocess reuses it)
    encoders.prepare_tokenizer_json(a.tokenizer, file_sha256(a.tokenizer), Path(tokenizer_json))
    load_before, results = os.getloadavg(), []
    for name, paths in sets.items():
        batches, text_bytes = load_batches(paths)
        scale = sum(p.stat().st_size for p in paths) / text_bytes  # rates in input-file MB
        for rep in range(a.repeat):
            for w in a.workers:
                raw = {e: raw_rate(batches, text_bytes, e, a.tokenizer, tokenizer_json, w)
                       for e in dict.fromkeys(["sentencepiece", *a.encoders])}
                for r in raw.values():
                    for k in [k for k in r if k.endswith("mb_per_s") or k == "mb_per_cpu_s"]:
                        r["input_" + k] = r[k] * scale
                ceiling, sp_sha = raw["sentencepiece"], None
                for enc in a.encoders:
                    out = work / f"out_{name}_w{w}_{enc}_r{rep}"
                    shutil.rmtree(out, ignore_errors=True)
                    p = run_preprocess(paths, tokenizer_json if enc == HF_ENCODER else a.tokenizer, w, enc, out)
                    shutil.rmtree(out)
                    sp_sha = sp_sha or (p["merged_sha256"] if enc == "sentencepiece" else None)
                    p["x_ceiling"] = p["mb_per_s"] / ceiling["input_mb_per_s"]
                    # steady state, what a large input sees: one worker's rate while busy vs one ceiling core
                    p["x_ceiling_per_core"] = p["busy_mb_per_s_per_worker"] / (ceiling["input_mb_per_s"] / w)
                    p["pct_of_own_raw_rate"] = 100 * p["mb_per_s"] / raw[enc]["input_mb_per_s"]
                    same = None if sp_sha is None else p["merged_sha256"] == sp_sha
                    results.append({"set": name, "repeat": rep, "workers": w, "ceiling": ceiling, "raw": raw[enc],
                                    "preprocess": p, "load_avg": os.getloadavg(), "identical_to_sentencepiece": same})
    t = Table(title="preprocess per encoder vs the SentencePiece ceiling (same text, same cores; input-file MB/s)")
    for col in ("set", "W", "encoder", "ceiling MB/s", "raw MB/s", "prep MB/s", "x ceiling", "% own raw",
                "start s", "busy MB/s/worker", "x ceil/core", "peak PSS MB", "max proc RSS MB", "coord CPU %",
                "coord % tokenizing", "same bytes", "load"):
        t.add_column(col, justify="right")
    for r in results:
        p = r["preprocess"]
        t.add_row(r["set"], str(r["workers"]), p["encoder"], f"{r['ceiling']['input_mb_per_s']:.2f}",
                  f"{r['raw']['input_mb_per_s']:.2f}", f"{p['mb_per_s']:.2f}", f"{p['x_ceiling']:.2f}",
                  f"{p['pct_of_own_raw_rate']:.0f}", f"{p['phases_s']['start']:.2f}",
                  f"{p['busy_mb_per_s_per_worker']:.2f}", f"{p['x_ceiling_per_core']:.2f}", f"{p['peak_pss_mb']:.0f}",
                  f"{max(p['worker_maxrss_mb'], p['coordinator_maxrss_mb']):.0f}",
                  f"{100 * p['coordinator_cpu_share']:.2f}", f"{100 * p['coordinator_tokenize_share']:.2f}",
                  {None: "-", True: "yes", False: "NO"}[r["identical_to_sentencepiece"]],
                  f"{r['load_avg'][0]:.1f}")
    Console(width=200).print(t)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version(), "sentencepiece": spm.__version__,
               "fastokens": encoders.fast_version(), "tokenizers": tokenizers.__version__,
               "load_avg_before": load_before}
    described = {n: {"inputs": [str(p) for p in ps], "input_bytes": sum(p.stat().st_size for p in ps)}
                 for n, ps in sets.items()}
    a.json.write_text(json.dumps({"machine": machine, "tokenizer": a.tokenizer, "sets": described,
                                  "results": results}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
