"""The training loop: resume, step, log, validate, checkpoint, stop on a signal or on K bad steps.

It reads top to bottom; the pieces live in engine.py (the step), data.py (the batches),
checkpoint.py (save/resume), metrics.py (records) and perplexity.py (validation windows).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from pretrain.config import Config, ConfigError, to_dict
from pretrain.data import TrainingData
from pretrain.parallel import DistEnv, Layout, accelerator_device
from pretrain.stop import StopRequest


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. K non-finite losses in a row); a checkpoint was written."""


@dataclass(frozen=True)
class Plan:
    """What preflight established, passed on so nothing is read or checked twice."""

    layout: Layout
    data: TrainingData
    checkpoint: tuple[Path, dict] | None
    """The newest complete checkpoint of the run directory and its meta, or None (a fresh run)."""


def preflight(cfg: Config, env: DistEnv, run_dir: Path) -> Plan:
    """Every config, data and checkpoint error at once, before any process group exists."""
    from pretrain import checkpoint
    from pretrain.data import load_data

    errors, data, found = [], None, None
    try:
        cfg.validate(env.world_size)
    except ConfigError as e:
        errors += e.errors
    try:
        data = load_data(cfg)
    except ConfigError as e:
        errors += e.errors
    layout = Layout.of(cfg, env.world_size)
    if not errors and cfg.checkpoint.enabled:
        try:
            found = checkpoint.find_checkpoint(run_dir)
        except checkpoint.CheckpointError as e:
            errors.append(str(e))
        if found is not None:
            problems = checkpoint.compatibility_errors(found[1], cfg, data.tokenizer, layout)
            errors += [f"cannot resume {found[0]}: {p}; use a new --run-dir for a different model, "
                       "tokenizer or layout" for p in problems]
    if errors:
        raise ConfigError(errors)
    return Plan(layout, data, found)


def validate_ppl(trainer, cfg: Config, tokens: torch.Tensor) -> dict[int, float]:
    """Nonoverlapping perplexity at each multiple of L over all full windows of `tokens`, the
    same number in every layout. pp == 1: windows dealt round-robin to data-parallel ranks, NLL
    sums all-reduced. pp > 1: every pipeline replica scores all windows (DeepSpeed's eval
    schedule needs equal micro-batch counts per replica; validation is small)."""
    from megatron.core import parallel_state as ps

    from pretrain.perplexity import nonoverlapping_windows

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    out = {}
    for mult in cfg.validation.length_multipliers:
        length = mult * cfg.model.seq_length
        if tokens.numel() <= length:
            continue
        x, y = nonoverlapping_windows(tokens, length)  # [n, length] each
        if trainer.pp > 1:
            mean = trainer.pipeline_mean_nll([(x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])])
        else:
            # Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively),
            # each of exactly micro_batch_size windows (a compiled kernel sees one shape per
            # length): the slots past the last window repeat window 0 with weight 0.
            mb = cfg.train.micro_batch_size
            per_rank = -(-x.shape[0] // (dp * mb)) * mb
            idx = torch.arange(per_rank) * dp + dp_rank  # [per_rank]
            weight = (idx < x.shape[0]).double()
            idx = torch.where(idx < x.shape[0], idx, 0)
            total = torch.zeros(2, dtype=torch.float64, device=accelerator_device())
            for i in range(0, per_rank, mb):
                nll = trainer.nll(x[idx[i : i + mb]], y[idx[i : i + mb]]).double()  # [mb, length]
                w = weight[i : i + mb].to(nll.device)
                total[0] += (nll.sum(dim=1) * w).sum()
                total[1] += w.sum() * length
            dist.all_reduce(total, group=ps.get_data_parallel_group())
            mean = float(total[0] / total[1])
        out[length] = math.exp(mean)
    trainer.engine.train()
    return out


def train(cfg: Config, run_dir: Path, env: DistEnv, stop: StopRequest | None = None) -> int:
    from megatron.core import parallel_state as ps

    from pretrain import checkpoint, data
    from pretrain.engine import Trainer
    from pretrain.metrics import MetricsLogger, peak_memory_gb, throughput
    from pretrain.parallel import init_model_parallel
    from pretrain.schedule import lr_at

    plan = preflight(cfg, env, run_dir)
    layout, tokenizer = plan.layout, plan.data.tokenizer
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = stop or StopRequest()
    init_model_parallel(layout.tp, layout.pp, seed=cfg.train.seed, env=env)
    if env.rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    trainer = Trainer(cfg, layout)
    meta = checkpoint.resume(trainer, plan.checkpoint) or {}  # None without checkpoint.enabled
    step, bad_in_row, skipped = meta.get("step", 0), meta.get("bad_in_row", 0), meta.get("skipped_total", 0)
    reader = data.BatchReader(data.build_train_dataset(cfg, plan.data), cfg, ps.get_data_parallel_rank(),
                              ps.get_data_parallel_world_size())
    val_tokens = None
    if cfg.validation.interval:  # the first tokens of the first source's valid split
        first = plan.data.sources[0]
        val_tokens = data.split_tokens(first.path, "valid", cfg.validation.tokens, first.manifest)
    logger = MetricsLogger(cfg, run_dir, env.rank, step)
    logger.describe_run({"attention_kernel": trainer.attention_kernel, "device": accelerator_device(),
                         "precision": "bf16" if trainer.engine.bfloat16_enabled() else "fp32"})

    def save(at: int) -> None:
        if cfg.checkpoint.enabled:  # off for benchmarks: a 1.3B checkpoint is ~22 GB
            checkpoint.save_checkpoint(trainer, run_dir, at, {"bad_in_row": bad_in_row, "skipped_total": skipped},
                                       tokenizer)

    t_log, steps_since_log = time.time(), 0
    while step < cfg.train.steps:
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        result = trainer.train_step(reader.micro_batches(step), lr)
        step += 1
        steps_since_log += 1
        bad_in_row = bad_in_row + 1 if result.skipped else 0
        skipped += int(result.skipped)

        if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
            step_time = (time.time() - t_log) / steps_since_log
            logger.log({"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                        **throughput(cfg, layout, step_time), "peak_mem_gb": peak_memory_gb(),
                        "step_time_s": step_time, "skipped_steps": skipped,
                        "consumed_samples": step * cfg.train.global_batch_size})
            t_log, steps_since_log = time.time(), 0
        logger.progress(step, result.loss, lr)

        if val_tokens is not None and step % cfg.validation.interval == 0:
            logger.log_validation(step, validate_ppl(trainer, cfg, val_tokens))
            t_log = time.time()  # validation time is not step time

        if bad_in_row >= cfg.train.max_bad_steps:
            save(step)
            logger.close()
            where = (f"checkpoint written to {checkpoint.checkpoints_dir(run_dir)}" if cfg.checkpoint.enabled
                     else "no checkpoint (checkpoint.enabled=false)")
            raise TrainingError(
                f"{bad_in_row} non-finite losses in a row (train.max_bad_steps={cfg.train.max_bad_steps}) at "
                f"step {step}; {where}. Lower optim.lr, raise optim.warmup_steps or check the data, then "
                "resume from the checkpoint.")
        signum = stop.agreed()
        if signum or step % cfg.checkpoint.save_interval == 0 or step == cfg.train.steps:
            save(step)
        if signum:
            saved = "written" if cfg.checkpoint.enabled else "not written (checkpoint.enabled=false)"
            print(f"rank {env.rank}: signal {signal.Signals(signum).name}: checkpoint at step {step} {saved}, "
                  "exiting 0 for requeue", flush=True)
            break
    logger.close()
    return 0
