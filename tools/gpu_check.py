"""One GPU's check before a large allocation: attention parity, kernel speed, 1.3B training speed.

    python tools/gpu_check.py [--out DIR] [--stages tests train_alibi train_sinusoidal attention] [--smoke]

Each stage runs as its own subprocess under its own time limit (a stall costs that stage only),
logs to DIR/<stage>.log and leaves its numbers in DIR/<stage>.json; the summary table comes
last and everything is collected in DIR/gpu_check.json. On one H100/H200 the four stages take
under 8 minutes in all (limits 150 + 120 + 120 + 90 s):

  tests             the gpu-marked tests: every installed fast attention kernel (flex, flex-flash,
                    fa2) vs the fp32-bias SDPA reference and a naive attention with the TP rank's
                    slopes, forward and backward, alone and in the model
  train_alibi       tools/bench/train.py, 1.3B ALiBi at L=1024, micro-batch 16 (16,384 tokens per
                    step), bf16, the real DeepSpeed engine: tokens/s/GPU, TFLOP/s, MFU, peak memory
                    beside the --dry-run estimate
  train_sinusoidal  the same for 1.3B sinusoidal at L=2048, micro-batch 8 (the same tokens per step)
  attention         tools/bench/attention.py at L=1024 and 2048: ALiBi kernels vs the fastest no-bias one

--smoke runs the same stages on the CPU with tiny configs (seconds; the test suite does, so this
tool cannot rot between GPU slots). docs/benchmarks.md says how to run it without network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tools.jobs import ROOT, child_env

PYTEST = ["-m", "pytest", "tests/model/test_model_flex.py", "-q", "-p", "no:cacheprovider",
          "-o", "addopts=-ra --import-mode=importlib"]  # path-restricted: no data-prep conftest (zstandard)


@dataclass(frozen=True)
class Stage:
    limit_s: int
    gpu: list[str]
    """Arguments after `python` on a GPU; "{out}" is the stage's JSON file."""
    smoke: list[str]
    """The same on the CPU, tiny."""


def _train(config: str, micro: int, *extra: str) -> list[str]:
    return ["-m", "tools.bench.train", "--config", f"configs/{config}.yaml", "--micro-batch", str(micro), *extra,
            "--out", "{out}"]


STAGES = {
    "tests": Stage(150, [*PYTEST, "-m", "gpu"], [*PYTEST, "-m", "not gpu and not slow"]),
    "train_alibi": Stage(120, _train("gpt_1p3b_alibi_L1024", 16, "--steps", "6", "--warmup", "2"),
                         _train("tiny_alibi", 8, "--steps", "2", "--warmup", "1")),
    "train_sinusoidal": Stage(120, _train("gpt_1p3b_sinusoidal_L2048", 8, "--steps", "6", "--warmup", "2"),
                              _train("tiny_sinusoidal", 4, "--steps", "2", "--warmup", "1", "model.seq_length=128")),
    "attention": Stage(90, ["-m", "tools.bench.attention", "--lengths", "1024", "2048", "--iters", "10",
                            "--out", "{out}"],
                       ["-m", "tools.bench.attention", "--smoke", "--out", "{out}"]),
}


