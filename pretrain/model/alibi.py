"""ALiBi (Press, Smith, Lewis 2022): per-head slopes and the fp32 relative bias.

Two mistakes peers made, and how this module avoids them:
- slopes computed from the *local* head count under tensor parallelism (BigScience #227):
  `alibi_slopes` always takes the GLOBAL head count and `rank_slopes` slices it by TP rank;
- a bias stored in bf16 in the row-constant form `m * j` (quantized in steps of 8 at 2k
  positions): `alibi_bias` builds the relative form `-m * (i - j)` in fp32.
"""

from __future__ import annotations

import functools
import math

import torch

from .params import tp_heads


def alibi_slopes(num_heads: int) -> list[float]:
    """The paper's slopes for `num_heads` (global) heads.

    Powers of two n: geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8) (8 heads: 1/2 .. 1/256).
    Otherwise: the slopes of the largest power of two c <= n, then every other slope of the
    2c sequence, `slopes(2c)[0::2][: n - c]` (the official code's rule).
    """
    if num_heads <= 0:
        raise ValueError(f"num_heads={num_heads} must be positive")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    c = 2 ** math.floor(math.log2(num_heads))
    if c == num_heads:
        return power_of_two(num_heads)
    return power_of_two(c) + power_of_two(2 * c)[0::2][: num_heads - c]


def rank_slopes(num_heads: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """fp32 slopes of the heads that TP rank `tp_rank` owns (`params.tp_heads`): [num_heads // tp_size]."""
    return torch.tensor(alibi_slopes(num_heads)[tp_heads(num_heads, tp_size, tp_rank)], dtype=torch.float32)


def alibi_bias(
    slopes: torch.Tensor, q_len: int, k_len: int, *, causal: bool = True, device: torch.device | None = None
) -> torch.Tensor:
    """fp32 additive attention bias [h, q_len, k_len] for the heads in `slopes` [h].

    Queries are the last `q_len` of the `k_len` positions (q_len == k_len in training).
    causal: -m * (i - j) for j <= i and -inf above the diagonal;
    bidirectional (causal=False): the symmetric -m * |i - j|, no mask.
    """
    device = device if device is not None else slopes.device
    i = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # [q, 1] absolute query positions
    j = torch.arange(k_len, device=device)[None, :]  # [1, k]
    dist = (i - j).to(torch.float32)  # [q, k]
    if not causal:
        dist = dist.abs()
    bias = -slopes.to(device=device, dtype=torch.float32)[:, None, None] * dist  # [h, q, k]
    if causal:
        bias = bias.masked_fill(j > i, float("-inf"))
    return bias


@functools.cache
def device_slopes(num_heads: int, tp_size: int, tp_rank: int, device: str) -> torch.Tensor:
    """`rank_slopes` on `device`: one tensor per (rank, device), shared by every layer."""
    return rank_slopes(num_heads, tp_size, tp_rank).to(device)


@functools.cache
def _score_mod(slopes: torch.Tensor, causal: bool):
    """One function object per (slopes, direction): compiled graphs are reused across layers
    instead of recompiled per closure."""
    if causal:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)

    else:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (kv_idx - q_idx).abs()

    return score_mod


class AlibiBias:
    """ALiBi as the attention's score bias (the `ScoreBias` of pretrain/model/attention.py) for
    this TP rank's heads. Not a module and without parameters or buffers: the fp32 slopes live
    outside the model, so model.bfloat16() can never round them."""

    def __init__(self, num_heads: int, tp_size: int, tp_rank: int):
        self.num_heads, self.tp_size, self.tp_rank = num_heads, tp_size, tp_rank

    def slopes(self, device: torch.device | str) -> torch.Tensor:
        """fp32 [num_heads / tp_size] on `device`."""
        return device_slopes(self.num_heads, self.tp_size, self.tp_rank, str(device))

    def dense(self, s: int, causal: bool, device: torch.device | str) -> torch.Tensor:
        """fp32 [h, s, s]: -m (i - j), -inf above the diagonal (causal) or -m |i - j|."""
        return alibi_bias(self.slopes(device), s, s, causal=causal, device=device)

    def score_mod(self, causal: bool, device: torch.device | str):
        """FlexAttention score_mod adding the same bias to the fp32 scores: m[h] (kv - q)."""
        return _score_mod(self.slopes(device), causal)
