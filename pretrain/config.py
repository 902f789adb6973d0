"""One typed config tree, loaded from YAML with dotted overrides.

Every section is a keyword-only dataclass; unknown keys are rejected, and every
cross-field error is collected and reported together with its fix
(`Config.validate`). Nothing here touches torch.distributed or a GPU, so a
128-GPU layout can be checked on a laptop.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Position = Literal["alibi", "sinusoidal", "rope", "none"]
AttentionBackend = Literal["auto", "sdpa", "flex"]


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem with its fix."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))


@dataclass(kw_only=True)
class ModelConfig:
    num_layers: int
    """Transformer blocks."""
    hidden_size: int
    """d_model."""
    num_attention_heads: int
    """Global head count (ALiBi slopes are computed from this, never the per-rank count)."""
    ffn_hidden_size: int
    """MLP inner width (4 x hidden_size in the MPT-style block)."""
    vocab_size: int
    """Embedding rows; must cover the tokenizer's vocabulary (a multiple of 128 is fastest)."""
    seq_length: int
    """Training length L."""
    position: Position
    """alibi | sinusoidal | rope | none."""
    attention_backend: AttentionBackend = "auto"
    """auto: FlexAttention on a GPU, SDPA with a float bias elsewhere."""
    bidirectional: bool = False
    """Encoder mode: symmetric ALiBi -m|i-j| and no causal mask."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm eps (no bias, MPT-style)."""
    init_method_std: float = 0.02
    """Std of the normal init of linear weights."""
    rotary_base: int = 10000
    """RoPE base (position: rope only)."""


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel: int = 1
    """TP degree; must divide num_attention_heads."""
    pipeline_parallel: int = 1
    """PP degree; must divide num_layers."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3; 2 and 3 need pipeline_parallel == 1."""


@dataclass(kw_only=True)
class Config:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError listing every problem, each with its fix."""
        errors = model_errors(self.model) + parallel_errors(self.model, self.parallel, world_size)
        if errors:
            raise ConfigError(errors)


def model_errors(m: ModelConfig) -> list[str]:
    errors = []
    if m.hidden_size % m.num_attention_heads:
        errors.append(
            f"hidden_size={m.hidden_size} is not divisible by num_attention_heads="
            f"{m.num_attention_heads}: choose a head count that divides it"
        )
    if m.position == "sinusoidal" and m.hidden_size % 2:
        errors.append(f"hidden_size={m.hidden_size} must be even for the sinusoidal table")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "seq_length"):
        if getattr(m, name) <= 0:
            errors.append(f"model.{name}={getattr(m, name)} must be positive")
    return errors


def parallel_errors(m: ModelConfig, p: ParallelConfig, world_size: int | None) -> list[str]:
    errors = []
    if m.num_attention_heads % p.tensor_parallel:
        errors.append(
            f"num_attention_heads={m.num_attention_heads} is not divisible by tensor_parallel="
            f"{p.tensor_parallel}: use a tensor_parallel that divides the head count"
        )
    if m.ffn_hidden_size % p.tensor_parallel or m.vocab_size % p.tensor_parallel:
        errors.append(
            f"ffn_hidden_size={m.ffn_hidden_size} and vocab_size={m.vocab_size} must be divisible by "
            f"tensor_parallel={p.tensor_parallel}"
        )
    if m.num_layers % p.pipeline_parallel:
        errors.append(
            f"num_layers={m.num_layers} is not divisible by pipeline_parallel={p.pipeline_parallel}: "
            f"use a pipeline_parallel that divides the layer count"
        )
    if p.zero_stage not in (0, 1, 2, 3):
        errors.append(f"zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    elif p.zero_stage > 1 and p.pipeline_parallel > 1:
        errors.append(
            f"zero_stage={p.zero_stage} with pipeline_parallel={p.pipeline_parallel}: DeepSpeed refuses "
            "ZeRO-2/3 with pipeline parallelism (gradients are partitioned across micro-batches); "
            "use zero_stage 0 or 1, or pipeline_parallel=1"
        )
    if world_size is not None and world_size % (p.tensor_parallel * p.pipeline_parallel):
        errors.append(
            f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = "
            f"{p.tensor_parallel * p.pipeline_parallel}: change the GPU count or the layout"
        )
    return errors


# ---------------------------------------------------------------- loading


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError([f"{where or 'config'} must be a mapping, got {type(data).__name__}"])
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError([f"unknown key(s) {unknown} in {where or 'config'}; known: {sorted(fields)}"])
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, f"{where}{name}.")
        kwargs[name] = _check_type(value, hint, f"{where}{name}")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError([f"missing required key(s) {[where + m for m in missing]}"])
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError([f"{name}={value!r} must be one of {list(typing.get_args(hint))}"])
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError([f"{name}={value!r} must be of type {hint.__name__}"])
    if origin in (list, tuple) and not isinstance(value, (list, tuple)):
        raise ConfigError([f"{name}={value!r} must be a list"])
    if origin in (list, tuple):
        return type(value)(value) if origin is list else tuple(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError([f"override {item!r} is not of the form key.path=value"])
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return from_dict(Config, apply_overrides(data, list(overrides)))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
