"""Elastic resume: the optimizer state by global parameter name, and what a layout change is.

A checkpoint's `optim/` holds, for every parameter, its fp32 master weight and both Adam moments
(`exp_avg`, `exp_avg_sq`) as the full tensor of one tensor-parallel rank, keyed by the global
parameter name of `pretrain/model/params.py`, with the partition dim per parameter: the same
layout-independent scheme as the model shards. So a run resumes on any data-, tensor- or
pipeline-parallel size and any ZeRO stage: each rank concatenates the saved TP parts of the
parameters it holds now along their partition dim and keeps its own slice.

    optim/tpXX_ppYY_dpZZ.safetensors    {"fp32/<name>", "exp_avg/<name>", "exp_avg_sq/<name>"}
                                        for the parameters of TP/PP shard (XX, YY) that
                                        data-parallel rank ZZ wrote (every dp-th one, so the
                                        writing is spread over the replicas); metadata: the
                                        parameter table (full shape, partition_dim), the Adam
                                        step count

The values come from DeepSpeed's tensor-fragment API (`deepspeed.utils.safe_get_full_fp32_param`,
`safe_get_full_optimizer_state` and the `safe_set_full_*` counterparts): one call per parameter
and state, the same for ZeRO-1/2, ZeRO-3 and the bf16 optimizer (a collective over the
data-parallel group); ZeRO-0 in fp32 has no wrapper (the parameter is its own master, torch's
AdamW holds the moments) and is read directly. Safetensors only: nothing here can run code.
Why not DeepSpeed's universal checkpoint or torch DCP: docs/design.md, "Elastic resume".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.config import Config, from_dict
from pretrain.layout import Layout

# megatron-core and DeepSpeed are imported where used: `train.py --dry-run` reaches this module
# (through pretrain.checkpoint) and checks a config without them (megatron-core alone takes seconds).

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
OPTIM_FILE = re.compile(r"optim/tp(\d+)_pp(\d+)_dp(\d+)\.safetensors")


class ReshardError(ValueError):
    """An optimizer-state file that cannot be used; the message says why (a CheckpointError subclass
    would import checkpoint.py, which imports this module: checkpoint.resume converts it)."""


# ---------------------------------------------------------------- layouts


def layout_record(layout: Layout, cfg: Config) -> dict[str, int]:
    """What meta.json records of the layout that wrote a checkpoint."""
    return {"world_size": layout.world_size, "tensor_parallel": layout.tp, "pipeline_parallel": layout.pp,
            "data_parallel": layout.dp, "zero_stage": cfg.parallel.zero_stage,
            "micro_batch_size": cfg.train.micro_batch_size}


def describe(record: dict, config: dict) -> str:
    """`world 2 = tp 1 x pp 1 x dp 2, ZeRO-1, micro-batch 2` for a layout record and the config of
    its run (records written before elastic resume lack dp and the micro-batch)."""
    if "data_parallel" not in record:
        cfg = from_dict(Config, config)
        record = {**record, "data_parallel": Layout.of(cfg, record["world_size"]).dp,
                  "micro_batch_size": cfg.train.micro_batch_size}
    return (f"world {record['world_size']} = tp {record['tensor_parallel']} x pp {record['pipeline_parallel']} x "
            f"dp {record['data_parallel']}, ZeRO-{record['zero_stage']}, micro-batch {record['micro_batch_size']}")


def has_optimizer_state(meta: dict) -> bool:
    """Whether a checkpoint holds the layout-independent optimizer state (optim/)."""
    return any(OPTIM_FILE.fullmatch(rel) for rel in meta["files"])


# ---------------------------------------------------------------- DeepSpeed's optimizer, whatever the stage


def _base(engine) -> torch.optim.Optimizer:
    """torch's AdamW (DeepSpeed's ZeRO and bf16 optimizers wrap it as `.optimizer`)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _flat_states(engine) -> list[torch.Tensor]:
    """The tensors torch's AdamW keeps state for: ZeRO-3's fp32 partitions (its param groups are
    emptied between steps), else the optimizer's parameters (ZeRO-1/2 and bf16: the flat fp32
    partitions; ZeRO-0 fp32: the model parameters)."""
    z3 = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    return list(z3) if z3 is not None else [p for g in _base(engine).param_groups for p in g["params"]]


