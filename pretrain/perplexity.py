"""Perplexity of a causal LM over one token stream, nonoverlapping (the paper's) or sliding.

The windows are defined once, here (`plan_windows`): training validation (`loop.validate_ppl`,
nonoverlapping windows from `nonoverlapping_windows`, scored by the trainer and summed over
data-parallel ranks) and tools/eval_extrapolation.py (`perplexity`, either method) cut the same
windows, so a checkpoint's logged val/ppl_at_<n> and the tool's nonoverlapping number agree.

Both methods cut the stream into windows of `length` input tokens; window `k` reads
`T[s_k : s_k + length]` and predicts `T[s_k + 1 : s_k + length + 1]`.
- nonoverlapping: s_k = k * length, every prediction scored once, with the context available
  inside its window only (Press et al. 2022, Sec. 2-4).
- sliding (stride S <= length): s_k = k * S; the first window scores all its predictions, later
  windows only their last S, so every scored token sees >= length - S tokens of context.
  With S = length both score the same windows and tokens. With S = 1 the "early token curse"
  vanishes and so does much of the extrapolation gain (paper App. B): always name method and stride.
The tail that does not fill a whole window is not scored; `tokens` in the result says how many were.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

Method = Literal["nonoverlapping", "sliding"]
NllFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(inputs [b, L] int64, targets [b, L] int64) -> per-token negative log-likelihood [b, L]."""
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""[b, s] int64 token ids -> [b, s, vocab] logits (any float dtype)."""


@dataclass(frozen=True)
class Result:
    ppl: float
    tokens: int
    """Number of scored predictions."""
    nll_sum: float


def plan_windows(num_tokens: int, length: int, method: Method = "nonoverlapping",
                 stride: int | None = None) -> tuple[list[int], list[int], int]:
    """Return (window starts, first scored position per window, effective stride)."""
    if method == "nonoverlapping":
        if stride not in (None, length):
            raise ValueError(f"--stride {stride} only applies to --method sliding (nonoverlapping uses stride = length)")
        stride = length
    elif method == "sliding":
        stride = stride or length
        if not 1 <= stride <= length:
            raise ValueError(f"stride={stride} must be in [1, length={length}] for sliding-window evaluation")
    else:
        raise ValueError(f"method={method!r} must be 'nonoverlapping' or 'sliding'")
    last_start = num_tokens - length - 1  # a window needs length inputs + 1 shifted target
    if last_start < 0:
        raise ValueError(f"the evaluation stream has {num_tokens} tokens, fewer than length+1={length + 1}: "
                         "use shorter lengths or more evaluation tokens")
    starts = list(range(0, last_start + 1, stride))
    score_from = [0] + [length - stride] * (len(starts) - 1)
    return starts, score_from, stride


def _windows(tokens: torch.Tensor, starts: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = tokens[torch.tensor(starts)[:, None] + torch.arange(length + 1)]  # [n, L + 1]
    return chunk[:, :-1], chunk[:, 1:]  # inputs [n, L], targets [n, L]


def nonoverlapping_windows(tokens: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [n, length] of the full nonoverlapping windows of the 1-D stream `tokens`
    (training validation deals these over data-parallel ranks)."""
    starts, _, _ = plan_windows(tokens.numel(), length)
    return _windows(tokens.flatten().long(), starts, length)


@torch.no_grad()
def window_nll(nll_fn: NllFn, tokens: torch.Tensor, length: int, *, method: Method = "nonoverlapping",
               stride: int | None = None, batch_size: int = 1, progress: Callable[[int], None] | None = None) -> Result:
    """Summed NLL (float64) over the scored predictions of `tokens`' windows, `batch_size` windows
    per call of `nll_fn`; `progress(n)` is called with the windows done per batch."""
    tokens = tokens.flatten().long()
    starts, score_from, _ = plan_windows(tokens.numel(), length, method, stride)
    positions = torch.arange(length)
    nll_sum, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = _windows(tokens, starts[i : i + batch_size], length)  # [b, L] each
        nll = nll_fn(x, y).cpu()  # [b, L]
        scored = positions[None, :] >= torch.tensor(score_from[i : i + batch_size])[:, None]  # [b, L]
        nll_sum += nll[scored].double().sum().item()
        count += int(scored.sum())
        if progress is not None:
            progress(x.shape[0])
    return Result(ppl=math.exp(nll_sum / count), tokens=count, nll_sum=nll_sum)


def perplexity(logits_fn: LogitsFn, tokens: torch.Tensor, length: int, *, method: Method = "nonoverlapping",
               stride: int | None = None, batch_size: int = 1, device: torch.device | str = "cpu",
               desc: str | None = None) -> Result:
    """Perplexity of `logits_fn` on the 1-D stream `tokens` at context `length` (see module doc)."""
    bar = tqdm(total=len(plan_windows(tokens.numel(), length, method, stride)[0]), desc=desc, unit="window",
               leave=False, disable=desc is None)

    def nll_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # [b, L], [b, L] -> [b, L]
        logits = logits_fn(x.to(device))  # [b, L, V]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 kept
        return F.cross_entropy(logits.transpose(1, 2), y.to(device), reduction="none")

    try:
        return window_nll(nll_fn, tokens, length, method=method, stride=stride, batch_size=batch_size,
                          progress=bar.update)
    finally:
        bar.close()
