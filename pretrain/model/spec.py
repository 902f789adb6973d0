"""The layer spec, built in ONE place from `ModelConfig.position` and the attention backend.

Everything that differs between position methods is settled here, at build time:

| position   | GPTModel position_embedding_type | score bias in CoreAttention          | embedding           |
|------------|----------------------------------|--------------------------------------|---------------------|
| alibi      | none                             | ALiBi slopes (global heads)          | tokens              |
| sinusoidal | none                             | none                                 | scale * tokens + PE |
| rope       | rope (megatron-core)             | none                                 | tokens              |
| t5         | none                             | learned T5 bucket table, shared      | tokens              |
| kerple     | none                             | learned KERPLE log kernel, shared    | tokens              |
| none       | none                             | none                                 | tokens (NoPE)       |

A learned bias (t5, kerple) is one module per model (`GPTModel.position_bias`, see relative.py),
built by builder.py and seen by every layer through a `SharedBias` view.

The block is MPT-style (what `MptForCausalLM` / `GPT2LMHeadModel` compute): pre-LN,
LayerNorm without bias, no linear biases, exact erf GELU, final LN (the linear-bias and GELU
choices live in the TransformerConfig, see builder.py).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from pretrain.config import ModelConfig
from pretrain.parallel import use_gpu

from .alibi import AlibiBias
from .attention import (AUTO_ORDER, KERNELS, SLOPES_ONLY, CoreAttention, ScoreBias, flex_trains_captured_tensors,
                        kernel_unavailable)
from .relative import KerpleBias, T5Bias
from .sinusoidal import SinusoidalEmbedding

log = logging.getLogger(__name__)


class LayerNormNoBias(torch.nn.LayerNorm):
    """torch LayerNorm without bias, with megatron's norm constructor signature."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, bias=False, dtype=config.params_dtype)


@dataclass(frozen=True)
class PositionSpec:
    mcore_type: str
    """`position_embedding_type` handed to megatron-core's GPTModel."""
    score_bias: Callable[..., ScoreBias] | None = None
    """(TransformerConfig, tp_size, tp_rank) -> the score bias CoreAttention adds, or None."""
    shared_bias: Callable[..., torch.nn.Module] | None = None
    """(ModelConfig, TransformerConfig, tp_size, tp_rank) -> a learned ScoreBias module built ONCE
    per model, registered as `GPTModel.position_bias` and used by every layer; or None."""
    wrap_embedding: Callable | None = None
    """(LanguageModelEmbedding, ModelConfig) -> module replacing `model.embedding`, or None."""


def _alibi(config, tp_size: int, tp_rank: int) -> AlibiBias:
    return AlibiBias(config.num_attention_heads, tp_size, tp_rank)  # slopes from the GLOBAL head count


def _t5(m: ModelConfig, config, tp_size: int, tp_rank: int) -> T5Bias:
    return T5Bias(config.num_attention_heads, tp_size, tp_rank, num_buckets=m.t5_num_buckets,
                  max_distance=m.t5_max_distance, hidden_size=config.hidden_size, dtype=config.params_dtype)


def _kerple(m: ModelConfig, config, tp_size: int, tp_rank: int) -> KerpleBias:
    return KerpleBias(config.num_attention_heads, tp_size, tp_rank, dtype=config.params_dtype)


POSITIONS: dict[str, PositionSpec] = {
    "alibi": PositionSpec("none", score_bias=_alibi),
    "t5": PositionSpec("none", shared_bias=_t5),
    "kerple": PositionSpec("none", shared_bias=_kerple),
    "sinusoidal": PositionSpec(
        "none", wrap_embedding=lambda emb, cfg: SinusoidalEmbedding(emb, cfg.embedding_scale)
    ),
    "rope": PositionSpec("rope"),
    "none": PositionSpec("none"),
}


