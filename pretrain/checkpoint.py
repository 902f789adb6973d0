"""Checkpoints: atomic save, keep-last-N, resume with fallback, and consolidation for tools.

Layout (one directory per checkpoint, written under a temporary name and renamed when every
rank has finished, so `latest` never names a partial checkpoint)::

    RUN_DIR/checkpoints/latest                    "step_00000100" (replaced atomically)
    RUN_DIR/checkpoints/step_00000100/
        meta.json                                 step, consumed samples, config, tokenizer,
                                                  layout, parameter table, file sizes
        model/tp00_pp00.pt                        {global name: tensor}: this TP/PP shard with
                                                  global layer numbers, full over ZeRO ranks
        ds/...                                    DeepSpeed engine state (model, optimizer)
        rng/rank00000.pt                          every RNG of that rank

`load_consolidated` merges the model files into the TP=1/PP=1 state dict with no process
group, using the partition dim recorded per parameter in meta.json.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import Config, from_dict, to_dict
from pretrain.parallel import Layout, accelerator_device

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "position",
                "bidirectional")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed by this run; the message says why and what to do."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------- save


def _model_shard(trainer) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """This rank's full (un-ZeRO'd) model shard by global name, and its parameter table."""
    from megatron.core import parallel_state as ps

    from pretrain.model.params import global_names, partition_dim

    tp = ps.get_tensor_model_parallel_world_size()
    names = global_names(trainer.gpt)
    tensors, table = {}, {}
    zero3 = trainer.cfg.parallel.zero_stage == 3
    for local, p in trainer.gpt.named_parameters():
        if getattr(p, "ds_pipe_replicated", False):
            continue  # the tied copy on the last stage; the first stage saves it
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                value = p.detach().cpu().clone()
        else:
            value = p.detach().cpu().clone()
        dim = partition_dim(p)
        shape = list(value.shape)
        if dim is not None:
            shape[dim] *= tp
        tensors[names[local]] = value
        table[names[local]] = {"shape": shape, "partition_dim": dim, "dtype": str(value.dtype)}
    return tensors, table


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        from megatron.core import tensor_parallel

        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(trainer, run_dir: str | Path, step: int, extra: dict[str, Any], tokenizer: dict) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    root = checkpoints_dir(run_dir)
    final = root / _step_name(step)
    tmp = root / f".tmp_{_step_name(step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        (tmp / "rng").mkdir()
    dist.barrier()

    trainer.engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    tensors, table = _model_shard(trainer)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    if ps.get_data_parallel_rank() == 0:
        torch.save({"tensors": tensors, "table": table}, tmp / "model" / f"tp{tp_rank:02d}_pp{pp_rank:02d}.pt")
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank:05d}.pt")
    dist.barrier()

    if rank == 0:
        cfg = trainer.cfg
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "consumed_samples": step * cfg.train.global_batch_size,
            "config": to_dict(cfg),
            "tokenizer": tokenizer,
            "layout": _layout_record(trainer.layout, cfg),
            **extra,
        }
        meta["files"] = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", final.name + "\n")
        _prune(root, cfg.checkpoint.keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- find and verify


def verify(ckpt: Path) -> dict:
    """meta.json of a complete checkpoint; raises CheckpointError if anything is missing or
    truncated (every file's size is recorded at save time)."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: unreadable meta.json ({e})") from e
    for rel, size in meta.get("files", {}).items():
        path = ckpt / rel
        if not path.is_file() or path.stat().st_size != size:
            have = path.stat().st_size if path.is_file() else "missing"
            raise CheckpointError(f"{ckpt}: {rel} is truncated or missing ({have} bytes, expected {size})")
    return meta


def find_checkpoint(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint: `latest` first, then older ones, newest first, with a
    warning for each one skipped. None if the run directory holds none."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return None
    candidates = sorted(root.glob("step_*"), reverse=True)
    latest = root / "latest"
    if latest.is_file():
        named = root / latest.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for ckpt in candidates:
        try:
            return ckpt, verify(ckpt)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s; falling back to the previous one", e)
            print(f"WARNING: skipping checkpoint: {e}; falling back to the previous one", flush=True)
    if candidates:
        raise CheckpointError(f"{root} holds checkpoints but none is complete: delete {root} to start over")
    return None


def _layout_record(layout: Layout, cfg: Config) -> dict[str, int]:
    return {"world_size": layout.world_size, "tensor_parallel": layout.tp, "pipeline_parallel": layout.pp,
            "zero_stage": cfg.parallel.zero_stage}


def compatibility_errors(meta: dict, cfg: Config, tokenizer: dict, layout: Layout) -> list[str]:
    """Why this run cannot resume `meta`'s checkpoint (empty list: it can)."""
    errors = []
    old = meta["config"]["model"]
    for name in SHAPE_FIELDS:
        if old.get(name) != getattr(cfg.model, name):
            errors.append(f"model.{name}: checkpoint has {old.get(name)!r}, this run {getattr(cfg.model, name)!r}")
    if meta["tokenizer"].get("sha256") != tokenizer.get("sha256"):
        errors.append(f"tokenizer: checkpoint trained with {meta['tokenizer'].get('path')} "
                      f"(sha256 {str(meta['tokenizer'].get('sha256'))[:12]}), this run's data uses "
                      f"{tokenizer.get('path')} (sha256 {str(tokenizer.get('sha256'))[:12]})")
    lay = meta["layout"]
    for k, v in _layout_record(layout, cfg).items():
        if lay[k] != v:
            errors.append(f"layout {k}: checkpoint has {lay[k]}, this run {v} (optimizer state is sharded by "
                          f"layout: resume with the same layout)")
    return errors


def resume(trainer, found: tuple[Path, dict] | None) -> dict | None:
    """Collective: load the checkpoint `found` (from `find_checkpoint`, checked by preflight on
    every rank) into `trainer` (model, optimizer, RNG) and return its meta (step,
    consumed_samples, counters), or None to start fresh. Every rank must have found the same one."""
    step = torch.tensor([-1 if found is None else found[1]["step"]] * 2, dtype=torch.int64, device=accelerator_device())
    step[1] = -step[1]
    dist.all_reduce(step, op=dist.ReduceOp.MAX)  # [max step, -min step] over ranks
    if step[0] != -step[1]:
        raise CheckpointError(f"ranks found different checkpoints (steps {-int(step[1])}..{int(step[0])}): "
                              "is another job writing this run directory? Give each run its own --run-dir")
    if found is None:
        return None
    ckpt, meta = found
    trainer.engine.load_checkpoint(str(ckpt), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=False)
    _set_rng_state(torch.load(ckpt / "rng" / f"rank{dist.get_rank():05d}.pt", weights_only=False))
    return meta


# ---------------------------------------------------------------- consolidation (tools)


def load_consolidated(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """(Config of the run, full TP=1/PP=1 GPTModel state dict) from a RUN_DIR (its latest
    complete checkpoint), a RUN_DIR/checkpoints dir, or one checkpoint dir. No process group
    needed: tensor-parallel shards are concatenated along the partition dim recorded for each
    parameter; pipeline stages already use global layer numbers. Keys are the parameter names
    of `build_model(cfg.model)` on one process (no `_extra_state` entries)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        ckpt, meta = path, verify(path)
    else:
        run_dir = path.parent if path.name == "checkpoints" else path
        found = find_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"no checkpoint under {path}: expected a run directory, its checkpoints/ "
                                    "directory, or a checkpoint directory holding meta.json")
        ckpt, meta = found
    cfg = from_dict(Config, meta["config"])
    shards: dict[str, dict[int, torch.Tensor]] = {}
    table: dict[str, dict] = {}
    for f in sorted((ckpt / "model").glob("tp*_pp*.pt")):
        tp_rank = int(f.name[2:4])
        data = torch.load(f, map_location="cpu", weights_only=False)
        for name, tensor in data["tensors"].items():
            shards.setdefault(name, {})[tp_rank] = tensor
            table[name] = data["table"][name]
    tp = meta["layout"]["tensor_parallel"]
    state = {}
    for name, parts in shards.items():
        dim = table[name]["partition_dim"]
        if dim is None:
            state[name] = parts[0]
        else:
            if sorted(parts) != list(range(tp)):
                raise CheckpointError(f"{ckpt}: {name} has TP shards {sorted(parts)}, expected 0..{tp - 1}")
            state[name] = torch.cat([parts[r] for r in range(tp)], dim=dim)
        if list(state[name].shape) != table[name]["shape"]:
            raise CheckpointError(f"{ckpt}: merged {name} has shape {list(state[name].shape)}, "
                                  f"expected {table[name]['shape']}")
    return cfg, state
