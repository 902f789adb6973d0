"""Helpers shared by the tests (`from helpers import ...`: pyproject's pytest `pythonpath` puts
tests/ on sys.path): a free port, CPU ranks started the way torchrun or srun would, and the
greedy-decoding check of an HF export against our model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_alibi.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTED: list[subprocess.Popen] = []
"""Every process the helpers start; tests/conftest.py kills those still running after each test."""

# The launcher variables a test's own environment must not pass on to the ranks it starts.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID")


def launch(argv: list[str], world_size: int, env_extra: dict | None = None, *, srun: bool = False,
           **popen) -> list[subprocess.Popen]:
    """Start `world_size` ranks of `python argv...` the way torchrun would (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), without torchrun's own start-up cost, or with `srun`
    the way `srun` inside slurm/pretrain_1p3b.sh would (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
    and the script's MASTER_ADDR/MASTER_PORT). CPU ranks on any machine: CUDA hidden, DeepSpeed's
    CPU accelerator (a GPU machine would otherwise give ranks 1..3 a GPU they cannot share)."""
    port, cwd = free_port(), popen.pop("cwd", REPO)
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    procs = []
    for rank in range(world_size):
        ids = (dict(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size), SLURM_LOCALID=str(rank)) if srun else
               dict(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)))
        env = dict(base, **ids, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                   CUDA_VISIBLE_DEVICES="", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                   **(env_extra or {}))
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=cwd, **popen))
    STARTED.extend(procs)
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of all `procs`; on a timeout (a hang) every one of them is killed first."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        raise


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """A process holding the run directory's lock, as a trainer's rank 0 does, until killed."""
    code = "import sys, time\nfrom pretrain.rundir import RunLock\nRunLock(sys.argv[1]).acquire()\n" \
           "print('locked', flush=True)\ntime.sleep(600)"
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    STARTED.append(p)
    assert p.stdout.readline().strip() == "locked"
    return p


def hold_lock_then_kill9(run_dir: Path) -> int:
    """Leave run.lock behind as a trainer killed with SIGKILL does (naming a dead pid); returns the pid."""
    p = hold_lock(run_dir)
    p.kill()  # SIGKILL: no clean-up of any kind
    p.wait()
    return p.pid


def megatron_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Our megatron-core model's logits [b, s, V] for token ids `x` [b, s] (positions 0..s-1)."""
    with torch.no_grad():
        return model(x, torch.arange(x.shape[1]).expand_as(x), None, runtime_gather_output=True)


def assert_hf_generates_like(hf, model, prompt: torch.Tensor, new_tokens: int = 32) -> None:
    """HF's greedy `generate` of the exported `hf` gives the tokens that greedy decoding of our
    `model` by hand gives (argmax of the last position, appended, `new_tokens` times)."""
    ours = prompt
    for _ in range(new_tokens):
        ours = torch.cat([ours, megatron_logits(model, ours)[:, -1].argmax(-1, keepdim=True)], dim=1)
    theirs = hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert theirs.tolist() == ours.tolist()
