"""Core attention for megatron-core's SelfAttention: a position method's score bias (or none),
two backends.

megatron-core's `DotProductAttention` asserts `attention_bias is None` and builds its causal
mask on CUDA, so this module replaces it through the layer spec (`core_attention=`). The mask
and the score bias are made here, for whatever length arrives: callers pass
`attention_mask=None`.

A score bias (`ScoreBias`, e.g. `alibi.AlibiBias`) is an additive bias on the scaled scores of
this TP rank's heads, in two forms with the same values: `dense` (fp32 [h, s, s], for the
reference path) and `score_mod` (for FlexAttention). The layer spec decides once which bias a
model has (spec.py); forward never branches on the position method.

Backends (same signature, chosen once when the spec is built, see `spec.py`; `auto` takes the
first of `AUTO_ORDER` that can run here):
- `sdpa_kernel`: reference, runs everywhere. No bias: SDPA `is_causal` (flash on GPU).
  With a bias: the fp32 `dense` bias as a float `attn_mask`; q/k/v are upcast to fp32 for that
  path so the bias never rounds to bf16 (exactness over speed).
- `flex_kernel`: GPU fast path, compiled FlexAttention (Triton). The bias is its `score_mod` on
  the fp32 scores (ALiBi: `score + m[h] * (kv - q)`), the causal part a `block_mask`
  (fully-masked blocks skipped); no [s, s] tensor exists. Backward needs CUDA (on CPU torch
  2.13 implements only the forward).
- `flex_flash_kernel`: the same FlexAttention call on its FlashAttention-4 backend
  (`kernel_options={"BACKEND": "FLASH"}`, CuTe DSL, Hopper/Blackwell, the `flash-attn-4`
  package, torch >= 2.13); any score bias. Offered only after one small forward+backward on
  this GPU matched sdpa (`_flash_backend_error`).
- `fa2_kernel`: FlashAttention-2's `flash_attn_func` with `alibi_slopes` (fp32, the TP rank's
  heads), or no bias; `flash-attn` >= 2.4, Ampere or newer. Other score biases are refused.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import re
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from .alibi import AlibiBias


class ScoreBias(Protocol):
    """An additive attention-score bias for this TP rank's h heads (ALiBi: `alibi.AlibiBias`)."""

    def dense(self, s: int, causal: bool, device: torch.device | str) -> torch.Tensor:
        """fp32 [h, s, s], -inf above the diagonal when causal (differentiable in any parameters)."""

    def score_mod(self, causal: bool, device: torch.device | str) -> Callable:
        """FlexAttention score_mod(score, b, h, q_idx, kv_idx) adding the same bias."""


# kernel(q, k, v [b, h, s, d], *, bias: ScoreBias | None, causal, scale) -> [b, h, s, d]
Kernel = Callable[..., torch.Tensor]


def sdpa_kernel(q, k, v, *, bias, causal, scale):
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    dense = bias.dense(q.shape[2], causal, q.device)  # [h, s, s] fp32
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense, scale=scale)
    return out.to(q.dtype)


def compile_static(fn: Callable, **kwargs) -> Callable:
    """`torch.compile` with one static-shape graph per input shape. fullgraph: a graph break
    raises instead of silently running FlexAttention's eager path (dense [s, s] scores per head,
    an OOM at long lengths). Recompiles are logged with their reason (dynamo's `recompiles` log,
    unless TORCH_LOGS says otherwise); train L plus evaluation at 2L..16L is more graphs than
    dynamo's default limit of 8, past which it would fall back to eager."""
    if "TORCH_LOGS" not in os.environ:
        torch._logging.set_logs(recompiles=True)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False, fullgraph=True, **kwargs)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return compile_static(flex_attention)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.cache
def _causal_block_mask(s: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal, B=None, H=None, Q_LEN=s, KV_LEN=s, device=device)


