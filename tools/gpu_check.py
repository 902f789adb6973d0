"""One GPU's check before a large allocation: 1.3B training speed, attention parity, kernel speed.

    python tools/gpu_check.py [--out DIR] [--deadline 540] [--stages ...] [--limit STAGE=S ...] [--plan] [--smoke]

Stages run in order of value, each as its own subprocess (a stall or crash costs that stage
only) under its own time limit, all under one global deadline (default 540 s: a 600 s command
keeps time for the summary); a stage that would start past it is skipped, one that reaches it is
cut there. Everything is on disk the moment it is measured: the stages' JSON, one log with every
stage's output, and gpu_check.json and summary.txt, rewritten after each stage; the attention
stage rewrites its JSON after every row. At most 6 files in DIR, no subfolder.

  train_alibi       tools/bench/train.py, 1.3B ALiBi at L=1024, micro-batch 16 (16,384 tokens per
                    step), bf16, the real DeepSpeed engine: tokens/s/GPU, TFLOP/s, MFU, peak memory
                    beside the --dry-run estimate
  train_sinusoidal  the same for 1.3B sinusoidal at L=2048, micro-batch 8 (the same tokens per step)
  tests             the gpu-marked tests: every fast attention kernel that can run here (flex,
                    flex-flash, fa2) vs the fp32-bias SDPA reference and a naive attention with the
                    TP rank's slopes, forward and backward, alone and in the model
  attention         tools/bench/attention.py at L=1024 and 2048: ALiBi kernels vs the fastest
                    no-bias one; a kernel that cannot run here is listed with the reason

--plan prints the stages, their limits and the expected total and runs nothing. --smoke runs
the same stages on the CPU with tiny configs (the test suite does, so this tool cannot rot
between GPU slots). docs/benchmarks.md says how to install the dependencies without network.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from data_prep.files import write_atomic
from pretrain.parallel import use_gpu
from tools.jobs import ROOT, child_env

PYTEST = ["-m", "pytest", "tests/model/test_model_flex.py", "-v", "-p", "no:cacheprovider",
          "-o", "addopts=-ra --import-mode=importlib"]  # path-restricted: no data-prep conftest (zstandard)
LOG, REPORT, SUMMARY = "gpu_check.log", "gpu_check.json", "summary.txt"
LOG_CAP = 15 * 2**20
"""The log is cut to its last 15 MiB at the end (files that come back from a GPU slot: < 16 MiB)."""
RESERVE_S = 15
"""Seconds of the deadline kept for the summary; a stage with less than MIN_STAGE_S left is skipped."""
MIN_STAGE_S = 20


NEEDS = {
    "megatron": "the model (every stage but attention's sdpa rows)", "deepspeed": "the training stages",
    "pytest": "the tests stage", "yaml": "the configs",
    # deepspeed 0.19.8 fails to import without each of these (checked by blocking them one at a time)
    "einops": "deepspeed", "msgpack": "deepspeed", "psutil": "deepspeed", "hjson": "deepspeed",
    "pydantic": "deepspeed", "tqdm": "deepspeed", "packaging": "deepspeed", "numpy": "deepspeed",
}
"""Third-party modules the stages import (top-level name -> what needs it)."""


def missing_modules() -> dict[str, str]:
    """The NEEDS not installed here (found without importing them)."""
    return {m: why for m, why in NEEDS.items() if importlib.util.find_spec(m) is None}


@dataclass(frozen=True)
class Stage:
    limit_s: int
    """Time limit with cold caches (first FlexAttention compiles, see expected_s)."""
    expected_s: int
    """Expected time on one H100/H200 from cold (docs/benchmarks.md: the assumptions)."""
    gpu: list[str]
    """Arguments after `python` on a GPU; "{out}" is the stage's JSON file."""
    smoke: list[str]
    """The same on the CPU, tiny."""


def _train(config: str, micro: int, *extra: str) -> list[str]:
    return ["-m", "tools.bench.train", "--config", f"configs/{config}.yaml", "--micro-batch", str(micro), *extra,
            "--out", "{out}"]


STAGES = {  # in order of value: a slot cut short keeps the most important numbers
    "train_alibi": Stage(200, 110, _train("gpt_1p3b_alibi_L1024", 16, "--steps", "6", "--warmup", "2"),
                         _train("tiny_alibi", 8, "--steps", "2", "--warmup", "1")),
    "train_sinusoidal": Stage(160, 90, _train("gpt_1p3b_sinusoidal_L2048", 8, "--steps", "6", "--warmup", "2"),
                              _train("tiny_sinusoidal", 4, "--steps", "2", "--warmup", "1", "model.seq_length=128")),
    "tests": Stage(200, 150, [*PYTEST, "-m", "gpu"], [*PYTEST, "-m", "not gpu and not slow"]),
    "attention": Stage(160, 120, ["-m", "tools.bench.attention", "--lengths", "1024", "2048", "--iters", "10",
                                  "--out", "{out}"],
                       ["-m", "tools.bench.attention", "--smoke", "--out", "{out}"]),
}


