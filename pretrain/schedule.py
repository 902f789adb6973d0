"""Learning rate as a pure function of the step: linear warm-up, then cosine to min_lr.

Why pure: a resumed run needs no scheduler state to continue exactly, and any step's LR can be
recomputed by a test or a plot.
"""

from __future__ import annotations

import math

from pretrain.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based). Warm-up reaches `lr` at step warmup_steps; the
    cosine reaches `min_lr` at decay_steps (default total_steps) and stays there."""
    decay = optim.decay_steps or total_steps
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if step >= decay:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay - optim.warmup_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))