def _ensure_state(engine) -> None:
    """Create AdamW's state where it has none yet (torch creates it at the first step: zeros, step
    0, exactly this), and (re)link DeepSpeed's per-parameter views into it: DeepSpeed 0.19.8's
    ZeRO-1/2 links them once, after the first param group's first step, when the other groups
    have no state yet, so their views stay empty (we have two groups: decay, no decay)."""
    base = _base(engine)
    group = base.param_groups[0]
    on_device = group.get("fused") or group.get("capturable")
    for flat in _flat_states(engine):
        if not base.state[flat]:
            base.state[flat].update(step=torch.tensor(0.0, device=flat.device if on_device else "cpu"),
                                    exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):  # views into the state: relinking is free
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def _wrapped(p: torch.Tensor) -> bool:
    """Whether DeepSpeed's fragment API knows `p` (ZeRO-3: ds_id; ZeRO-1/2, bf16: _hp_mapping)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _full_shape(p: torch.Tensor) -> list[int]:
    return list(p.ds_shape if hasattr(p, "ds_shape") else p.shape)


def _get(engine, p: torch.Tensor, key: str) -> torch.Tensor:
    """This TP rank's full fp32 value of `p`'s master weight or moment (collective over the
    data-parallel group for ZeRO-1/2/3 and bf16)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if not _wrapped(p):  # ZeRO-0 fp32
        return (p if key == "fp32" else _base(engine).state[p][key]).detach().float()
    value = safe_get_full_fp32_param(p) if key == "fp32" else safe_get_full_optimizer_state(p, key)
    return value.reshape(_full_shape(p))


