"""Process-group start-up: launcher environment -> torch.distributed -> megatron parallel_state.

Why here: one place owns the rank order (tp fastest, then dp, then pp: megatron's "tp-cp-ep-dp-pp"
and DeepSpeed's PipeModelDataParallelTopology(pipe, data, model) agree), the launcher variables
(torchrun, srun, or none), process-group start-up, the GPU switch and the DeepSpeed `mpu` adapter.
The layout arithmetic (tp x pp x dp) is `pretrain.layout`. torch, megatron-core and DeepSpeed
are imported where used: the entry points import `use_gpu` from here before their arguments are
parsed (--help loads no torch: tests/tools/test_tools_cli.py), and the tools and preflight that
read checkpoints run without megatron-core or DeepSpeed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from pretrain.layout import Layout


class LaunchError(RuntimeError):
    """The launcher's variables are incomplete, or the processes did not form the world the
    launcher promised (a split or packed launch)."""


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
        raise LaunchError(
            f"rank {rank} of {world}: MASTER_PORT=0 names no port, so the ranks cannot meet (they would "
            "wait 30 min to connect); launch with `torchrun --standalone` or `--master-port N`, or export "
            "a free MASTER_PORT"
        )
    elif world == 1:
        port = _free_port()
    else:
        raise LaunchError(
            f"rank {rank} of {world}: MASTER_PORT is not set; launch with torchrun, or export "
            "MASTER_ADDR and MASTER_PORT in the sbatch script before srun"
        )
    return DistEnv(rank, world, local, addr, port)


def promised_world(environ: dict[str, str] | None = None) -> tuple[int, int, str] | None:
    """(world size, node count, where they come from) that the launcher promised, when it says more
    than the world size itself: torchrun started once per node inside a SLURM job (SLURM's node
    count x torchrun's LOCAL_WORLD_SIZE). srun per rank and a bare torchrun have no second source
    (their world size is the promise); None then."""
    env = os.environ if environ is None else environ
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if "RANK" not in env or "LOCAL_WORLD_SIZE" not in env or not nodes:
        return None
    per_node = int(env["LOCAL_WORLD_SIZE"])
    return int(nodes) * per_node, int(nodes), f"{nodes} SLURM nodes x torchrun's LOCAL_WORLD_SIZE={per_node}"


def node_name(environ: dict[str, str] | None = None) -> str:
    """This task's node: SLURM's name for it (several SLURM nodes may share one host name), else
    the host name."""
    env = os.environ if environ is None else environ
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def check_world(env: DistEnv, environ: dict[str, str] | None = None) -> None:
    """No silent split world: the world size matches the launcher's promise (checked before the
    rendezvous, `promised_world`) and, once joined, (node, local rank) pairs are unique and span
    the promised nodes. Raises LaunchError naming both numbers and the likely cause."""
    import torch.distributed as dist
    promised = promised_world(environ)
    if promised is not None and promised[0] != env.world_size:
        raise LaunchError(
            f"rank {env.rank}: joining a world of {env.world_size} ranks, but the launcher promised "
            f"{promised[0]} ({promised[2]}): the nodes would train as separate worlds. Likely cause: "
            "torchrun's --nnodes/--node-rank (or --standalone) on each node, a MASTER_ADDR computed on each "
            "node instead of once, or a c10d vs static rendezvous mix; start one torchrun per node with "
            f"--nnodes {promised[1]} and the same --master-addr")
    if not dist.is_initialized():
        return
    me = (node_name(environ), env.local_rank)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    seen: dict[tuple[str, int], int] = {}
    for rank, pair in enumerate(everyone):
        if tuple(pair) in seen:
            raise LaunchError(
                f"rank {env.rank}: ranks {seen[tuple(pair)]} and {rank} are both local rank {pair[1]} on node "
                f"{pair[0]} (a world of {len(everyone)} ranks on {len({p[0] for p in everyone})} node(s)"
                + (f", {promised[1]} promised" if promised else "") + "): two launches on one node joined one "
                "world. Likely cause: more than one torchrun per node (srun without --ntasks-per-node=1), or "
                "the same --node-rank given to two nodes")
        seen[tuple(pair)] = rank
    nodes = len({p[0] for p in everyone})
    if promised is not None and nodes != promised[1]:
        raise LaunchError(
            f"rank {env.rank}: the world of {len(everyone)} ranks spans {nodes} node(s), but the launcher "
            f"promised {promised[1]} ({promised[2]}): likely more than one torchrun on a node; start one "
            "per node (srun --ntasks-per-node=1)")


def use_gpu() -> bool:
    """Whether this process runs on a GPU: CUDA is visible and DeepSpeed's accelerator is not set
    to another one (`DS_ACCELERATOR=cpu`, which the CPU tests and CPU SLURM jobs set, keeps a GPU
    machine's process on the CPU). The one switch for the process-group backend, the device,
    `precision: auto`, the `auto` attention kernel and peak-memory readings."""
    import torch
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def cuda_device(local_rank: int, visible: int) -> int:
    """The CUDA device index of the task with `local_rank` when it sees `visible` devices. One
    task per GPU either sees the node's GPUs (torchrun, `srun --gpus-per-node`: device = local
    rank) or only its own (`srun --gpus-per-task=1`, a per-task CUDA_VISIBLE_DEVICES: device 0);
    `local_rank mod visible` covers both."""
    if visible < 1:
        raise RuntimeError(f"local rank {local_rank}: no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); request GPUs from the launcher or "
                           "set DS_ACCELERATOR=cpu to run on the CPU")
    return local_rank % visible


def _start_process_group(env: DistEnv, timeout_s: float = 1800) -> None:
    """The default process group (nccl on GPU, gloo on CPU), this task's GPU selected first. The
    launcher variables are also exported, since DeepSpeed's init_distributed reads them and then
    finds this group running; the engine gets the same GPU (`torch.cuda.current_device()`).
    `timeout_s`: how long a collective (and the rendezvous) waits for a missing peer."""
    import torch
    import torch.distributed as dist
    gpu = use_gpu()
    if gpu:
        torch.cuda.set_device(cuda_device(env.local_rank, torch.cuda.device_count()))
    check_world(env)  # before the rendezvous: a split world must not start
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
                      RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    dist.init_process_group(
        backend="nccl" if gpu else "gloo",
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    check_world(env)


def seed_rng(seed: int) -> None:
    """Seed torch, and megatron-core's model-parallel RNG tracker (GPU) or its no-op CPU
    stand-in (the CUDA tracker cannot be created without a GPU)."""
    import torch
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if use_gpu():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def init_model_parallel(tp: int = 1, pp: int = 1, *, seed: int = 1234, env: DistEnv | None = None,
                        timeout_s: float = 1800) -> None:
    """Join or start torch.distributed, build megatron-core's parallel_state groups for tp x pp
    (data parallel = world / (tp x pp)), then seed.

    Without a running process group one is started from `env` (default: the launcher's,
    `read_env()`: torchrun, srun, or a single process on a free port), with `timeout_s` for its
    collectives, and the world it joined is checked against the launcher's (`check_world`). Calling it again with
    another tp/pp rebuilds megatron's groups on the same process group (tests, tools). megatron's
    CPU patches come with the model (`build_model` applies `pretrain.model.compat`)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        _start_process_group(env or read_env(), timeout_s)
    world = dist.get_world_size()
    if Layout.errors(world, tp, pp):  # worded for this function's arguments
        raise ValueError(f"world size {world} is not divisible by tp x pp = {tp} x {pp}: pass degrees whose "
                         "product divides it")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # No gloo twins of the data-parallel groups: DeepSpeed never uses them, and on 128 ranks they
    # are a gloo mesh built at start-up (a hang where the hostname resolves to the wrong interface).
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             create_gloo_process_groups=False)
    seed_rng(seed)


def destroy() -> None:
    import torch.distributed as dist
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
