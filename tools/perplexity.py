"""Perplexity of a causal LM over one token stream, nonoverlapping (the paper's) or sliding.

Both methods cut the stream into windows of `length` input tokens; window `k` reads
`T[s_k : s_k + length]` and predicts `T[s_k + 1 : s_k + length + 1]`.
- nonoverlapping: s_k = k * length, every prediction scored once (ALiBi paper, Sec. 2-4).
- sliding (stride S <= length): s_k = k * S; the first window scores all its predictions, later
  windows only their last S, so every scored token sees >= length - S tokens of context.
  With S = length both score the same windows and tokens. With S = 1 the "early token curse"
  vanishes and so does much of the extrapolation gain (paper App. B): always name method and stride.
The tail that does not fill a whole window is not scored; `tokens` in the result says how many were.
Nonoverlapping windows come from `pretrain.evaluate`, the definition training-time validation uses,
so a checkpoint's logged val/ppl_at_<n> and this tool agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pretrain.evaluate import nonoverlapping_nll

Method = Literal["nonoverlapping", "sliding"]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""[b, s] int64 token ids -> [b, s, vocab] logits (any float dtype)."""


@dataclass(frozen=True)
class Result:
    ppl: float
    tokens: int
    """Number of scored predictions."""
    nll_sum: float


def plan_windows(num_tokens: int, length: int, method: Method, stride: int | None) -> tuple[list[int], list[int], int]:
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
        raise ValueError(
            f"the evaluation stream has {num_tokens} tokens, fewer than length+1={length + 1}: "
            "use shorter --lengths or more data (e.g. --split all)"
        )
    starts = list(range(0, last_start + 1, stride))
    score_from = [0] + [length - stride] * (len(starts) - 1)
    return starts, score_from, stride


@torch.no_grad()
def perplexity(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    length: int,
    *,
    method: Method = "nonoverlapping",
    stride: int | None = None,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> Result:
    """Perplexity of `logits_fn` on the 1-D stream `tokens` at context `length` (see module doc)."""
    tokens = tokens.to(torch.long).flatten()
    starts, score_from, stride = plan_windows(tokens.numel(), length, method, stride)
    bar = tqdm(total=len(starts), desc=desc, unit="window", leave=False, disable=desc is None)

    def nll_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # [b, L], [b, L] -> [b, L]
        logits = logits_fn(x.to(device))  # [b, L, V]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 kept
        bar.update(x.shape[0])
        return F.cross_entropy(logits.transpose(1, 2), y.to(device), reduction="none")

    if method == "nonoverlapping":  # the definition shared with training-time validation
        nll_sum, count = nonoverlapping_nll(nll_fn, tokens, length, batch_size)
    else:
        offsets = torch.arange(length + 1)
        positions = torch.arange(length)
        nll_sum, count = 0.0, 0
        for i in range(0, len(starts), batch_size):
            chunk = tokens[torch.tensor(starts[i : i + batch_size])[:, None] + offsets]  # [b, L + 1]
            nll = nll_fn(chunk[:, :-1], chunk[:, 1:]).cpu()  # [b, L]
            scored = positions[None, :] >= torch.tensor(score_from[i : i + batch_size])[:, None]  # [b, L]
            nll_sum += nll[scored].double().sum().item()
            count += int(scored.sum())
    bar.close()
    return Result(ppl=math.exp(nll_sum / count), tokens=count, nll_sum=nll_sum)


def auto_batch_size(length: int, vocab: int, hidden: int, heads: int, layers: int, device: torch.device | str,
                    max_batch: int = 64) -> int:
    """Largest batch whose estimated activation memory fits a safe share of what is free.

    Per sample: logits and their log-softmax in fp32 (2 * L * V * 4 bytes), one layer's attention
    scores + float bias (2 * heads * L^2 * 4) and the residual stream of every layer kept by
    no_grad for one layer at a time (~16 * L * hidden * 4). Errs on the small side.
    """
    per_sample = 8 * length * vocab + 8 * heads * length * length + 64 * length * hidden
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.5 * free
    else:
        import psutil

        budget = 0.25 * psutil.virtual_memory().available
    return int(max(1, min(max_batch, budget // per_sample)))
