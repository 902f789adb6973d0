"""Nonoverlapping perplexity (the paper's evaluation), shared by training validation and
tools/eval_extrapolation.py.

The token stream is cut into windows of `length` inputs; window k feeds tokens
[k*length, (k+1)*length) and predicts [k*length+1, (k+1)*length+1), so every token after the
first is scored exactly once, with the context available inside its window only (Press et al.
2022, Sec. 2; sliding-window evaluation is a different number).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

NllFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(inputs [b, L] int64, targets [b, L] int64) -> per-token negative log-likelihood [b, L]."""


def nonoverlapping_windows(tokens: torch.Tensor, length: int, max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [n, length] of the full windows in the 1-D stream `tokens`."""
    n = (tokens.numel() - 1) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens are too few for one window of length {length}: "
                         "use more evaluation tokens or a shorter length")
    flat = tokens[: n * length + 1].long()
    return flat[:-1].view(n, length), flat[1:].view(n, length)  # [n, L], [n, L]


@torch.no_grad()
def nonoverlapping_nll(nll_fn: NllFn, tokens: torch.Tensor, length: int, batch_size: int = 1,
                       max_windows: int | None = None) -> tuple[float, int]:
    """Summed NLL (float64) and token count over the nonoverlapping windows of `tokens`."""
    inputs, targets = nonoverlapping_windows(tokens, length, max_windows)
    total = 0.0
    for i in range(0, inputs.shape[0], batch_size):
        nll = nll_fn(inputs[i : i + batch_size], targets[i : i + batch_size])  # [b, L]
        total += nll.double().sum().item()
    return total, targets.numel()


def nonoverlapping_ppl(nll_fn: NllFn, tokens: torch.Tensor, length: int, batch_size: int = 1,
                       max_windows: int | None = None) -> float:
    """exp(mean NLL) over the nonoverlapping windows of `length` tokens."""
    total, count = nonoverlapping_nll(nll_fn, tokens, length, batch_size, max_windows)
    return math.exp(total / count)
