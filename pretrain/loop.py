"""The training loop: resume, step, log, validate, checkpoint, stop on a signal or on K bad steps.

It reads top to bottom; the pieces live in engine.py (the step), data.py (the batches),
checkpoint.py (save/resume), metrics.py (records) and perplexity.py (validation windows).
"""

from __future__ import annotations

import math
import netrc
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import psutil
import torch
import torch.distributed as dist

from pretrain import checkpoint, data, rundir
from pretrain.checkpoint import Found
from pretrain.config import Config, ConfigError, to_dict
from pretrain.data import TrainingData, load_data
from pretrain.layout import Layout
from pretrain.metrics import MetricsLogger, peak_memory_gb, throughput
from pretrain.parallel import DistEnv, accelerator_device, init_model_parallel
from pretrain.perplexity import nonoverlapping_windows
from pretrain.resume import Changes, layout_change, resume_changes
from pretrain.schedule import lr_at
from pretrain.rundir import RunDir
from pretrain.stop import StopRequest

if TYPE_CHECKING:  # imported where it is used: deepspeed and megatron stay out of --dry-run
    from pretrain.engine import Trainer


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. K non-finite losses in a row); a checkpoint was written."""


class PreflightError(ConfigError):
    """Config, data, run-directory and checkpoint problems found before any process group."""

    header = "cannot start"


@dataclass(frozen=True)
class Plan:
    """What preflight established, passed on so nothing is read or checked twice."""

    layout: Layout
    data: TrainingData
    checkpoints: Found
    """The run directory's checkpoints (sizes checked; `checkpoint.resume` checks the hashes)."""
    changes: Changes
    """How this run's config differs from the newest checkpoint's (empty for a fresh run)."""


def fingerprint(data: TrainingData) -> dict[str, str]:
    """What a checkpoint records of `data` (checkpoint.data_fingerprint), compared on resume."""
    return checkpoint.data_fingerprint({str(s.path): s.manifest for s in data.sources})


INDEX_BYTES_PER_SAMPLE = 40
"""megatron-core's in-memory sample indices per training sample, rounded up: the blend's dataset
index (int16 + int64), GPTDataset's sample index (2 x int64 at most) and shuffle index (int64);
its document index adds 4 bytes per document per epoch."""


def data_errors(cfg: Config) -> tuple[TrainingData | None, list[str]]:
    """The data checks of a run (train.py --dry-run --data makes the same): the manifests
    against the config (data.load_data), then whether megatron's sample indices for train.steps
    fit this machine's memory (they are built in memory on every rank)."""
    try:
        data = load_data(cfg)
    except ConfigError as e:
        return None, e.errors
    samples = cfg.train.steps * cfg.train.global_batch_size
    docs = sum(s.manifest["splits"]["train"]["documents"] for s in data.sources)
    tokens = sum(s.manifest["splits"]["train"]["tokens"] for s in data.sources)
    need = samples * (INDEX_BYTES_PER_SAMPLE + 4 * docs * (cfg.model.seq_length + 1) / max(tokens, 1))
    have = psutil.virtual_memory().total
    if need > have:
        return data, [f"train.steps={cfg.train.steps} x train.global_batch_size={cfg.train.global_batch_size} = "
                      f"{samples:,} samples: megatron's sample index for them needs about {need / 2**30:,.0f} GiB "
                      f"per rank, more than this machine's {have / 2**30:,.0f} GiB: lower train.steps"]
    return data, []


def runtime_errors(cfg: Config) -> list[str]:
    """What this machine or account lacks for the config: a GPU-only attention kernel on a CPU
    machine, wandb online without credentials."""
    from pretrain.model.attention import kernel_unavailable  # megatron: kept out of --dry-run, which imports loop
    from pretrain.parallel import use_gpu  # looked up per call: tests set parallel.use_gpu

    errors = []
    backend = cfg.model.attention_backend
    if backend not in ("auto", "sdpa") and not use_gpu():
        errors.append(f"model.attention_backend={backend} {kernel_unavailable(backend, gpu=False)}: this process "
                      "runs on the CPU; use model.attention_backend=auto (or sdpa)")
    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    if cfg.wandb.enabled and mode == "online" and not _wandb_credentials():
        errors.append("wandb.mode=online but no wandb credentials (no WANDB_API_KEY, no `wandb login` entry in "
                      "~/.netrc): run `wandb login`, or use wandb.mode=offline and `wandb sync` later")
    return errors


