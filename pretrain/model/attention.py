"""Core attention for megatron-core's SelfAttention: ALiBi or no score bias, two backends.

megatron-core's `DotProductAttention` asserts `attention_bias is None` and builds its causal
mask on CUDA, so this module replaces it through the layer spec (`core_attention=`). The mask
and the ALiBi bias are made here, for whatever length arrives: callers pass
`attention_mask=None`.

Backends (same signature, chosen once when the spec is built, see `spec.py`):
- `sdpa_kernel`: reference, runs everywhere. No bias: SDPA `is_causal` (flash on GPU).
  ALiBi: the fp32 bias [h, s, s] from `alibi.alibi_bias` as a float `attn_mask`; q/k/v are
  upcast to fp32 for that path so the bias never rounds to bf16 (exactness over speed).
- `flex_kernel`: GPU fast path, compiled FlexAttention. ALiBi is a `score_mod`
  `score + m[h + head_offset] * (kv - q)` on the fp32 scores, the causal part a `block_mask`
  (fully-masked blocks skipped); no [s, s] tensor exists. Backward needs CUDA (on CPU torch
  2.13 implements only the forward).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from .alibi import alibi_bias, alibi_slopes

# kernel(q, k, v [b, h, s, d], *, slopes [H_global] fp32 | None, head_offset, causal, scale) -> [b, h, s, d]
Kernel = Callable[..., torch.Tensor]


def sdpa_kernel(q, k, v, *, slopes, head_offset, causal, scale):
    if slopes is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    h, s = q.shape[1], q.shape[2]
    bias = alibi_bias(slopes[head_offset : head_offset + h], s, s, causal=causal, device=q.device)  # [h, s, s]
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias, scale=scale)
    return out.to(q.dtype)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # One static-shape graph per (length, score_mod): train L plus evaluation at 2L..16L
    # exceeds dynamo's default of 8, past which it would silently fall back to the dense
    # eager path (an [s, s] score tensor per head).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.cache
def _causal_block_mask(s: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal, B=None, H=None, Q_LEN=s, KV_LEN=s, device=device)


@functools.cache
def _alibi_score_mod(slopes: torch.Tensor, head_offset: int, causal: bool):
    """One function object per (slopes, rank offset, direction): compiled graphs are reused
    across layers instead of recompiled per closure."""
    if causal:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h + head_offset] * (kv_idx - q_idx)

    else:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h + head_offset] * (kv_idx - q_idx).abs()

    return score_mod


def flex_kernel(q, k, v, *, slopes, head_offset, causal, scale, compiled: bool = True):
    """compiled=False runs FlexAttention's eager (dense) reference: same score_mod and
    block_mask semantics without the compile, for cheap CPU tests of the ALiBi logic."""
    from torch.nn.attention.flex_attention import flex_attention

    s = q.shape[2]
    block_mask = _causal_block_mask(s, str(q.device)) if causal else None
    score_mod = _alibi_score_mod(slopes, head_offset, causal) if slopes is not None else None
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


KERNELS: dict[str, Kernel] = {"sdpa": sdpa_kernel, "flex": flex_kernel}


@functools.cache
def _global_slopes(num_heads: int, device: str) -> torch.Tensor:
    # Shared by all layers (one tensor per device), kept outside the module's buffers so that
    # model.bfloat16() can never round it.
    return torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device=device)


def _no_slopes(device: str) -> None:
    return None


class CoreAttention(MegatronModule):
    """Drop-in for megatron-core's DotProductAttention (same constructor and forward), plus
    two spec-bound keywords: `kernel` (sdpa_kernel | flex_kernel) and `alibi`.

    forward(query, key, value [s, b, np, hn], attention_mask=None) -> [s, b, np * hn]
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        kernel: Kernel,
        alibi: bool,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("context parallelism is not supported by this attention; set it to 1")
        if (attention_dropout or config.attention_dropout) > 0:
            raise ValueError("attention dropout is not supported (FlexAttention has none); set it to 0")
        tp = pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        tp_size, tp_rank = tp.size(), tp.rank()
        self.local_heads = config.num_attention_heads // tp_size
        self.head_offset = tp_rank * self.local_heads  # megatron gives rank r heads [r*n/tp, (r+1)*n/tp)
        # ALiBi or not is settled here, once: forward does not branch on the position method.
        self.slopes_for = functools.partial(_global_slopes, config.num_attention_heads) if alibi else _no_slopes
        self.causal = attn_mask_type == AttnMaskType.causal
        self.scale = softmax_scale
        self.kernel = kernel

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError(
                "pass attention_mask=None: the causal mask and the ALiBi bias are built inside "
                "pretrain.model.attention for any length (packed sequences are not supported)"
            )
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        slopes = self.slopes_for(str(query.device))  # [H_global] fp32 from the GLOBAL head count, or None
        out = self.kernel(q, k, v, slopes=slopes, head_offset=self.head_offset, causal=self.causal, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, np * hn]
