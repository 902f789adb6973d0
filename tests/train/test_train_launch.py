"""Start-up on a cluster, without a GPU: srun's variables make one process group of the
benchmark's tasks, each task's GPU is the one it can see, megatron builds no gloo
data-parallel groups, and the benchmark writes nothing but its result."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from pretrain import parallel
from pretrain.parallel import read_env

from helpers import TINY, launch, wait_all


def test_each_task_gets_a_gpu_it_can_see():
    from pretrain.parallel import cuda_device

    assert [cuda_device(r, 8) for r in range(8)] == list(range(8))  # every GPU visible (torchrun)
    assert [cuda_device(r, 1) for r in range(8)] == [0] * 8  # --gpus-per-task=1: only its own
    assert cuda_device(5, 4) == 1  # 2 tasks' worth of GPUs each, as --gpus-per-task=4 x 2 tasks
    with pytest.raises(RuntimeError, match="no CUDA device is visible.*DS_ACCELERATOR=cpu"):
        cuda_device(0, 0)


def test_ds_accelerator_cpu_keeps_a_gpu_machine_on_the_cpu(monkeypatch):
    """The one switch behind backend, bf16, kernel and memory readings: a GPU machine runs on the
    GPU unless DS_ACCELERATOR names another accelerator (the CPU tests set cpu)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for value, gpu in ((None, True), ("cuda", True), ("cpu", False)):
        if value is None:
            monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        else:
            monkeypatch.setenv("DS_ACCELERATOR", value)
        assert parallel.use_gpu() is gpu, value
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert parallel.use_gpu() is False


def test_srun_task_with_one_visible_gpu_selects_device_0(monkeypatch):
    """What init_model_parallel does on a node with --gpus-per-task=1 (simulated: one visible
    GPU, task 3 of 4): set_device(0), not set_device(LOCAL_RANK=3), then nccl."""
    calls = {}
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("device", index))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.update(kw))
    env = read_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "MASTER_ADDR": "n1",
                    "MASTER_PORT": "12345"})
    parallel._start_process_group(env)
    assert calls["device"] == 0 and calls["backend"] == "nccl"
    assert (calls["rank"], calls["world_size"]) == (3, 4) and os.environ["LOCAL_RANK"] == "3"


def test_megatron_builds_no_gloo_data_parallel_groups():
    from megatron.core import parallel_state as ps

    parallel.init_model_parallel(1, 1, seed=0)
    assert ps.get_data_parallel_world_size() == 1
    with pytest.raises(AssertionError, match="not initialized"):
        ps.get_data_parallel_group_gloo()


@pytest.mark.slow
def test_bench_train_under_srun_is_one_group_and_writes_only_its_result(tmp_path):
    """tools/bench/train.py as `srun` starts it (SLURM_PROCID/NTASKS/LOCALID, no RANK): the two
    tasks form one process group (world 2, data-parallel 2, tokens/s over the global batch)
    and, in a fresh working directory, write nothing but --out (no checkpoint)."""
    procs = launch(["-m", "tools.bench.train", "--config", str(TINY), "--steps", "2", "--warmup", "1",
                    "--out", "bench.json"], 2, srun=True, cwd=tmp_path)
    assert wait_all(procs, timeout=300) == [0, 0]
    (r,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert r["world_size"] == 2 and r["data_parallel"] == 2
    assert r["precision"] == "fp32" and r["micro_batch_size"] == 8 and r["attention_kernel"] == "sdpa"
    assert r["tokens_per_s"] == pytest.approx(2 * 8 * 64 / r["step_time_s"])
    assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 989.0) and r["estimate_gb"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


@pytest.mark.slow
def test_compare_bench_run_writes_no_checkpoint(tiny_data, tmp_path, monkeypatch):
    """tools/compare_runs.py bench trains each config through train.py: metrics, but no
    checkpoint (a 1.3B one is ~22 GB)."""
    from tools.bench.compare import BenchSpec, run_one

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    spec = BenchSpec("tiny", TINY, 64)
    records = run_one(spec, data=str(tiny_data), steps=2, tokens_per_batch=256, backend="sdpa", out_dir=tmp_path,
                      overrides=["model.num_layers=1"])
    assert [r["step"] for r in records] == [1, 2]
    names = {p.name for p in (tmp_path / "tiny").iterdir()}  # the config (and its history), metrics, the lock
    assert "metrics.jsonl" in names and "checkpoints" not in names, names
    assert names - {"config.yaml", "metrics.jsonl", "run.lock"} <= {"config.step_00000000.yaml"}, names