def resolve_backend(requested: str, positions: Iterable[str] = ()) -> str:
    """The attention kernel for `requested` (config `model.attention_backend`) that serves every
    position method in `positions`. auto: on a GPU the first of attention.AUTO_ORDER that can run
    here (FlashAttention-2 only where the score bias is ALiBi slopes or none), on a CPU sdpa
    (FlexAttention's backward needs CUDA). Logged once."""
    if requested not in ("auto", *KERNELS):
        raise ValueError(f"attention_backend={requested!r} must be one of auto, {', '.join(KERNELS)}")
    gpu = use_gpu()
    slopes_ok = all(POSITIONS[p].score_bias in (None, _alibi) and POSITIONS[p].shared_bias is None for p in positions)
    if requested in SLOPES_ONLY and not slopes_ok:
        raise ValueError(f"attention_backend={requested} adds ALiBi slopes only; position(s) {sorted(positions)} "
                         "need another score bias: use flex or auto")
    if requested == "auto":
        candidates = [k for k in AUTO_ORDER if slopes_ok or k not in SLOPES_ONLY] if gpu else ["sdpa"]
        reasons = {k: kernel_unavailable(k, gpu) for k in candidates}
        backend = next(k for k in [*candidates, "sdpa"] if not reasons.get(k))
        skipped = "; ".join(f"{k}: {r}" for k, r in reasons.items() if r and k != backend)
    else:
        backend, skipped = requested, ""
        reason = kernel_unavailable(requested, gpu)
        if reason and requested != "flex":  # flex: forward-only evaluation works on a CPU
            raise ValueError(f"attention_backend={requested} {reason}; use auto")
    _log_once(requested, backend, gpu, skipped)
    return backend


def model_backend(cfg: ModelConfig) -> str:
    """The kernel this model's layers use: `resolve_backend`, except that a learned bias (t5,
    kerple) trains through a FlexAttention kernel only where its compiled backward gives the
    gradient of the tensors captured by the score_mod (checked once per process and kernel on the
    GPU, see attention.flex_trains_captured_tensors): flex-flash falls back to flex (Triton), flex
    to sdpa, each with a warning."""
    backend = resolve_backend(cfg.attention_backend, [cfg.position])
    if POSITIONS[cfg.position].shared_bias is None or not use_gpu():
        return backend
    for kernel, fallback in (("flex-flash", "flex"), ("flex", "sdpa")):
        if backend == kernel and not flex_trains_captured_tensors("cuda", kernel):
            log.warning("position=%s: this torch's %s kernel gives no correct gradient for the learned bias "
                        "captured in its score_mod; using the %s kernel instead", cfg.position, kernel, fallback)
            backend = fallback
    return backend


@functools.cache
def _log_once(requested: str, backend: str, gpu: bool, skipped: str) -> None:
    log.info("attention backend: %s (requested %s, GPU: %s)%s", backend, requested, gpu,
             f"; not available: {skipped}" if skipped else "")
    if backend == "flex" and not gpu:
        log.warning("attention_backend=flex without CUDA: forward only (torch has no CPU FlexAttention "
                    "backward), and each new length compiles for 20-45 s; use sdpa to train on CPU")


def layer_spec(cfg: ModelConfig, backend: str, score_bias: Callable[..., ScoreBias] | None) -> ModuleSpec:
    """One MPT-style transformer layer; `score_bias` as `PositionSpec.score_bias`."""
    core_attention = functools.partial(CoreAttention, kernel=KERNELS[backend], score_bias=score_bias)
    mask = AttnMaskType.no_mask if cfg.bidirectional else AttnMaskType.causal
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LayerNormNoBias,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LayerNormNoBias,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(cfg: ModelConfig, config, backend: str, score_bias: Callable[..., ScoreBias] | None) -> ModuleSpec:
    """This pipeline stage's layers plus the bias-free final LayerNorm."""
    layers = [layer_spec(cfg, backend, score_bias)] * get_num_layers_to_build(config)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=layers, layer_norm=LayerNormNoBias),
    )