def _set(engine, p: torch.Tensor, key: str, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not _wrapped(p):
        target = p.data if key == "fp32" else _base(engine).state[p][key]
        target.copy_(value)
    elif key == "fp32":
        safe_set_full_fp32_param(p, value.to(p.device))
    else:
        safe_set_full_optimizer_state(p, value.to(p.device), key)


def adam_step(engine) -> int:
    """Optimizer steps applied so far (torch's per-tensor `step`; skipped steps do not count)."""
    state = _base(engine).state.get(_flat_states(engine)[0], {})
    return int(state["step"]) if "step" in state else 0


# ---------------------------------------------------------------- save and load


def save(trainer, directory: Path) -> None:
    """Collective: write this rank's share of the optimizer state into `directory`/optim/."""
    from megatron.core import parallel_state as ps

    from pretrain.model.params import global_names, partition_dim

    engine = trainer.engine
    _ensure_state(engine)
    tp, dp, dp_rank = (ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size(),
                       ps.get_data_parallel_rank())
    names = global_names(trainer.gpt)
    tensors, table = {}, {}
    owned = [(names[n], p) for n, p in trainer.gpt.named_parameters() if not getattr(p, "ds_pipe_replicated", False)]
    for i, (name, p) in enumerate(owned):
        values = [_get(engine, p, key) for key in KEYS]  # every data-parallel rank takes part
        if i % dp != dp_rank:
            continue
        shape, dim = _full_shape(p), partition_dim(p)
        if dim is not None:
            shape[dim] *= tp
        table[name] = {"shape": shape, "partition_dim": dim}
        tensors.update({f"{key}/{name}": v.detach().cpu().contiguous() for key, v in zip(KEYS, values)})
    (directory / "optim").mkdir(exist_ok=True)
    path = directory / "optim" / (f"tp{ps.get_tensor_model_parallel_rank():02d}_pp"
                                  f"{ps.get_pipeline_model_parallel_rank():02d}_dp{dp_rank:02d}.safetensors")
    save_file(tensors, path, metadata={"table": json.dumps(table), "adam_step": str(adam_step(engine))})


class _Index:
    """Where each parameter's TP parts are among a checkpoint's optim/ files (read lazily)."""

    def __init__(self, ckpt: Path, rels: list[str]):
        self.files, self.table, self.parts, steps = [], {}, {}, set()
        for rel in rels:
            tp_rank = int(OPTIM_FILE.fullmatch(rel).group(1))
            try:
                f = safe_open(ckpt / rel, framework="pt", device="cpu")
                meta = f.metadata() or {}
                table, steps_here = json.loads(meta["table"]), int(meta["adam_step"])
                keys = set(f.keys())
            except Exception as e:  # SafetensorError, a missing table, bad JSON: a foreign or damaged file
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise ReshardError(f"{ckpt / rel}: not an optimizer state of ours ({type(e).__name__}: {first})") \
                    from None
            if keys != {f"{k}/{name}" for name in table for k in KEYS}:
                raise ReshardError(f"{ckpt / rel}: its tensors and its parameter table disagree")
            self.files.append(f)
            steps.add(steps_here)
            for name, rec in table.items():
                self.table[name] = rec
                self.parts.setdefault(name, {})[tp_rank] = f
        if len(steps) > 1:
            raise ReshardError(f"{ckpt}: optim/ files disagree on the Adam step ({sorted(steps)})")
        self.step = steps.pop() if steps else 0

    def value(self, name: str, key: str, tp: int, tp_rank: int) -> torch.Tensor:
        """The slice of `key` of parameter `name` that TP rank `tp_rank` of `tp` holds."""
        rec, parts = self.table[name], self.parts[name]
        dim = rec["partition_dim"]
        if dim is None:
            return next(iter(parts.values())).get_tensor(f"{key}/{name}")
        old_tp = len(parts)
        if sorted(parts) != list(range(old_tp)):
            raise ReshardError(f"{name}: optimizer state has TP parts {sorted(parts)}, expected 0..{old_tp - 1}")
        full = torch.cat([parts[r].get_tensor(f"{key}/{name}") for r in range(old_tp)], dim=dim)
        return full.chunk(tp, dim)[tp_rank]


def load(trainer, ckpt: Path, meta: dict) -> int:
    """Load the master weights, both Adam moments and the Adam step of every parameter this rank
    holds from `ckpt`'s optim/ files (any layout wrote them), then refresh the model's own
    (bf16 or partitioned) weights from the masters. Collective (the refresh all-gathers).
    Returns the Adam step."""
    from megatron.core import parallel_state as ps

    from pretrain.model.params import global_names

    engine = trainer.engine
    index = _Index(ckpt, sorted(rel for rel in meta["files"] if OPTIM_FILE.fullmatch(rel)))
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    _ensure_state(engine)
    names = global_names(trainer.gpt)
    for local, p in trainer.gpt.named_parameters():  # tied copies too: they carry the same state
        name = names[local]
        if name not in index.table:
            raise ReshardError(f"{ckpt}: no optimizer state for {name}: a partial checkpoint; use another one")
        rec, shape = index.table[name], _full_shape(p)
        if rec["partition_dim"] is not None:
            rec = {**rec, "shape": [n // tp if d == rec["partition_dim"] else n for d, n in enumerate(rec["shape"])]}
        if rec["shape"] != shape:
            raise ReshardError(f"{ckpt}: {name} has shape {rec['shape']} on this layout, the model {shape}: a "
                               "checkpoint of another model")
        if getattr(p, "_hp_mapping", True) is None:
            continue  # ZeRO-1/2, bf16: no fragment of p in this rank's partition, nothing to read
        for key in KEYS:
            value = index.value(name, key, tp, tp_rank)
            if list(value.shape) != shape:
                raise ReshardError(f"{ckpt}: {key} of {name} has shape {list(value.shape)}, its table "
                                   f"{rec['shape']}: a damaged file; use another checkpoint")
            _set(engine, p, key, value)
    for flat in _flat_states(engine):
        engine_state = _base(engine).state[flat]
        engine_state["step"].fill_(float(index.step))
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: partitioned weights from the masters
        for group in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(group)
    elif hasattr(opt, "update_lp_params"):  # ZeRO-1/2, bf16: weights from the masters, all-gathered
        opt.update_lp_params()
    return index.step