def run_stage(name: str, stage: Stage, out: Path, smoke: bool, env: dict[str, str]) -> dict:
    """Run one stage in its own process group; kill the group at the time limit."""
    result_file = out / f"{name}.json"
    result_file.unlink(missing_ok=True)
    argv = [sys.executable, *(a.replace("{out}", str(result_file)) for a in (stage.smoke if smoke else stage.gpu))]
    t0 = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        log.write("+ " + " ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=stage.limit_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout ({stage.limit_s} s)"
    record = {"stage": name, "status": status, "seconds": round(time.monotonic() - t0, 1), "argv": argv[1:]}
    if result_file.exists():
        record["result"] = json.loads(result_file.read_text())
    log_text = (out / f"{name}.log").read_text()
    if name == "tests":
        outcome = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", log_text, re.M)
        record["result"] = {"summary": outcome[-1] if outcome else "no pytest summary"}
    if status != "ok":
        record["log_tail"] = log_text.splitlines()[-15:]
    return record


def describe(record: dict) -> str:
    """One line of numbers per stage for the summary table."""
    result = record.get("result")
    if not result:
        return "; ".join(record.get("log_tail", [])[-2:])[:160]
    if record["stage"] == "tests":
        return result["summary"]
    if record["stage"].startswith("train"):
        r = result["results"][-1]
        return (f"L={r['seq_length']} micro {r['micro_batch_size']}: {r['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, "
                f"{r['tflops_per_gpu']:.1f} TFLOP/s, MFU {r['mfu']:.1%}, peak {r['peak_mem_gb']:.1f} GB "
                f"(estimate {r['estimate_gb']:.1f}), {r['precision']}, kernel {r['attention_kernel']}")
    parts = []
    for L in sorted({r["L"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["L"] == L and "error" not in r and r["alibi"] and r["x_ceiling"]]
        best = min(rows, key=lambda r: r["ms"], default=None)
        if best:
            family = f", {best['x_family']:.2f}x its no-bias twin" if best["x_family"] else ""
            parts.append(f"L={L}: fastest ALiBi {best['variant']} {best['x_ceiling']:.2f}x the ceiling{family}")
    return "; ".join(parts) or "no timed fwd+bwd ALiBi variant (CPU smoke: flex runs forward only)"


def paper_comparison(records: dict[str, dict]) -> dict | None:
    """ALiBi at L vs sinusoidal at 2L at equal tokens per step (paper: ~11% faster, ~11% less memory)."""
    try:
        a, s = (records[n]["result"]["results"][-1] for n in ("train_alibi", "train_sinusoidal"))
    except (KeyError, IndexError):
        return None
    return {"tokens_per_step": [a["tokens_per_step"], s["tokens_per_step"]],
            "speed_ratio": a["tokens_per_s"] / s["tokens_per_s"], "memory_ratio": a["peak_mem_gb"] / s["peak_mem_gb"],
            "kernels": [a["attention_kernel"], s["attention_kernel"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="logs, per-stage JSON and gpu_check.json")
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="stages to run, in order")
    ap.add_argument("--smoke", action="store_true", help="the same stages on the CPU with tiny configs (seconds)")
    args = ap.parse_args(argv)
    import torch

    from pretrain.parallel import use_gpu

    if not args.smoke and not use_gpu():
        ap.error("no CUDA GPU to check (or DS_ACCELERATOR is set to another accelerator); run on a GPU node, "
                 "or use --smoke for the CPU run")
    args.out.mkdir(parents=True, exist_ok=True)
    # each stage is one process of its own: no rendezvous inherited from this process or a SLURM step
    env = {k: v for k, v in child_env().items() if k not in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if args.smoke:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")  # the CPU, even on a GPU machine
    else:
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")  # one process: NCCL needs no network interface
    device = "CPU smoke" if args.smoke else torch.cuda.get_device_name()
    print(f"gpu_check: {device}, torch {torch.__version__}, stages {' '.join(args.stages)} -> {args.out}", flush=True)
    records = {}
    for name in args.stages:
        records[name] = run_stage(name, STAGES[name], args.out, args.smoke, env)
        print(f"  {name}: {records[name]['status']} in {records[name]['seconds']} s", flush=True)
    comparison = paper_comparison(records)
    report = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(), "smoke": args.smoke, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages": records,
              "alibi_vs_sinusoidal": comparison}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")

    width = max(len(n) for n in records)
    print(f"\nsummary ({device}, torch {torch.__version__}):")
    for name, r in records.items():
        print(f"  {name:<{width}}  {r['status']:<16} {r['seconds']:>6.0f} s  {describe(r)}")
    if comparison:
        print(f"  ALiBi L vs sinusoidal 2L at {comparison['tokens_per_step'][0]:,} tokens/step: tokens/s "
              f"x{comparison['speed_ratio']:.3f}, peak memory x{comparison['memory_ratio']:.3f} (paper: ~1.11x faster, "
              f"~0.89x memory), kernels {'/'.join(comparison['kernels'])}")
    print(f"wrote {args.out / 'gpu_check.json'}")
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
