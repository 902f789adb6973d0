"""No silent split world: train.py started as two "nodes" of a SLURM job (torchrun's variables,
one world of 1 per node where 2 were promised) refuses to train with one clear error naming both
numbers; a world whose ranks claim the same (node, local rank) is refused too; the same ranks
launched right form one world. CPU, gloo, no SLURM needed (the variables are SLURM's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import LAUNCHER_VARS, REPO, STARTED, TINY, free_port

pytestmark = pytest.mark.slow
JOIN = ("from pretrain import parallel; parallel._start_process_group(parallel.read_env(), 120); "
        "import torch.distributed as dist; print('joined', dist.get_rank(), dist.get_world_size())")


def start(argv: list[str], ranks: list[dict[str, str]], port: int, tmp_path: Path) -> list[subprocess.Popen]:
    """One process per entry of `ranks` (its torchrun and SLURM variables), all with MASTER_PORT `port`,
    as `torchrun --nproc-per-node 1` would start them on the node named in SLURMD_NODENAME of a
    2-node `srun --ntasks-per-node=1` step."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM")}
    procs = []
    for ids in ranks:
        env = dict(base, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="1",
                   SLURM_JOB_ID="7", SLURM_STEP_NUM_NODES="2", SLURM_NNODES="2", DS_ACCELERATOR="cpu",
                   CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO), **ids)
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=tmp_path, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    STARTED.extend(procs)
    return procs


def rank(r: int, world: int, node: str) -> dict[str, str]:
    return dict(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK="0", SLURMD_NODENAME=node, GROUP_RANK=str(r))


def test_split_packed_and_right_launches(tiny_data, tmp_path):
    # each node's torchrun started as its own world (--standalone / --nnodes 1): two worlds of 1
    train = [str(REPO / "pretrain" / "train.py"), "--config", str(TINY), "--data", str(tiny_data), "--steps", "1",
             "--run-dir", str(tmp_path / "run"), "train.global_batch_size=8"]
    split = [p for node in ("n1", "n2") for p in start(train, [rank(0, 1, node)], free_port(), tmp_path)]
    # one world of 2, but both torchruns landed on n1 (srun without --ntasks-per-node=1)
    packed = start(["-c", JOIN], [rank(r, 2, "n1") for r in range(2)], free_port(), tmp_path)
    right = start(["-c", JOIN], [rank(r, 2, f"n{r + 1}") for r in range(2)], free_port(), tmp_path)
    out = [p.communicate(timeout=300) + (p.returncode,) for p in split + packed + right]

    for stdout, stderr, code in out[:2]:
        assert code == 2, stdout + stderr
        assert "joining a world of 1 ranks, but the launcher promised 2 (2 SLURM nodes x torchrun's " \
               "LOCAL_WORLD_SIZE=1)" in stderr and "--nnodes 2" in stderr, stderr
        assert "Traceback" not in stderr and not (tmp_path / "run" / "metrics.jsonl").exists(), stderr
    for stdout, stderr, code in out[2:4]:
        assert code != 0 and "joined" not in stdout, stdout + stderr
        assert "ranks 0 and 1 are both local rank 0 on node n1 (a world of 2 ranks on 1 node(s), 2 promised)" \
            in stderr, stderr
    assert sorted(o[0].split()[1:] for o in out[4:]) == [["0", "2"], ["1", "2"]], out[4:]
    assert [o[2] for o in out[4:]] == [0, 0], out[4:]
