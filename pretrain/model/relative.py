"""Learned relative-position score biases: the T5 bias and KERPLE's logarithmic kernel.

Both are `ScoreBias`es (pretrain/model/attention.py) with learned per-head parameters, and both
are ONE module per model, shared by every layer, as in the originals (T5: the first layer's
table is reused by every layer, Raffel et al. 2020 Sec. 2.1; KERPLE: one module passed to every
layer in its GPT-NeoX code; docs/reference.md §9). The builder registers it once as
`GPTModel.position_bias` and hands each layer's CoreAttention a `SharedBias` view, so the
parameters have one name and one gradient (summed over layers by autograd). Under tensor
parallelism a rank holds its own heads' columns (megatron's `partition_dim` attribute set, so
checkpoints and `params.init_weights` slice them); under pipeline parallelism every stage holds
a copy, tied like the embedding (pretrain/engine.py `StagePipe`).

- T5 (`T5Bias`): bias[h, i, j] = table[bucket(j - i), h]. Causal: one-sided buckets of the past
  distance n = i - j: n itself below num_buckets / 2, then log-spaced up to max_distance, beyond
  which all distances share the last bucket. Bidirectional: half the buckets per side, the upper
  half for keys after the query. As T5's `_relative_position_bucket` (Mesh TensorFlow), with
  bucket boundaries taken in float64 once per distance (`t5_bucket_of_distance`).
- KERPLE (`KerpleBias`, Chi et al. 2022, "log" variant): bias[h, i, j] = -r1[h] log(1 + r2[h] |i - j|),
  r1, r2 > 0: the official code clamps both to >= 0.01 before each forward; here the clamp is
  part of the forward with a straight-through gradient (same values; see `_at_least`).
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

from .params import tp_heads

KERPLE_EPS = 1e-2
"""KERPLE's lower bound on r1 and r2 (`self.eps` of its `ParallelKerpleLog`)."""


@functools.cache
def t5_bucket_of_distance(num_buckets: int, max_distance: int) -> torch.Tensor:
    """int64 [max_distance + 1]: the bucket of distance n = 0 .. max_distance for `num_buckets`
    one-sided buckets (T5's formula; every distance >= max_distance is in the last bucket):
    n < e = num_buckets // 2 -> n;  else e + floor(log(n / e) / log(max_distance / e) * (num_buckets - e))."""
    exact = num_buckets // 2
    n = torch.arange(max_distance + 1, dtype=torch.float64)
    large = exact + (torch.log(n.clamp(min=exact) / exact) / math.log(max_distance / exact) * (num_buckets - exact))
    return torch.where(n < exact, n, large.floor().clamp(max=num_buckets - 1)).long()


@functools.cache
def _lut_on(num_buckets: int, max_distance: int, device: str) -> torch.Tensor:
    """`t5_bucket_of_distance` on `device`, copied there once per process: every layer (and every
    forward) reads the same device tensor instead of copying the table from the host again."""
    return t5_bucket_of_distance(num_buckets, max_distance).to(device)