def flex_kernel(q, k, v, *, bias, causal, scale, compiled: bool = True, backend: str | None = None):
    """compiled=False runs FlexAttention's eager (dense) reference: same score_mod and
    block_mask semantics without the compile, for cheap CPU tests of the bias logic.
    backend: FlexAttention's kernel_options BACKEND (None: its default, Triton on GPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    s = q.shape[2]
    block_mask = _causal_block_mask(s, str(q.device)) if causal else None
    score_mod = bias.score_mod(causal, q.device) if bias is not None else None
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
              kernel_options={"BACKEND": backend} if backend else None)


def flex_flash_kernel(q, k, v, *, bias, causal, scale):
    return flex_kernel(q, k, v, bias=bias, causal=causal, scale=scale, backend="FLASH")


def fa2_kernel(q, k, v, *, bias, causal, scale):
    if bias is not None and not hasattr(bias, "slopes"):
        raise ValueError(f"attention_backend=fa2 adds ALiBi slopes only, not a {type(bias).__name__}; "
                         "use attention_backend flex (or auto)")
    from flash_attn import flash_attn_func

    slopes = bias.slopes(q.device) if bias is not None else None  # fp32 [h]
    # FlashAttention-2 adds -slope * |i - j|: causally -m (i - j), bidirectionally -m |i - j|, as ours
    out = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=scale, causal=causal,
                          alibi_slopes=slopes)  # [b, s, h, d]
    return out.transpose(1, 2)  # [b, h, s, d]


KERNELS: dict[str, Kernel] = {"sdpa": sdpa_kernel, "flex": flex_kernel, "flex-flash": flex_flash_kernel,
                              "fa2": fa2_kernel}
AUTO_ORDER = ("flex-flash", "fa2", "flex")
"""`auto` on a GPU: the first of these that can run, fastest expected first (docs/design.md, "Speed")."""
SLOPES_ONLY = {"fa2"}
"""Kernels that take ALiBi as per-head slopes and no other score bias."""


FLEX_FLASH_TORCH = (2, 13)
"""FlexAttention's FLASH backend trains without monkey-patches from this torch on (torch 2.11 needs
patches and a correctness test: SpecForge PR #714, docs/reference.md)."""


def _import_error(module: str) -> str | None:
    """None if `module` imports here, else why not. A broken install (e.g. a flash_attn built for
    another torch: an undefined-symbol ImportError, or an OSError from its .so) is a reason, not a crash."""
    try:
        importlib.import_module(module)
    except Exception as e:  # any failure of a third-party import means: this kernel is not available
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None


def _torch_version() -> tuple[int, int]:
    return tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])


def kernel_unavailable(name: str, gpu: bool) -> str | None:
    """Why kernel `name` cannot train here (None: it can); `gpu`: this process runs on a CUDA GPU.
    On a GPU, flex-flash must also pass one small forward+backward against sdpa (`_flash_backend_error`)."""
    if name == "sdpa":
        return None
    if not gpu:
        return "needs a CUDA GPU (FlexAttention has no CPU backward, FlashAttention no CPU kernel)"
    major = torch.cuda.get_device_capability()[0]
    if name == "flex-flash":
        if major < 9:
            return f"needs a Hopper or newer GPU (compute capability {major}.x)"
        if _torch_version() < FLEX_FLASH_TORCH:
            return (f"needs torch >= {'.'.join(map(str, FLEX_FLASH_TORCH))} for FlexAttention's FLASH backend "
                    f"(this is {torch.__version__}, where it trains only with patches)")
        error = _import_error("flash_attn.cute")
        if error:
            return f"needs the flash-attn-4 package (FlexAttention's FLASH backend imports flash_attn.cute: {error})"
        error = _flash_backend_error("cuda")
        if error:
            return f"failed its forward+backward check on this GPU: {error}"
    if name == "fa2":
        if major < 8:
            return f"needs an Ampere or newer GPU (compute capability {major}.x)"
        error = _import_error("flash_attn")
        if error:
            return f"needs the flash-attn package (>= 2.4, which added alibi_slopes); importing it: {error}"
        from flash_attn import flash_attn_func

        if "alibi_slopes" not in inspect.signature(flash_attn_func).parameters:
            return "needs flash-attn >= 2.4 (alibi_slopes)"
    return None


