"""Benchmark mode of tools/compare_runs.py: train each config for a few steps with the same
tokens per batch and the same attention kernel family, and compare throughput and memory.

The paper's cost claim (Sec. 4.2) is ALiBi at L=1024 vs sinusoidal at L=2048. Equal tokens per
step means micro_batch = tokens_per_batch / L for each; the kernel family is pinned for both
(`model.attention_backend`), or the ratio would measure kernels, not position methods
(docs/reference.md §3). Steps before --warmup are dropped (compilation, allocator warm-up).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.model.spec import resolve_backend
from pretrain.parallel import use_gpu
from pretrain.rundir import RunDir
from tools.jobs import ROOT, JobError, child_env, train_cmd
from tools.plotting import plot_bars

METRICS = [("tokens_per_s", "tokens/s"), ("step_time_s", "step time (s)"), ("peak_mem_gb", "peak memory (GB)"),
           ("tflops_per_gpu", "TFLOP/s per GPU"), ("mfu", "MFU")]


@dataclass
class BenchSpec:
    name: str
    config: Path
    seq_length: int


def device_name() -> str:
    if use_gpu():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_one(spec: BenchSpec, *, data: str, steps: int, tokens_per_batch: int, backend: str, out_dir: Path,
            overrides: list[str]) -> list[dict]:
    """Train `spec` for `steps` steps in a subprocess (as a user would); its metrics.jsonl records."""
    if tokens_per_batch % spec.seq_length:
        raise ValueError(f"--tokens-per-batch {tokens_per_batch} is not a multiple of {spec.name}'s L={spec.seq_length}")
    micro = tokens_per_batch // spec.seq_length
    run_dir, data = out_dir.resolve() / spec.name, str(Path(data).resolve())  # the trainer runs in the repo root
    RunDir(run_dir).metrics.unlink(missing_ok=True)  # a fresh measurement, not a resumed one
    cmd = train_cmd(spec.config, run_dir, data, "--steps", str(steps), "--seq-length", str(spec.seq_length),
                    "--micro-batch", str(micro), "--log-interval", "1", overrides=[
                        f"train.global_batch_size={micro}", f"model.attention_backend={backend}",
                        "validation.interval=0", "optim.warmup_steps=0", "wandb.enabled=false",
                        "checkpoint.enabled=false", *overrides])  # no checkpoint written or resumed
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT, env=child_env()).returncode:
        raise JobError(f"training {spec.name} failed (its error is printed above): {' '.join(cmd)}")
    return [r for r in RunDir(run_dir).records() if "loss" in r]


def summarize(spec: BenchSpec, records: list[dict], warmup: int, tokens_per_batch: int) -> dict:
    timed = [r for r in records if r["step"] > warmup]
    if not timed:
        raise ValueError(f"{spec.name}: no steps after --warmup {warmup}; run more --steps")
    mean = lambda k: statistics.fmean(r[k] for r in timed)  # noqa: E731
    cfg = load_config(spec.config)
    return {"name": spec.name, "position": cfg.model.position, "seq_length": spec.seq_length,
            "micro_batch": tokens_per_batch // spec.seq_length, "tokens_per_batch": tokens_per_batch,
            "steps_timed": len(timed), "step_time_s": mean("step_time_s"), "tokens_per_s": mean("tokens_per_s"),
            "tflops_per_gpu": mean("tflops_per_gpu"), "mfu": mean("mfu"),
            "peak_mem_gb": max(r["peak_mem_gb"] for r in timed)}


def benchmark(specs: list[BenchSpec], *, data: str, steps: int, warmup: int, tokens_per_batch: int,
              backend: str, out_dir: Path, overrides: list[str] = ()) -> dict:
    # the same kernel for every run (one that serves every config's position); "auto" resolved here, stated
    kernel = resolve_backend(backend, [load_config(s.config).model.position for s in specs])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [summarize(s, run_one(s, data=data, steps=steps, tokens_per_batch=tokens_per_batch, backend=kernel,
                                 out_dir=out_dir, overrides=list(overrides)), warmup, tokens_per_batch)
            for s in specs]
    base = rows[-1]
    ratios = {f"{r['name']} / {base['name']}": {k: (r[k] / base[k] if base[k] else None) for k, _ in METRICS}
              for r in rows[:-1]}
    report = {"device": device_name(), "attention_kernel": kernel, "steps": steps, "warmup_steps": warmup,
              "tokens_per_batch": tokens_per_batch, "rows": rows, "ratios": ratios}
    (out_dir / "benchmark.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "benchmark.md").write_text(markdown(report))
    plot_bars(rows, METRICS, out_dir / "benchmark.png",
              f"{report['device']}, kernel {kernel}, {tokens_per_batch} tokens/step")
    return report


def markdown(report: dict) -> str:
    head = "| run | position | L | micro-batch | tokens/s | step time (s) | peak mem (GB) | TFLOP/s/GPU | MFU |\n"
    head += "|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['name']} | {r['position']} | {r['seq_length']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | "
        f"{r['step_time_s']:.4f} | {r['peak_mem_gb']:.2f} | {r['tflops_per_gpu']:.2f} | {100 * r['mfu']:.1f}% |\n"
        for r in report["rows"])
    ratio = "".join(
        f"| {name} | | | | {v['tokens_per_s']:.3f}x | {v['step_time_s']:.3f}x | {v['peak_mem_gb']:.3f}x | "
        f"{v['tflops_per_gpu']:.3f}x | {v['mfu']:.3f}x |\n" for name, v in report["ratios"].items())
    return (f"Device: {report['device']}; attention kernel for all runs: {report['attention_kernel']}; "
            f"{report['tokens_per_batch']} tokens per step; mean over steps {report['warmup_steps'] + 1}.."
            f"{report['steps']}.\n\n" + head + body + ratio)