def t5_bucket(rel: torch.Tensor, lut: torch.Tensor, causal: bool, num_buckets: int) -> torch.Tensor:
    """Bucket of each relative position rel = j - i (int tensor, any shape; also a score_mod's
    scalar index). lut: `t5_bucket_of_distance` for the buckets of one side (num_buckets if
    causal, num_buckets // 2 if not). Causal: keys after the query (masked anyway) get bucket 0."""
    if causal:
        return lut[torch.clamp(-rel, 0, lut.shape[0] - 1)]
    side = lut[torch.clamp(rel.abs(), max=lut.shape[0] - 1)]
    return side + (rel > 0).long() * (num_buckets // 2)


def _positions(s: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(s, device=device)[:, None], torch.arange(s, device=device)[None, :]  # i [s, 1], j [1, s]


class T5Bias(torch.nn.Module):
    """The T5 relative bias for this TP rank's heads: `weight` [num_buckets, local heads]."""

    def __init__(self, num_heads: int, tp_size: int, tp_rank: int, *, num_buckets: int, max_distance: int,
                 hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.heads = tp_heads(num_heads, tp_size, tp_rank)
        self.num_heads, self.num_buckets, self.max_distance = num_heads, num_buckets, max_distance
        self.init_std = hidden_size**-0.5  # HF T5 `_init_weights`: relative_attention_bias ~ N(0, d_model^-0.5)
        self.weight = torch.nn.Parameter(self.draw("weight")[:, self.heads].to(dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 1, 1)

    def draw(self, name: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """fp32 init of the FULL parameter `name` (all heads), from `generator` or torch's RNG."""
        return torch.empty(self.num_buckets, self.num_heads).normal_(0.0, self.init_std, generator=generator)

    def _lut(self, causal: bool, device) -> torch.Tensor:
        return _lut_on(self.num_buckets // (1 if causal else 2), self.max_distance, str(torch.device(device)))

    def dense(self, s: int, causal: bool, device) -> torch.Tensor:
        """fp32 [h, s, s]: table[bucket(j - i)], -inf above the diagonal when causal."""
        i, j = _positions(s, device)
        buckets = t5_bucket(j - i, self._lut(causal, device), causal, self.num_buckets)  # [s, s]
        bias = self.weight.float()[buckets].permute(2, 0, 1)  # [s, s, h] -> [h, s, s]
        return bias.masked_fill(j > i, float("-inf")) if causal else bias

    def score_mod(self, causal: bool, device):
        table, lut, n = self.weight.float(), self._lut(causal, device), self.num_buckets  # table [buckets, h]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[t5_bucket(kv_idx - q_idx, lut, causal, n), h]

        return score_mod


def _at_least(x: torch.Tensor, low: float) -> torch.Tensor:
    """max(x, low) in the forward, identity gradient: KERPLE clamps the parameters themselves
    before each forward (`p.data.clamp_(min=eps)`), which a ZeRO optimizer's fp32 master copy would
    never see; clamping the value keeps its forward in every layout, and the straight-through
    gradient lets a clamped parameter move back up as the in-place clamp does."""
    return x + (x.clamp(min=low) - x).detach()


class KerpleBias(torch.nn.Module):
    """KERPLE's log kernel for this TP rank's heads: `r1`, `r2` [local heads], used as
    -max(r1, eps) * log(1 + max(r2, eps) * |i - j|)."""

    INIT_SCALE: ClassVar[dict[str, float]] = {"r1": 2.0, "r2": 1.0}
    """KERPLE's init: r1 ~ U(0, 2), r2 ~ U(0, 1) (`get_parameter(2, 'uniform')`, `(1, 'uniform')`)."""

    def __init__(self, num_heads: int, tp_size: int, tp_rank: int, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.heads = tp_heads(num_heads, tp_size, tp_rank)
        self.num_heads = num_heads
        for name in self.INIT_SCALE:
            setattr(self, name, torch.nn.Parameter(self.draw(name)[self.heads].to(dtype)))
            set_tensor_model_parallel_attributes(getattr(self, name), True, 0, 1)

    def draw(self, name: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """fp32 init of the FULL parameter `name` (all heads), from `generator` or torch's RNG."""
        return torch.rand(self.num_heads, generator=generator) * self.INIT_SCALE[name]

    def _kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _at_least(self.r1.float(), KERPLE_EPS), _at_least(self.r2.float(), KERPLE_EPS)  # [h] each

    def dense(self, s: int, causal: bool, device) -> torch.Tensor:
        """fp32 [h, s, s]: -r1 log(1 + r2 |i - j|), -inf above the diagonal when causal."""
        i, j = _positions(s, device)
        r1, r2 = (r[:, None, None] for r in self._kernel())  # [h, 1, 1]
        bias = -r1 * torch.log1p(r2 * (i - j).abs().float())  # [h, s, s]
        return bias.masked_fill(j > i, float("-inf")) if causal else bias

    def score_mod(self, causal: bool, device):
        r1, r2 = self._kernel()

        def score_mod(score, b, h, q_idx, kv_idx):
            return score - r1[h] * torch.log1p(r2[h] * (q_idx - kv_idx).abs())

        return score_mod


class SharedBias:
    """What each layer's CoreAttention holds: a view of the model's one learned bias module.
    Not a Module, so the module is not registered again under every layer (it is registered
    once, as `GPTModel.position_bias`)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def dense(self, s: int, causal: bool, device) -> torch.Tensor:
        return self.module.dense(s, causal, device)

    def score_mod(self, causal: bool, device):
        return self.module.score_mod(causal, device)
