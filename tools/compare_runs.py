"""The paper's cost comparison, two ways.

Benchmark (a few steps of each config, same tokens per batch, same attention kernel family):
    python tools/compare_runs.py bench --data DATA_DIR [--steps 30] [--tokens-per-batch 16384] \
        [--config configs/gpt_1p3b_alibi_L1024.yaml configs/gpt_1p3b_sinusoidal_L2048.yaml] [--output OUT]
Finished runs (metrics.jsonl or wandb offline directories):
    python tools/compare_runs.py runs RUN_A RUN_B [--eval-length 2048] [--target-ppl P] [--output OUT]

bench writes OUT/benchmark.{md,json,png}; runs writes OUT/runs.{md,json} and OUT/loss_vs_time.png.
The heavy imports (torch, matplotlib) wait until the arguments are parsed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from data_prep.manifest import load_manifest
from pretrain.config import AttentionBackend, load_config  # light: no torch (--help stays fast)
from tools.jobs import ROOT, JobError
from tools.runs import compare, read_run, run_names

PAPER_PAIR = [str(ROOT / "configs" / f) for f in ("gpt_1p3b_alibi_L1024.yaml", "gpt_1p3b_sinusoidal_L2048.yaml")]


def bench(args) -> None:
    from tools.bench.compare import BenchSpec, benchmark  # torch: after --help

    load_manifest(args.data)  # not preprocessed data: one line now, not a trainer's traceback later

    lengths = [int(x) for x in args.seq_lengths.split(",")] if args.seq_lengths else [None] * len(args.config)
    if len(lengths) != len(args.config):
        sys.exit(f"--seq-lengths has {len(lengths)} entries for {len(args.config)} configs")
    specs = []
    for path, length in zip(args.config, lengths):
        length = length or load_config(path).model.seq_length
        specs.append(BenchSpec(f"{Path(path).stem}@{length}", Path(path).resolve(), length))
    report = benchmark(specs, data=args.data, steps=args.steps, warmup=args.warmup, backend=args.backend,
                       tokens_per_batch=args.tokens_per_batch, out_dir=args.output, overrides=args.override)
    print((args.output / "benchmark.md").read_text())
    print(f"wrote {args.output}/benchmark.md, benchmark.json, benchmark.png (kernel {report['attention_kernel']})")


def runs(args) -> None:
    from tools.plotting import plot_curves  # matplotlib: after --help

    loaded = [read_run(p, name, gpus=args.gpus) for p, name in zip(args.run, run_names(args.run))]
    target, rows = compare(loaded, args.eval_length, args.target_ppl)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "runs.json").write_text(json.dumps({"eval_length": args.eval_length, "target_ppl": target,
                                                       "rows": rows}, indent=1) + "\n")
    fmt = lambda v, f: "not reached" if v is None else format(v, f)  # noqa: E731
    md = (f"Time to validation perplexity {target:.3f} at {args.eval_length} tokens (nonoverlapping); "
          "hours = summed training step time.\n\n| run | GPUs | steps | final loss | final ppl | step at target | "
          "hours to target | GPU-hours to target | vs fastest | peak mem (GB) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    md += "".join(
        f"| {r['name']} | {r['gpus']} | {r['steps']} | {r['final_loss']:.4f} | {r[f'final_ppl_at_{args.eval_length}']:.3f}"
        f" | {fmt(r['step_at_target'], 'd')} | {fmt(r['hours_to_target'], '.4f')} | {fmt(r['gpu_hours_to_target'], '.4f')}"
        f" | {fmt(r['gpu_hours_vs_fastest'], '.3f')} | {fmt(r['peak_mem_gb'], '.2f')} |\n" for r in rows)
    (args.output / "runs.md").write_text(md)
    plot_curves({r.name: ([r.hours[t["step"]] for t in r.train], [t["loss"] for t in r.train]) for r in loaded},
                args.output / "loss_vs_time.png", "training hours", "training loss", "Loss vs training time")
    print(md)
    print(f"wrote {args.output}/runs.md, runs.json, loss_vs_time.png")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="train each config for a few steps and compare throughput and memory")
    b.add_argument("--config", nargs="+", default=PAPER_PAIR, help="configs; ratios are relative to the last")
    b.add_argument("--seq-lengths", default=None, help="comma-separated L per config; None: each config's own")
    b.add_argument("--data", required=True, help="a data_prep/preprocess.py output directory")
    b.add_argument("--steps", type=int, default=30, help="training steps per config")
    b.add_argument("--warmup", type=int, default=5, help="first steps left out of the means")
    b.add_argument("--tokens-per-batch", type=int, default=16384, help="tokens per step, equal for every config")
    b.add_argument("--backend", default="auto", choices=get_args(AttentionBackend), help="attention kernel for all")
    b.add_argument("--output", type=Path, default=Path("outputs/compare_bench"), help="writes benchmark.{md,json,png} here")
    b.add_argument("override", nargs="*", help="key.path=value config overrides for every run")
    r = sub.add_parser("runs", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="time and GPU-hours of finished runs to reach a validation perplexity")
    r.add_argument("run", nargs="+", help="run directories, metrics.jsonl files or wandb offline-run-* directories")
    r.add_argument("--eval-length", type=int, default=2048, help="validation length compared (paper: 2048)")
    r.add_argument("--target-ppl", type=float, default=None, help="perplexity every run must reach; None: the worst of the runs' best")
    r.add_argument("--gpus", type=int, default=None, help="GPUs per run; None: from the metrics (tokens/s over tokens/s/GPU), else 1")
    r.add_argument("--output", type=Path, default=Path("outputs/compare_runs"), help="writes runs.{md,json} and loss_vs_time.png here")
    args = ap.parse_args(argv)
    (bench if args.mode == "bench" else runs)(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, JobError) as e:  # bad input: the message says what to change
        sys.exit(f"compare_runs.py: error: {e}")