def run_stage(name: str, argv: list[str], limit_s: float, out: Path, env: dict[str, str]) -> dict:
    """Run one stage in its own process group, its output appended to the one log; kill the
    group at the time limit. Whatever it wrote to its JSON before is kept."""
    result_file = out / f"{name}.json"
    result_file.unlink(missing_ok=True)
    argv = [sys.executable, *(a.replace("{out}", str(result_file)) for a in argv)]
    t0 = time.monotonic()
    with open(out / LOG, "a") as log:
        log.write(f"\n===== {name} (limit {limit_s:.0f} s): {' '.join(argv)}\n")
        log.flush()
        start = log.tell()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout ({limit_s:.3g} s)"
    record = {"stage": name, "status": status, "seconds": round(time.monotonic() - t0, 1), "argv": argv[1:]}
    if result_file.exists():
        record["result"] = json.loads(result_file.read_text())
    with open(out / LOG, errors="replace") as log:
        log.seek(start)
        log_text = log.read()
    if name == "tests":
        record["result"] = {"summary": pytest_outcome(log_text)}
    if status != "ok":
        record["log_tail"] = log_text.splitlines()[-15:]
    return record


def pytest_outcome(log_text: str) -> str:
    """pytest's last summary line; after a time-out, the per-test lines counted so far."""
    summary = re.findall(r"^=+ (\d+ (?:passed|failed|skipped|error|deselected).*?) =+$", log_text, re.M)
    if summary:
        return summary[-1]
    counts = {w: len(re.findall(rf"::\S+ {w.upper()}\b", log_text)) for w in ("passed", "failed", "skipped", "error")}
    return ", ".join(f"{n} {w}" for w, n in counts.items() if n) + " before it stopped" if any(counts.values()) \
        else "no pytest result"


def describe(record: dict) -> str:
    """One line of numbers per stage for the summary table."""
    result = record.get("result")
    if not result:
        return "; ".join(record.get("log_tail", [])[-2:])[:160] or "no output"
    if record["stage"] == "tests":
        return result["summary"]
    if record["stage"].startswith("train"):
        r = result["results"][-1]
        return (f"L={r['seq_length']} micro {r['micro_batch_size']}: {r['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, "
                f"{r['tflops_per_gpu']:.1f} TFLOP/s, MFU {r['mfu']:.1%}, peak {r['peak_mem_gb']:.1f} GB "
                f"(estimate {r['estimate_gb']:.1f}), {r['precision']}, kernel {r['attention_kernel']}")
    rows = result["rows"]
    parts = []
    for L in sorted({r["L"] for r in rows}):  # ALiBi kernels only: T5 and KERPLE rows have their own method
        timed = [r for r in rows if r["L"] == L and r.get("method") == "alibi" and r.get("x_ceiling")]
        best = min(timed, key=lambda r: r["ms"], default=None)
        if best:
            family = f", {best['x_family']:.2f}x its no-bias twin" if best["x_family"] else ""
            parts.append(f"L={L}: fastest ALiBi {best['variant']} {best['x_ceiling']:.2f}x the ceiling{family}")
    skipped = sorted({r["variant"].partition("-")[2] for r in rows if "skipped" in r})
    if skipped:
        parts.append(f"not run here: {', '.join(skipped)} (reasons in {record['stage']}.json)")
    if not any(p.startswith("L=") for p in parts):
        parts.insert(0, "no timed fwd+bwd ALiBi variant (CPU smoke: flex runs forward only)")
    return f"{len(rows)} rows; " + "; ".join(parts)


def paper_comparison(records: dict[str, dict]) -> dict | None:
    """ALiBi at L vs sinusoidal at 2L at equal tokens per step (paper: ~11% faster, ~11% less memory)."""
    try:
        a, s = (records[n]["result"]["results"][-1] for n in ("train_alibi", "train_sinusoidal"))
    except (KeyError, IndexError):
        return None
    return {"tokens_per_step": [a["tokens_per_step"], s["tokens_per_step"]],
            "speed_ratio": a["tokens_per_s"] / s["tokens_per_s"], "memory_ratio": a["peak_mem_gb"] / s["peak_mem_gb"],
            "kernels": [a["attention_kernel"], s["attention_kernel"]]}


def summary_lines(device: str, torch_version: str, records: dict[str, dict]) -> list[str]:
    width = max((len(n) for n in records), default=5)
    lines = [f"summary ({device}, torch {torch_version}):"]
    for name, r in records.items():
        lines.append(f"  {name:<{width}}  {r['status']:<16} {r['seconds']:>6.0f} s  {describe(r)}")
    comparison = paper_comparison(records)
    if comparison:
        lines.append(f"  ALiBi L vs sinusoidal 2L at {comparison['tokens_per_step'][0]:,} tokens/step: tokens/s "
                     f"x{comparison['speed_ratio']:.3f}, peak memory x{comparison['memory_ratio']:.3f} (paper: ~1.11x "
                     f"faster, ~0.89x memory), kernels {'/'.join(comparison['kernels'])}")
    return lines