def _wandb_credentials() -> bool:
    """An API key in the environment or in the netrc file that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def preflight(cfg: Config, env: DistEnv, run_dir: Path, allow: tuple[str, ...] = ()) -> Plan:
    """Every config, data, run-directory and checkpoint error at once, before any process group
    exists. `allow`: config keys whose change on resume is accepted (--allow-config-change)."""
    from pretrain import checkpoint

    errors, found, changes = [], checkpoint.Found(), Changes()
    try:
        cfg.validate(env.world_size)
    except ConfigError as e:
        errors += e.errors
    data, more = data_errors(cfg)
    errors += more + runtime_errors(cfg)
    errors += RunDir(run_dir).link_errors()
    busy = RunDir(run_dir).holder()
    if busy is not None and not rundir.is_predecessor(busy):  # that one rank 0 waits for
        errors.append(rundir.busy_message(run_dir, busy))
    layout = Layout.of(cfg, env.world_size)
    if not errors and cfg.checkpoint.enabled:
        try:
            found = checkpoint.scan(run_dir)
        except checkpoint.CheckpointError as e:
            errors.append(str(e))
        if found.usable:
            ckpt, meta = found.usable[0]
            changes = resume_changes(meta, cfg, data.tokenizer, layout, allow, fingerprint(data))
            errors += [f"cannot resume {ckpt}: {p}" for p in changes.refused]
    if errors:
        raise PreflightError(errors)
    return Plan(layout, data, found, changes)


def dry_run_resume(cfg: Config, layout: Layout, run_dir: Path) -> None:
    """--dry-run: which checkpoint a start would resume, and its layout change (the memory table
    above is the new layout's); ConfigError if that change cannot be resumed on."""
    from pretrain import checkpoint

    if not cfg.checkpoint.enabled or not checkpoint.checkpoints_dir(run_dir).is_dir():
        return
    try:
        found = checkpoint.scan(run_dir)
    except checkpoint.CheckpointError as e:
        raise ConfigError([str(e)]) from None
    if found.usable:
        ckpt, meta = found.usable[0]
        line, problems = layout_change(meta, cfg, layout)
        print(f"\nwould resume {ckpt} at step {meta['step']}")
        print(f"  layout change: {line} (model and optimizer state resharded)" if line else "  same layout")
        if problems:
            raise ConfigError([f"cannot resume {ckpt}: {p}" for p in problems])


def validate_ppl(trainer, cfg: Config, tokens: torch.Tensor) -> dict[int, float]:
    """Nonoverlapping perplexity at each multiple of L over all full windows of `tokens`, the
    same number in every layout. pp == 1: windows dealt round-robin to data-parallel ranks, NLL
    sums all-reduced. pp > 1: every pipeline replica scores all windows (DeepSpeed's eval
    schedule needs equal micro-batch counts per replica; validation is small)."""
    from megatron.core import parallel_state as ps

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
    return out


def train(cfg: Config, run_dir: Path, env: DistEnv, stop: StopRequest | None = None,
          allow: tuple[str, ...] = ()) -> int:
    """Preflight, start the process group, lock the run directory, train (resuming from its
    newest verified checkpoint) to train.steps or a stop signal. Returns the exit code."""
    plan = preflight(cfg, env, run_dir, allow)
    layout = plan.layout
    stop = stop or StopRequest()
    init_model_parallel(layout.tp, layout.pp, seed=cfg.train.seed, env=env, timeout_s=cfg.train.dist_timeout_s)
    lock = _lock_run_dir(run_dir, env.rank)
    try:
        return _train(cfg, run_dir, env, stop, plan, allow)
    finally:
        lock.release()


def _lock_run_dir(run_dir: Path, rank: int) -> rundir.RunLock:
    """Rank 0 takes the run directory's lock; every rank learns the outcome (a refused start
    ends on every rank with the holder's name, before anything is written)."""
    lock, refused = RunDir(run_dir).lock(), [None]
    if rank == 0:
        try:
            lock.acquire()
        except rundir.RunDirError as e:
            refused[0] = str(e)
    dist.broadcast_object_list(refused, src=0)
    if refused[0]:
        raise rundir.RunDirError(refused[0])
    return lock


@dataclass
class Start:
    """Where this start of the step loop begins: built by `_start`, read by `_train`."""

    trainer: Trainer
    reader: data.BatchReader
    logger: MetricsLogger
    val_tokens: torch.Tensor | None
    """The validation stream (None: validation.interval is 0)."""
    step: int
    bad_in_row: int
    skipped: int
    last_ckpt: Path | None
    """The checkpoint resumed from (None: a fresh run)."""
    data_id: dict[str, str]
    """`fingerprint(plan.data)`, recorded in every checkpoint."""


def _start(cfg: Config, run_dir: Path, env: DistEnv, plan: Plan, allow: tuple[str, ...]) -> Start:
    """The set-up half of a start: the engine, its state from the newest checkpoint that loads
    (the config diff redone if that is an older one than preflight checked), the data reader at
    the checkpoint's sample, the validation tokens, config.yaml and the resume lines (rank 0),
    the metrics logger."""
    from megatron.core import parallel_state as ps

    from pretrain.engine import Trainer

    layout, tokenizer = plan.layout, plan.data.tokenizer
    trainer = Trainer(cfg, layout)
    resumed = checkpoint.resume(trainer, plan.checkpoints)  # None: a fresh run (or checkpoint.enabled off)
    data_id = fingerprint(plan.data)  # recorded in every checkpoint, compared on a fallback resume
    changes, meta = plan.changes, {}
    if resumed is not None:
        ckpt, meta = resumed
        if ckpt != plan.checkpoints.usable[0][0]:  # fell back: the diff is against another checkpoint
            changes = resume_changes(meta, cfg, tokenizer, layout, allow, data_id)
            if changes.refused:
                raise checkpoint.CheckpointError("; ".join(f"cannot resume {ckpt}: {p}" for p in changes.refused))
    step, bad_in_row, skipped = meta.get("step", 0), meta.get("bad_in_row", 0), meta.get("skipped_total", 0)
    origin = (step, meta.get("consumed_samples", 0))
    reader = data.BatchReader(data.build_train_dataset(cfg, plan.data, origin), cfg, ps.get_data_parallel_rank(),
                              ps.get_data_parallel_world_size(), origin)
    val_tokens = None
    if cfg.validation.interval:  # the first tokens of the first source's valid split
        first = plan.data.sources[0]
        val_tokens = data.split_tokens(first.path, "valid", cfg.validation.tokens, first.manifest)
    if env.rank == 0:
        history = RunDir(run_dir).write_config(to_dict(cfg), step)
        if resumed is not None:
            print(f"resumed from {resumed[0]} at step {step}", flush=True)
            if changes.layout:
                print(f"  layout change: {changes.layout} (model and optimizer state resharded)", flush=True)
            for line in changes.accepted:
                print(f"  config change: {line}", flush=True)
        if history is not None and step > 0:
            print(f"  config history: {history}", flush=True)
    logger = MetricsLogger(cfg, run_dir, env.rank, step)
    logger.describe_run({"attention_kernel": trainer.attention_kernel, "device": accelerator_device(),
                         "precision": trainer.precision})
    last_ckpt = resumed[0] if resumed is not None else None
    return Start(trainer, reader, logger, val_tokens, step, bad_in_row, skipped, last_ckpt, data_id)


def _train(cfg: Config, run_dir: Path, env: DistEnv, stop: StopRequest, plan: Plan, allow: tuple[str, ...]) -> int:
    """Train from where `_start` left off to train.steps, a stop signal, or K bad steps in a row."""
    s = _start(cfg, run_dir, env, plan, allow)
    trainer, reader, logger, val_tokens, data_id = s.trainer, s.reader, s.logger, s.val_tokens, s.data_id
    layout, tokenizer = plan.layout, plan.data.tokenizer
    step, bad_in_row, skipped, last_ckpt = s.step, s.bad_in_row, s.skipped, s.last_ckpt
    start_step = step

    def save(at: int) -> None:
        nonlocal last_ckpt
        if not cfg.checkpoint.enabled:  # off for benchmarks: a 1.3B checkpoint is ~19 GB
            return
        last_ckpt = checkpoint.save_checkpoint(
            trainer, run_dir, at, {"bad_in_row": bad_in_row, "skipped_total": skipped,
                                   "consumed_samples": reader.sample_at(at), "data": data_id}, tokenizer)
        logger.console(f"step {at}: checkpoint {last_ckpt}")
        if bad_in_row:
            logger.warn(f"step {at}: checkpoint {last_ckpt.name} was written while diverging ({bad_in_row} "
                        f"non-finite losses in a row); {_last_good(run_dir)}")

    t_start = t_log = time.time()
    steps_since_log = 0
    while step < cfg.train.steps:
        lr = lr_at(step, cfg.optim, cfg.train.steps)  # a function of the step: a resume needs no scheduler state
        result = trainer.train_step(reader.micro_batches(step), lr)  # a non-finite loss anywhere: update skipped
        step += 1
        steps_since_log += 1
        bad_in_row = bad_in_row + 1 if result.skipped else 0
        skipped += int(result.skipped)

        # Reading result.grad_norm waits for the GPU: done only on the steps that log.
        if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
            step_time = (time.time() - t_log) / steps_since_log
            logger.log({"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                        **throughput(cfg, layout, step_time), "peak_mem_gb": peak_memory_gb(),
                        "step_time_s": step_time, "skipped_steps": skipped,
                        "consumed_samples": reader.sample_at(step)})
            t_log, steps_since_log = time.time(), 0
        logger.progress(step, result.loss, lr)

        if val_tokens is not None and step % cfg.validation.interval == 0:
            logger.log_validation(step, validate_ppl(trainer, cfg, val_tokens))
            t_log = time.time()  # validation time is not step time

        if bad_in_row >= cfg.train.max_bad_steps:
            save(step)
            logger.close(_summary(cfg, start_step, step, t_start, last_ckpt, logger))
            where = (f"checkpoint written to {checkpoint.checkpoints_dir(run_dir)}; {_last_good(run_dir)}"
                     if cfg.checkpoint.enabled else "no checkpoint (checkpoint.enabled=false)")
            raise TrainingError(
                f"{bad_in_row} non-finite losses in a row (train.max_bad_steps={cfg.train.max_bad_steps}) at "
                f"step {step}; {where}. Lower optim.lr, raise optim.warmup_steps or check the data, then "
                "resume from the checkpoint.")
        signum = stop.agreed()  # any rank's signal, agreed by all: every rank stops after this same step
        if signum or step % cfg.checkpoint.save_interval == 0 or step == cfg.train.steps:
            save(step)
        if signum:
            saved = "written" if cfg.checkpoint.enabled else "not written (checkpoint.enabled=false)"
            then = "run the same command to resume" if signum == signal.SIGINT else "for requeue"
            print(f"rank {env.rank}: signal {signal.Signals(signum).name}: checkpoint at step {step} {saved}, "
                  f"exiting 0 ({then})", flush=True)
            break
    logger.close(_summary(cfg, start_step, step, t_start, last_ckpt, logger))
    return 0


def _last_good(run_dir: Path) -> str:
    """Which checkpoint is the last good one (written before the run diverged), for the messages."""
    good = checkpoint.last_good(checkpoint.checkpoints_dir(run_dir))
    return (f"the last good checkpoint (before the non-finite losses) is {good}, kept while the run "
            "diverges" if good else "no checkpoint was written before the non-finite losses")


def _summary(cfg: Config, start: int, step: int, t_start: float, last_ckpt: Path | None, logger) -> str:
    """The closing lines: steps, tokens and time of this start, the last checkpoint, the best
    validation perplexity at each length over the run."""
    tokens = (step - start) * cfg.train.global_batch_size * cfg.model.seq_length
    lines = [f"summary: steps {start} -> {step} of {cfg.train.steps} ({step - start} this start, {tokens:,} tokens, "
             f"{time.time() - t_start:.1f} s)", f"  last checkpoint: {last_ckpt or 'none'}"]
    best = logger.best_validation()
    if best:
        lines.append("  best validation perplexity: " + ", ".join(
            f"{ppl:.3f} at {length} (step {at})" for length, (ppl, at) in sorted(best.items())))
    return "\n".join(lines)
