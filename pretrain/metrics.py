"""Training metrics: model FLOPs and MFU, RUN_DIR/metrics.jsonl, wandb (offline by default), and a
console progress bar. Only global rank 0 writes; every record is also one JSON line so
tools/compare_runs.py can read a run without wandb.

metrics.jsonl's format, its writer (one whole line per record) and its one reader are
pretrain/rundir.py's (`RunDir`); the tools read it there.

MFU (docs/mfu.md): model FLOPs per token, the convention of PaLM (Chowdhery et al. 2022, App. B)
and MPT's llm-foundry, so numbers compare with the MPT-1b anchor:
    6 * N + 12 * n_layers * d_model * L
N = weight-matrix parameters (layers + embedding/logit matrix), L = training length; the second
term is attention's QK^T and AV (4 * L * d fwd per token per layer, x3 for fwd+bwd), counted as
full (non-causal) matrices. Recomputation (activation checkpointing) is not counted.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pretrain.config import Config, to_dict
from pretrain.layout import Layout
from pretrain.parallel import use_gpu
from pretrain.rundir import MetricsFile, RunDir

log = logging.getLogger(__name__)


def flops_per_token(cfg: Config, seq_length: int | None = None) -> float:
    """Training (fwd + bwd) model FLOPs per token."""
    m = cfg.model
    s = seq_length or m.seq_length
    matrices = m.num_layers * (4 * m.hidden_size**2 + 2 * m.hidden_size * m.ffn_hidden_size)
    matrices += m.vocab_size * m.hidden_size  # logit projection (the tied embedding lookup is free)
    return 6.0 * matrices + 12.0 * m.num_layers * m.hidden_size * s


def throughput(cfg: Config, layout: Layout, step_time_s: float) -> dict[str, float]:
    """tokens/s (whole job), TFLOP/s per GPU and MFU for one optimizer step of `step_time_s`."""
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    tokens_per_s = tokens / step_time_s
    tflops = flops_per_token(cfg) * tokens_per_s / layout.world_size / 1e12
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / layout.world_size,
        "tflops_per_gpu": tflops,
        "mfu": tflops / cfg.hardware.peak_tflops,
    }


def peak_memory_gb() -> float:
    """Peak accelerator memory (GPU), else the process's peak resident set (CPU)."""
    if use_gpu():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


class MetricsLogger:
    """Writes metrics.jsonl, wandb, a tqdm bar and console lines on rank 0; a no-op elsewhere."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int, start_step: int):
        self.enabled = rank == 0
        self.file: MetricsFile | None = None
        self.run = None
        self.run_info: dict[str, Any] = {}
        self.val_history: list[tuple[int, dict[int, float]]] = []
        self.bar = None
        if not self.enabled:
            return
        run = RunDir(run_dir)
        self.file = run.open_metrics()
        if self.file.cut:
            print(f"{self.file.path}: removed a torn last line ({self.file.cut} bytes, a write cut short by a kill or "
                  "a full disk)", flush=True)
        self.val_history = _validations(run, start_step)
        w = cfg.wandb
        mode = os.environ.get("WANDB_MODE", w.mode)
        if w.enabled and mode != "disabled":
            import wandb  # here, not at the top: about 1 s, paid only by runs that log to wandb

            self.run = wandb.init(
                project=w.project,
                name=w.name or Path(run_dir).name,
                group=w.group or None,
                tags=list(w.tags) or None,
                dir=str(run_dir),
                mode=mode,
                config=to_dict(cfg),
                id=run.wandb_run_id(),
                resume="allow",
            )
            # One chart for the extrapolation curve: every val/ppl_at_* shares the x axis.
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
        # In a log file (SLURM), not a terminal: an ASCII bar (the console lines on stdout share the
        # file, and a multi-byte bar character cut by them is not UTF-8) redrawn once a minute.
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", dynamic_ncols=True,
                        mininterval=1.0 if tty else 60.0, ascii=not tty)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self._write({**record, **self.run_info})
        if self.run is not None:
            self.run.log(record)

    def _write(self, record: dict[str, Any]) -> None:
        """One line, whole or not at all: a failed write is cut back to the last complete line (a
        full disk leaves no torn record; the checkpoint save then stops the run with its message)."""
        try:
            self.file.append(record)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.warn(f"{self.file.path}: the record of step {record.get('step')} was not written ({e.strerror})")

    def describe_run(self, info: dict[str, Any]) -> None:
        """What this run runs on (device, precision, attention kernel): added to every training
        record of metrics.jsonl (a requeued job may land elsewhere) and to the wandb run's config."""
        self.run_info = dict(info)
        if self.run is not None:
            self.run.config.update(info, allow_val_change=True)

    def log_validation(self, step: int, ppl: dict[int, float]) -> None:
        """ppl: {length: perplexity}. To metrics.jsonl as `val/ppl_at_<length>`, and to wandb as one
        chart: a line per evaluation length (L, 2L, 4L) over training steps, redrawn each time, so
        the extrapolation gap is visible while the run trains."""
        if not self.enabled:
            return
        record = {"step": step, "kind": "validation", **{f"val/ppl_at_{n}": p for n, p in ppl.items()}}
        self._write({"time": time.time(), **record})
        self.val_history.append((step, dict(ppl)))
        self.console(f"step {step}: validation perplexity " + ", ".join(f"{p:.3f} at {n}" for n, p in sorted(ppl.items())))
        if self.run is not None:
            import wandb

            lengths = sorted(ppl)
            record["val/extrapolation"] = wandb.plot.line_series(
                xs=[s for s, _ in self.val_history],
                ys=[[h.get(n, float("nan")) for _, h in self.val_history] for n in lengths],
                keys=[f"ppl@{n}" for n in lengths],
                title="validation perplexity at L, 2L, 4L",
                xname="step",
            )
            self.run.log(record)

    def progress(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.refresh()

    def console(self, line: str) -> None:
        """A line on stdout (above the progress bar), rank 0 only."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
        sys.stdout.flush()

    def warn(self, line: str) -> None:
        """A warning on the console (rank 0) and in the log."""
        if self.enabled:
            log.warning(line)
            self.console(f"WARNING: {line}")

    def best_validation(self) -> dict[int, tuple[float, int]]:
        """{length: (lowest validation perplexity, its step)} over the run so far."""
        best: dict[int, tuple[float, int]] = {}
        for step, ppl in self.val_history:
            for n, p in ppl.items():
                if math.isfinite(p) and (n not in best or p < best[n][0]):
                    best[n] = (p, step)
        return best

    def close(self, summary: str = "") -> None:
        if not self.enabled or self.file is None:
            return
        self.file.close()
        self.file = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if summary:
            self.console(summary)
        if self.run is not None:
            self.run.finish()


def _validations(run: RunDir, upto: int) -> list[tuple[int, dict[int, float]]]:
    """The validation records of an earlier start of this run, up to the step it resumes from
    (later ones belong to steps that will be trained again). A damaged file gives a warning, not
    a refusal: the history is only the summary's best perplexity."""
    try:
        records = run.records()
    except ValueError as e:
        log.warning(str(e))
        print(f"WARNING: {e}; earlier validation records are left out of the summary", flush=True)
        return []
    return [(r["step"], {int(k.rsplit("_", 1)[1]): v for k, v in r.items() if k.startswith("val/ppl_at_")})
            for r in records if r.get("kind") == "validation" and r.get("step", upto + 1) <= upto]
