"""Running pretrain/train.py from the tools as a user would: one fresh single-process job."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

from data_prep.files import FileLock, LockBusy

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


class JobError(RuntimeError):
    """A tool's job could not run or finish; the message says why and what to do (no traceback)."""


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM):
    """A Popen preexec_fn: the child gets `sig` when this process dies, even by kill -9 (Linux
    prctl PR_SET_PDEATHSIG; elsewhere nothing is set). SIGTERM makes a trainer checkpoint at its
    next step boundary and exit, so a killed main job leaves no trainer running."""
    parent = os.getpid()
    # looked up here, not in the child: a dlopen between fork and exec could deadlock on a loader
    # lock another thread of the parent held at the fork
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def setup() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return setup


class OutputLock:
    """An exclusive lock (data_prep/files.py FileLock) on DIR/LOCK_NAME for one tool run over DIR
    (released when the process ends, kill -9 included); a second run is refused, naming the first's pid."""

    def __init__(self, directory: Path, what: str, name: str = ".lock"):
        self.path, self.what = directory / name, what
        self.file = FileLock(self.path)

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.file.acquire(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
        except LockBusy as e:
            raise JobError(f"{self.path.parent} is in use by another {self.what} ({e.holder or 'holder unknown'}): "
                           "wait for it to finish or stop it, or give this one another --output") from None
        return self

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.file.release()