@functools.cache
def _flash_backend_error(device: str) -> str | None:
    """None if FlexAttention's FLASH backend runs a small causal ALiBi-style forward+backward here and
    matches sdpa (output and q/k/v gradients), else why not. Once per process."""
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, 4, 256, 64, device=device, generator=g, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    bias = AlibiBias(4, 1, 0)
    try:
        outs = [fn(q, k, v, bias=bias, causal=True, scale=None) for fn in (flex_flash_kernel, sdpa_kernel)]
        grads = [torch.autograd.grad(o.float().square().sum(), (q, k, v)) for o in outs]
    except Exception as e:  # a torch or flash-attn-4 that cannot run it raises: the kernel is unavailable
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    for what, a, b in [("output", *outs), *zip(("dq", "dk", "dv"), *grads)]:
        err = (a.float() - b.float()).abs().max().item()
        if not err <= 2e-2 * b.float().abs().max().item() + 1e-2:
            return f"{what} differs from sdpa by {err:.3g}"
    return None


@functools.cache
def flex_trains_captured_tensors(device: str, kernel: str = "flex") -> bool:
    """Does this torch's compiled FlexAttention (`kernel`: flex or flex-flash) give the right
    gradient for a learned tensor captured by a score_mod (the T5 table, KERPLE's r1/r2)? Checked
    once per process on a small causal problem against the sdpa reference (gradients of q, k, v
    and of the captured tensor). Cannot be answered on CPU, where torch 2.13's FlexAttention has
    no backward at all."""
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 16, device=device, generator=g, requires_grad=True) for _ in range(3))
    w = torch.rand(2, device=device, generator=g).requires_grad_()  # per-head learned slope [h]

    class Learned:
        def dense(self, s, causal, dev):
            i, j = torch.arange(s, device=dev)[:, None], torch.arange(s, device=dev)[None, :]
            return (w[:, None, None] * (j - i)).masked_fill(j > i, float("-inf"))  # [h, s, s]

        def score_mod(self, causal, dev):
            return lambda score, b, h, q_idx, kv_idx: score + w[h] * (kv_idx - q_idx)

    try:
        grads = [torch.autograd.grad(fn(q, k, v, bias=Learned(), causal=True, scale=None).square().sum(),
                                     (q, k, v, w)) for fn in (KERNELS[kernel], sdpa_kernel)]
        return all(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item()) for a, b in zip(*grads))
    except Exception as e:  # a torch that cannot differentiate captured tensors may raise instead
        logging.getLogger(__name__).warning("FlexAttention backward with a learned score_mod tensor failed: %r", e)
        return False


class CoreAttention(MegatronModule):
    """Drop-in for megatron-core's DotProductAttention (same constructor and forward), plus
    two spec-bound keywords: `kernel` (sdpa_kernel | flex_kernel) and `score_bias`, a factory
    (config, tp_size, tp_rank) -> ScoreBias for this rank's heads, or None.

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
        score_bias: Callable[..., ScoreBias] | None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("context parallelism is not supported by this attention; set it to 1")
        if (attention_dropout or config.attention_dropout) > 0:
            raise ValueError("attention dropout is not supported (FlexAttention has none); set it to 0")
        tp = pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        # The bias is settled here, once: forward does not branch on the position method.
        # megatron gives TP rank r the heads [r*n/tp, (r+1)*n/tp): the bias covers those.
        self.score_bias = score_bias(config, tp.size(), tp.rank()) if score_bias is not None else None
        self.causal = attn_mask_type == AttnMaskType.causal
        self.scale = softmax_scale
        self.kernel = kernel

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError(
                "pass attention_mask=None: the causal mask and the score bias are built inside "
                "pretrain.model.attention for any length (packed sequences are not supported)"
            )
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        out = self.kernel(q, k, v, bias=self.score_bias, causal=self.causal, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, np * hn]