def cap_log(path: Path, cap: int = LOG_CAP) -> None:
    """Keep the log's last `cap` bytes (a file that comes back from a GPU slot must stay < 16 MiB)."""
    if path.exists() and path.stat().st_size > cap:
        with open(path, "rb") as f:
            f.seek(-cap, os.SEEK_END)
            tail = f.read()
        path.write_bytes(b"[... earlier output cut to keep this log under 16 MiB ...]\n" + tail)


def versions() -> dict[str, str | None]:
    """Installed versions of what the stages use (None: not installed; the stage then says why)."""
    out = {}
    for dist in ("torch", "triton", "transformers", "megatron-core", "deepspeed", "flash-attn", "flash-attn-4"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def parse_limits(items: list[str]) -> dict[str, float]:
    limits = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in STAGES or seconds <= 0:
            raise ValueError(f"--limit {item!r}: want STAGE=SECONDS with STAGE one of {', '.join(STAGES)} "
                             "and SECONDS > 0")
        limits[name] = seconds
    return limits


def plan(stages: list[str], limits: dict[str, float], deadline: float) -> list[str]:
    lines = [f"{'stage':<18}{'limit s':>8}{'expected s':>12}   (expected: one H100/H200, cold compile caches)"]
    for name in stages:
        lines.append(f"{name:<18}{limits.get(name, STAGES[name].limit_s):>8.0f}{STAGES[name].expected_s:>12}")
    expected = sum(STAGES[n].expected_s for n in stages)
    worst = sum(limits.get(n, STAGES[n].limit_s) for n in stages)
    lines.append(f"expected total {expected} s; every limit reached: {worst:.0f} s; global deadline {deadline:.0f} s "
                 f"({RESERVE_S} s of it kept for the summary): a stage is cut at the deadline, later ones skipped")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="gpu_check.json, summary.txt, one log, "
                    "each stage's JSON (at most 6 files)")
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="stages to run, in order")
    ap.add_argument("--deadline", type=float, default=540, help="seconds for the whole check, summary included")
    ap.add_argument("--limit", nargs="+", default=[], metavar="STAGE=S", help="override stages' time limits")
    ap.add_argument("--plan", action="store_true", help="print the stages, their limits and the expected total; run nothing")
    ap.add_argument("--smoke", action="store_true", help="the same stages on the CPU with tiny configs (seconds)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    try:
        limits = parse_limits(args.limit)
    except ValueError as e:
        ap.error(str(e))
    if args.plan:
        print("\n".join(plan(args.stages, limits, args.deadline)))
        return 0
    import torch  # not at the top: --help and --plan stay instant

    if not args.smoke and not use_gpu():
        ap.error("no CUDA GPU to check (or DS_ACCELERATOR is set to another accelerator); run on a GPU node, "
                 "or use --smoke for the CPU run")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in (LOG, REPORT, SUMMARY, *(f"{n}.json" for n in STAGES)):
        (args.out / name).unlink(missing_ok=True)
    # each stage is one process of its own: no rendezvous inherited from this process or a SLURM step
    env = {k: v for k, v in child_env().items() if k not in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               CUDA_DEVICE_MAX_CONNECTIONS="1")  # as slurm/pretrain_1p3b.sh: megatron's TP overlap needs it
    if args.smoke:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")  # the CPU, even on a GPU machine
    else:
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")  # one process: NCCL needs no network interface
    device = "CPU smoke" if args.smoke else torch.cuda.get_device_name()
    print(f"gpu_check: {device}, torch {torch.__version__}, stages {' '.join(args.stages)}, deadline "
          f"{args.deadline:.0f} s -> {args.out}", flush=True)
    missing = missing_modules()
    if missing:  # the stages that need them will fail: said first, the others still run
        print("gpu_check: not installed: " + ", ".join(f"{m} (for {why})" for m, why in missing.items())
              + "; install their wheels with --no-index --no-deps --target (docs/benchmarks.md)", flush=True)
    report = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "versions": versions(),
              "python": platform.python_version(), "smoke": args.smoke, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "missing": missing, "deadline_s": args.deadline, "stages": {}, "alibi_vs_sinusoidal": None}
    records = report["stages"]
    for name in args.stages:
        stage = STAGES[name]
        left = args.deadline - RESERVE_S - (time.monotonic() - t_start)
        if left < MIN_STAGE_S:
            records[name] = {"stage": name, "status": "skipped (deadline)", "seconds": 0.0}
        else:
            limit = min(limits.get(name, stage.limit_s), left)
            records[name] = run_stage(name, stage.smoke if args.smoke else stage.gpu, limit, args.out, env)
        report["alibi_vs_sinusoidal"] = paper_comparison(records)
        write_atomic(args.out / REPORT, json.dumps(report, indent=1) + "\n")
        write_atomic(args.out / SUMMARY, "\n".join(summary_lines(device, torch.__version__, records)) + "\n")
        print(f"  {name}: {records[name]['status']} in {records[name]['seconds']} s", flush=True)
    cap_log(args.out / LOG)
    print("\n" + "\n".join(summary_lines(device, torch.__version__, records)))
    print(f"wrote {args.out / REPORT}")
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
