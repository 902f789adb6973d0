"""One typed config tree, loaded from YAML with dotted overrides.

Every section is a keyword-only dataclass; unknown keys are rejected, and every
cross-field error is collected and reported together with its fix
(`Config.validate`; the layout's own rules are `pretrain.layout.Layout.errors`). Nothing
here touches torch.distributed or a GPU, so a 128-GPU layout can be checked on a laptop.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pretrain.layout import Layout

Position = Literal["alibi", "sinusoidal", "rope", "t5", "kerple", "none"]
AttentionBackend = Literal["auto", "sdpa", "flex", "flex-flash", "fa2"]


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem with its fix."""

    header = "invalid config"

    def __init__(self, errors: list[str]):
        self.errors = errors
        if len(errors) == 1:
            super().__init__(f"{self.header}: {errors[0]}")
        else:
            super().__init__(f"{self.header}:\n" + "\n".join(f"  - {e}" for e in errors))


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
    """alibi | sinusoidal | rope | t5 (T5 relative bias) | kerple (KERPLE log kernel) | none."""
    attention_backend: AttentionBackend = "auto"
    """auto: on a GPU the fastest installed kernel (flex-flash: FlexAttention's FlashAttention-4
    backend; fa2: FlashAttention-2 alibi_slopes; flex: FlexAttention/Triton), SDPA with a float
    bias elsewhere (pretrain/model/attention.py)."""
    bidirectional: bool = False
    """Encoder mode, no causal mask: symmetric ALiBi -m|i-j| and KERPLE, two-sided T5 buckets."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm eps (no bias, MPT-style)."""
    init_method_std: float = 0.02
    """Std of the normal init of linear weights."""
    rotary_base: int = 10000
    """RoPE base (position: rope only)."""
    t5_num_buckets: int = 32
    """T5 bias buckets (position: t5 only): half exact distances, half log-spaced up to
    t5_max_distance; bidirectional models split them between past and future. T5's setting."""
    t5_max_distance: int = 128
    """T5 bias: distances >= this share the last bucket (T5's setting)."""
    embedding_scale: float = 1.0
    """Token embeddings are multiplied by this before the position table is added. Sinusoidal
    configs scale the tokens to rms 1 at init, 1 / embedding_init_std (fairseq's sqrt(d) with
    std d^-0.5; without it the unit-amplitude table swamps the tokens), with the std the other
    methods use at small d (docs/design.md, Baselines). Must be 1.0 for ALiBi (MPT export has
    none); the GPT-2 export folds it in by untying (wte = scale * E, lm_head = E)."""
    embedding_init_std: float = 0.02
    """Std of the normal init of the (tied) token embedding."""
    hidden_dropout: float = 0.0
    """Dropout on embeddings and residual branches (attention dropout is not supported)."""


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel: int = 1
    """TP degree; must divide num_attention_heads."""
    pipeline_parallel: int = 1
    """PP degree; must divide num_layers."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3; 2 and 3 need pipeline_parallel == 1."""
    zero_bucket_size: int = 200_000_000
    """Elements per ZeRO-1/2 gradient-reduction and parameter all-gather bucket (DeepSpeed's
    reduce_bucket_size and allgather_bucket_size; two reduction buckets are in flight)."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to run (the LR schedule decays over optim.decay_steps, default these)."""
    micro_batch_size: int = 1
    """Sequences per forward pass per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step = micro_batch_size x accumulation x data_parallel."""
    seed: int = 1234
    """Seeds the layout-independent init, dropout RNG and the data order."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on a GPU, fp32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer in backward (megatron-core full recompute)."""
    max_bad_steps: int = 5
    """K: this many non-finite losses in a row stop the run (after a checkpoint)."""
    log_interval: int = 10
    """Steps between metrics.jsonl / wandb records."""
    dist_timeout_s: int = 600
    """How long a collective waits for a peer before it fails (the process-group timeout; torch's
    default is 30 min): when a rank or node dies, the others end within about this long."""


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to lr."""
    decay_steps: int = 0
    """Steps of warm-up + cosine decay; 0 means train.steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay, on matrices only (not LayerNorm weights)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables); the norm spans all TP/PP shards."""


@dataclass(kw_only=True)
class DataSource:
    path: str
    """A data_prep/preprocess.py output directory (has manifest.json)."""
    weight: float = 1.0
    """Blend weight of this source (normalized over sources)."""


@dataclass(kw_only=True)
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    """Blended sources; `--data DIR` replaces them with [DIR]."""
    reset_position_ids: bool = False
    """Restart positions at each document (megatron GPTDataset option)."""
    eod_mask_loss: bool = False
    """Do not train on predicting the end-of-document token."""


@dataclass(kw_only=True)
class CheckpointConfig:
    enabled: bool = True
    """False: the run neither writes nor resumes checkpoints (benchmarks; a signal or K bad
    steps then stop the run without one)."""
    save_interval: int = 1000
    """Steps between checkpoints (also written on SIGUSR1/SIGTERM and at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a new one is complete."""


@dataclass(kw_only=True)
class ValidationConfig:
    interval: int = 1000
    """Steps between validations (0: never)."""
    length_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Nonoverlapping perplexity at these multiples of the training length L."""
    tokens: int = 65536
    """Validation tokens scored per length (the first ones of the valid split)."""


@dataclass(kw_only=True)
class WandbConfig:
    enabled: bool = True
    """Log to wandb (the WANDB_MODE environment variable overrides mode)."""
    project: str = "alibi-pretrain"
    """wandb project."""
    name: str = ""
    """Run name; empty: the run directory's name."""
    group: str = ""
    """wandb group (e.g. the comparison a run belongs to)."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline by default: sync later with `wandb sync RUN_DIR/wandb/offline-run-*`."""


@dataclass(kw_only=True)
class HardwareConfig:
    peak_tflops: float = 989.0
    """Peak dense TFLOP/s per GPU for MFU (H100 SXM bf16: 989; A100: 312; V100: 125)."""
    gpu_memory_gb: float = 80.0
    """Per-GPU memory for the --dry-run fit check."""


@dataclass(kw_only=True)
class Config:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError listing every problem, each with its fix; with `world_size`, also
        the layout's (`Layout.errors`: world and batch divisibility)."""
        errors = (nonfinite_errors(self) + model_errors(self.model) + parallel_errors(self.model, self.parallel)
                  + train_errors(self))
        if world_size is not None:
            p, t = self.parallel, self.train
            errors += Layout.errors(world_size, p.tensor_parallel, p.pipeline_parallel, t.micro_batch_size,
                                    t.global_batch_size)
        if errors:
            raise ConfigError(list(dict.fromkeys(errors)))  # the layout's positivity rule is in both


def nonfinite_errors(node: Any, where: str = "") -> list[str]:
    """Every float field that is NaN or infinite (YAML reads .nan and .inf; `lr <= 0` is False
    for NaN, so the range checks below would let it through)."""
    errors = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            errors += nonfinite_errors(value, f"{where}{f.name}.")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, v in enumerate(value):
                errors += nonfinite_errors(v, f"{where}{f.name}[{i}].")
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{where}{f.name}={value} must be a finite number")
    return errors


def model_errors(m: ModelConfig) -> list[str]:
    errors = [f"model.{name}={getattr(m, name)} must be positive" for name in
              ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "seq_length")
              if getattr(m, name) <= 0]
    if errors:
        return errors  # the divisibility rules below need positive sizes
    if m.hidden_size % m.num_attention_heads:
        errors.append(
            f"hidden_size={m.hidden_size} is not divisible by num_attention_heads="
            f"{m.num_attention_heads}: choose a head count that divides it"
        )
    if m.position == "sinusoidal" and m.hidden_size % 2:
        errors.append(f"hidden_size={m.hidden_size} must be even for the sinusoidal table")
    if m.position == "alibi" and m.embedding_scale != 1.0:
        errors.append(
            f"embedding_scale={m.embedding_scale} with position=alibi: the MPT export has no embedding "
            "scale; set model.embedding_scale: 1.0"
        )
    if m.position == "t5" and not (m.t5_num_buckets >= 4 and m.t5_num_buckets % 2 == 0
                                   and m.t5_max_distance > m.t5_num_buckets // (2 if m.bidirectional else 1) // 2):
        errors.append(
            f"t5_num_buckets={m.t5_num_buckets}, t5_max_distance={m.t5_max_distance}: need an even bucket count >= 4 "
            "and a max distance beyond the exact buckets (T5: 32 and 128)"
        )
    if m.embedding_scale <= 0 or m.embedding_init_std <= 0 or m.init_method_std <= 0:
        errors.append("model.embedding_scale, embedding_init_std and init_method_std must be positive")
    if not 0.0 <= m.hidden_dropout < 1.0:
        errors.append(f"model.hidden_dropout={m.hidden_dropout} must be in [0, 1)")
    if m.layernorm_epsilon <= 0:
        errors.append(f"model.layernorm_epsilon={m.layernorm_epsilon} must be positive (e.g. 1e-5): LayerNorm "
                      "divides by sqrt(variance + eps)")
    if m.rotary_base <= 0:
        errors.append(f"model.rotary_base={m.rotary_base} must be positive (e.g. 10000)")
    return errors


def parallel_errors(m: ModelConfig, p: ParallelConfig) -> list[str]:
    degrees = Layout.errors(None, p.tensor_parallel, p.pipeline_parallel)
    if degrees:
        return degrees
    if min(m.num_attention_heads, m.num_layers) <= 0:
        return []  # model_errors reports them
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
    if p.zero_bucket_size <= 0:
        errors.append(f"parallel.zero_bucket_size={p.zero_bucket_size} must be positive (elements per bucket)")
    if p.zero_stage not in (0, 1, 2, 3):
        errors.append(f"zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    elif p.zero_stage > 1 and p.pipeline_parallel > 1:
        errors.append(
            f"zero_stage={p.zero_stage} with pipeline_parallel={p.pipeline_parallel}: DeepSpeed refuses "
            "ZeRO-2/3 with pipeline parallelism (gradients are partitioned across micro-batches); "
            "use zero_stage 0 or 1, or pipeline_parallel=1"
        )
    return errors


def train_errors(cfg: Config) -> list[str]:
    """Batch, schedule and logging rules (batch divisibility needs the world size: Layout.errors)."""
    t, o, errors = cfg.train, cfg.optim, []
    for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval", "max_bad_steps", "dist_timeout_s"):
        if getattr(t, name) <= 0:
            errors.append(f"train.{name}={getattr(t, name)} must be positive")
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        errors.append(f"optim.lr={o.lr} and optim.min_lr={o.min_lr} need 0 <= min_lr <= lr and lr > 0")
    if o.warmup_steps < 0 or o.decay_steps < 0:
        errors.append(f"optim.warmup_steps={o.warmup_steps} and decay_steps={o.decay_steps} must be >= 0")
    if o.grad_clip < 0:
        errors.append(f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            errors.append(f"optim.{name}={getattr(o, name)} must be in [0, 1) (e.g. 0.9 and 0.95)")
    if o.eps <= 0:
        errors.append(f"optim.eps={o.eps} must be positive (e.g. 1e-8)")
    if o.weight_decay < 0:
        errors.append(f"optim.weight_decay={o.weight_decay} must be >= 0 (0 disables it)")
    if not 0 <= t.seed < 2**32:
        errors.append(f"train.seed={t.seed} must be in [0, 2**32) (numpy seeds the data order with it)")
    h = cfg.hardware
    if h.peak_tflops <= 0 or h.gpu_memory_gb <= 0:
        errors.append(f"hardware.peak_tflops={h.peak_tflops} and gpu_memory_gb={h.gpu_memory_gb} must be positive")
    if cfg.checkpoint.save_interval <= 0 or cfg.checkpoint.keep_last <= 0:
        errors.append(
            f"checkpoint.save_interval={cfg.checkpoint.save_interval} and keep_last={cfg.checkpoint.keep_last} "
            "must be positive"
        )
    v = cfg.validation
    if v.interval < 0 or v.tokens <= 0 or not v.length_multipliers or min(v.length_multipliers) <= 0:
        errors.append(
            f"validation: interval={v.interval} must be >= 0, tokens={v.tokens} > 0 and "
            f"length_multipliers={v.length_multipliers} a non-empty list of positive integers"
        )
    elif v.interval and v.tokens <= max(v.length_multipliers) * cfg.model.seq_length:
        longest = max(v.length_multipliers) * cfg.model.seq_length
        errors.append(f"validation.tokens={v.tokens} holds no window of {longest} tokens (length_multipliers "
                      f"{v.length_multipliers} x seq_length {cfg.model.seq_length}), which would never be "
                      f"validated: set validation.tokens > {longest} or drop that multiplier")
    for i, src in enumerate(cfg.data.sources):
        if src.weight <= 0:
            errors.append(f"data.sources[{i}].weight={src.weight} must be positive")
    return errors


# ---------------------------------------------------------------- loading


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types (every
    such error in the tree at once)."""
    if not isinstance(data, dict):
        raise ConfigError([f"{where or 'config'} must be a mapping, got {type(data).__name__}"])
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors = []
    unknown = sorted(set(data) - set(fields))
    if unknown:
        errors.append(f"unknown key(s) {unknown} in {where or 'config'}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            continue
        hint = hints[name]
        try:
            if dataclasses.is_dataclass(hint):
                value = from_dict(hint, value, f"{where}{name}.")
            elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
                if not isinstance(value, list):
                    raise ConfigError([f"{where}{name} must be a list of mappings"])
                value = [from_dict(typing.get_args(hint)[0], v, f"{where}{name}[{i}].") for i, v in enumerate(value)]
            kwargs[name] = _check_type(value, hint, f"{where}{name}")
        except ConfigError as e:
            errors += e.errors
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        errors.append(f"missing required key(s) {[where + m for m in missing]}")
    if errors:
        raise ConfigError(errors)
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError([f"{name}={value!r} must be one of {list(typing.get_args(hint))}"])
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError([f"{name}={value!r} must be of type {hint.__name__}"])
    if origin in (list, tuple) and not isinstance(value, (list, tuple)):
        raise ConfigError([f"{name}={value!r} must be a list"])
    if origin in (list, tuple):
        item = (typing.get_args(hint) or (Any,))[0]
        if item is not Any and not dataclasses.is_dataclass(item):  # each element, e.g. list[int]
            checked, errors = [], []
            for i, v in enumerate(value):
                try:
                    checked.append(_check_type(v, item, f"{name}[{i}]"))
                except ConfigError as e:
                    errors += e.errors
            if errors:
                raise ConfigError(errors)
            value = checked
        return list(value) if origin is list else tuple(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError([f"override {item!r} is not of the form key.path=value (e.g. train.steps=100)"])
        node = data
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section"])
        node[parts[-1]] = _parse_yaml(raw, f"override {item!r}")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last
    silently: `lr: 1e-3` then `lr: 1e-4` further down would train with 1e-4 unseen)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges; explicit keys override it by design
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (also on line {seen[key] + 1}): keep one of them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, where: str) -> Any:
    """yaml.safe_load (refusing duplicate keys) with its error as one line naming `where`, the
    line and the column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = f" ({e.context})" if getattr(e, "context", None) else ""
        raise ConfigError([f"{where}{at}: YAML syntax error: {problem}{context}"]) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"cannot read config file {path}: {e.strerror or e}"]) from None
    data = _parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the config must be a mapping of sections (model:, train:, ...), "
                           f"not a {type(data).__name__}"])
    return from_dict(Config, apply_overrides(data, list(overrides)))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- dotted keys (overrides, the resume diff)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for a nested dict (lists, such as data.sources, are one value)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def field_defaults(cls: type = None, prefix: str = "") -> dict[str, Any]:
    """{"a.b": default} of every config field that has a default (required fields have none)."""
    cls = cls or Config
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_defaults(hints[f.name], f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[prefix + f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[prefix + f.name] = f.default_factory()
    return out
