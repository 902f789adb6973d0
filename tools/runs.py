"""Finished training runs, read from RUN_DIR/metrics.jsonl or a wandb offline run, and the
paper's cost comparison: wall-clock and GPU-hours to reach a validation perplexity at a given
evaluation length (Press et al. 2022, Sec. 4.2: ALiBi L=1024 vs sinusoidal L=2048 at 2048 tokens).

Time is training time, the integral of the logged `step_time_s` over steps: it leaves out
start-up, validation, checkpoints and queue gaps between requeued jobs, so runs compare on
what the position method changes. GPU-hours = hours x GPUs (GPUs = tokens_per_s /
tokens_per_s_per_gpu when logged, else --gpus).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.rundir import RunDir, read_metrics


@dataclass
class Run:
    name: str
    train: list[dict]
    """Training records sorted by step (a step logged twice, after a resume, keeps its last record)."""
    validation: list[dict]
    """Validation records {step, val/ppl_at_<n>: ppl}, sorted by step."""
    gpus: int = 1
    hours: dict[int, float] = field(default_factory=dict)
    """Cumulative training hours at each logged step."""

    def ppl_at(self, length: int) -> list[tuple[int, float]]:
        key = f"val/ppl_at_{length}"
        return [(r["step"], r[key]) for r in self.validation if key in r]

    def hours_at(self, step: int) -> float:
        """Training hours at `step`, interpolated between logged steps."""
        steps = sorted(self.hours)
        prev_s, prev_h = 0, 0.0
        for s in steps:
            if s >= step:
                return prev_h + (self.hours[s] - prev_h) * (step - prev_s) / max(s - prev_s, 1)
            prev_s, prev_h = s, self.hours[s]
        return prev_h


def read_run(path: str | Path, name: str | None = None, gpus: int | None = None) -> Run:
    """A run directory (metrics.jsonl, else its wandb/offline-run-*), a metrics.jsonl file, or a
    wandb offline run directory."""
    path = Path(path)
    run = RunDir(path)
    if path.is_file():
        records = read_metrics(path)
    elif run.metrics.is_file():
        records = run.records()
    else:
        files = sorted(path.glob("run-*.wandb")) or sorted(run.wandb.glob("offline-run-*/run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"{path}: no metrics.jsonl and no wandb offline run (run-*.wandb) in it")
        records = [r for f in files for r in read_wandb_history(f)]
    name = name or (path.parent.name if path.is_file() else path.name)
    by_step: dict[int, dict] = {}
    val: dict[int, dict] = {}
    no_loss = 0
    for r in records:
        if "step" not in r:
            continue
        if r.get("kind") == "validation" or any(k.startswith("val/ppl_at_") for k in r):
            val[int(r["step"])] = {**val.get(int(r["step"]), {}), **r}
        elif "loss" in r:
            if isinstance(r["loss"], (int, float)) and not isinstance(r["loss"], bool):
                by_step[int(r["step"])] = r
            else:
                no_loss += 1
    if no_loss:
        print(f"WARNING: {path}: {no_loss} training record(s) without a numeric loss (e.g. \"loss\": null) left out")
    train = [by_step[s] for s in sorted(by_step)]
    if not train:
        raise ValueError(f"{path}: no training records (lines with step and loss)")
    run = Run(name, train, [val[s] for s in sorted(val)])
    first = train[-1]
    if gpus is None and first.get("tokens_per_s_per_gpu"):
        gpus = round(first["tokens_per_s"] / first["tokens_per_s_per_gpu"])
    run.gpus = gpus or 1
    total, prev = 0.0, 0
    for r in train:  # each record's step_time_s stands for the steps since the previous record
        total += r.get("step_time_s", 0.0) * (r["step"] - prev) / 3600
        run.hours[r["step"]] = total
        prev = r["step"]
    return run


def run_names(paths: list[str | Path]) -> list[str]:
    """A distinct name per run: its directory's name (a metrics.jsonl file: its folder's), with
    as many parent folders as it takes to tell runs of the same folder name apart
    ("a/base", "b/base"). The same run given twice is refused."""
    dirs = [Path(p).resolve().parent if Path(p).is_file() else Path(p).resolve() for p in paths]
    seen: dict[Path, str] = {}
    for d, p in zip(dirs, paths):
        if d in seen:
            raise ValueError(f"{seen[d]} and {p} are the same run: give each run once")
        seen[d] = str(p)
    for depth in range(1, max(len(d.parts) for d in dirs) + 1):
        names = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in dirs]



def read_wandb_history(path: str | Path) -> list[dict]:
    """History rows of a wandb offline `.wandb` file (LevelDB-log framing of protobuf Records:
    7-byte file header, 32 KiB blocks, 7-byte record headers crc/length/type FULL|FIRST|MIDDLE|LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb  # here: compare_runs.py --help imports this module

    data, block, pos, buf, rows = Path(path).read_bytes(), 32768, 7, b"", []
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + n > len(data):  # a run still being written: stop at the last whole record
            break
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item})
    return rows


def compare(runs: list[Run], length: int, target: float | None = None) -> tuple[float, list[dict]]:
    """Rows of the comparison table at evaluation `length`. Default target: the worst of the
    runs' best perplexities at `length`, so that every run reaches it."""
    best = {r.name: min((p for _, p in r.ppl_at(length)), default=None) for r in runs}
    missing = [n for n, b in best.items() if b is None]
    if missing:
        have = sorted({k for r in runs for v in r.validation for k in v if k.startswith("val/ppl_at_")})
        raise ValueError(f"runs {missing} have no validation perplexity at {length} tokens (logged: {have}); "
                         "choose --eval-length among the lengths every run validated at")
    target = target if target is not None else max(best.values())
    rows = []
    for r in runs:
        hit = next((s for s, p in r.ppl_at(length) if p <= target), None)
        hours = r.hours_at(hit) if hit is not None else None
        last = r.train[-1]
        rows.append({
            "name": r.name, "gpus": r.gpus, "steps": last["step"], "final_loss": last["loss"],
            f"final_ppl_at_{length}": r.ppl_at(length)[-1][1], "target_ppl": target, "step_at_target": hit,
            "hours_to_target": hours, "gpu_hours_to_target": hours * r.gpus if hours is not None else None,
            "train_hours": r.hours[last["step"]], "tokens_per_s": last.get("tokens_per_s"),
            "peak_mem_gb": max((t.get("peak_mem_gb") or 0 for t in r.train), default=None),
        })
    fastest = min((row["gpu_hours_to_target"] for row in rows if row["gpu_hours_to_target"]), default=None)
    for row in rows:
        g = row["gpu_hours_to_target"]
        row["gpu_hours_vs_fastest"] = g / fastest if g and fastest else None
    return target, rows
