"""Running pretrain/train.py from the tools as a user would: one fresh single-process job."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def train_cmd(config: str | Path, run_dir: Path, data: Path | str, *flags: str, overrides: list[str] = ()) -> list[str]:
    return [sys.executable, str(ROOT / "pretrain" / "train.py"), "--config", str(config), "--run-dir", str(run_dir),
            "--data", str(data), *flags, *overrides]


def child_env(**extra: str) -> dict[str, str]:
    """This environment without the torch.distributed rendezvous of the calling process (a tool
    that evaluated a model holds a process group on MASTER_PORT; the child must not reuse it)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.setdefault("WANDB_MODE", "disabled")
    return {**env, **extra}
