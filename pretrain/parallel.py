"""Process-group set-up: launcher environment -> torch.distributed -> megatron parallel_state.

Why here: one place owns the rank order (tp fastest, then dp, then pp: megatron's
"tp-cp-ep-dp-pp" and DeepSpeed's PipeModelDataParallelTopology(pipe, data, model) agree),
the launcher variables (torchrun, srun, or none) and the DeepSpeed `mpu` adapter.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank and rendezvous from torchrun (RANK/WORLD_SIZE/LOCAL_RANK), else SLURM
    (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, MASTER_ADDR/MASTER_PORT exported by the sbatch
    script), else a single plain process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in env and (int(env["MASTER_PORT"]) or world == 1):
        port = int(env["MASTER_PORT"]) or _free_port()
    elif "MASTER_PORT" in env:
        raise RuntimeError(
            f"rank {rank} of {world}: MASTER_PORT=0 names no port, so the ranks cannot meet (they would "
            "wait 30 min to connect); launch with `torchrun --standalone` or `--master-port N`, or export "
            "a free MASTER_PORT"
        )
    elif world == 1:
        port = _free_port()
    else:
        raise RuntimeError(
            f"rank {rank} of {world}: MASTER_PORT is not set; launch with torchrun, or export "
            "MASTER_ADDR and MASTER_PORT in the sbatch script before srun"
        )
    return DistEnv(rank, world, local, addr, port)


def init_distributed(env: DistEnv, tensor_parallel: int, pipeline_parallel: int, seed: int) -> None:
    """Start the default process group (nccl on GPU, gloo on CPU) and megatron's model-parallel
    groups. We start torch.distributed ourselves so DeepSpeed's init_distributed finds it
    already running (see engine.py for the CPU shm-op build we avoid)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
                      RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=30),
        )
    from pretrain.model.compat import init_model_parallel

    init_model_parallel(tensor_parallel, pipeline_parallel, seed=seed)


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """The `mpu` DeepSpeed expects (get_model_parallel_*), answered by megatron's parallel_state
    (which names them get_tensor_model_parallel_*)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    # DeepSpeed >= 0.14 also asks for these names.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()


def accelerator_device() -> str:
    """This rank's device as DeepSpeed's accelerator names it ("cuda:N" or "cpu")."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()
