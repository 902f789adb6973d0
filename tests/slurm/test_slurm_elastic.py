"""Elastic resume through slurm/pretrain_1p3b.sh on the one-node SLURM (CPU, gloo): a run trained
with 2 tasks, resubmitted from its mid-run checkpoint with 1 task, and that one resubmitted from
its own later checkpoint with 2 tasks again, continues with the uninterrupted run's losses
(1e-4 relative: other layouts sum in another order), the job log naming the layout change."""

import shutil
from pathlib import Path

import pytest

from pretrain.rundir import RunDir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS, EVERY = 12, 4
TIMEOUT = 300  # s per job; a tiny run takes ~20 s on 2 cores


def submit(slurm, run_dir: Path, data: Path, tasks: int) -> int:
    env = (f"ALL,CONFIG=configs/tiny_alibi.yaml,RUN_DIR={run_dir},DATA={data},WANDB_MODE=disabled,"
           f"EXTRA_ARGS=--steps {STEPS} --log-interval 1 --save-interval {EVERY} --micro-batch 2 "
           "train.global_batch_size=4 checkpoint.keep_last=3 validation.interval=0")
    return slurm.sbatch("--nodes=1", f"--ntasks-per-node={tasks}", "--gpus-per-node=0", "--cpus-per-task=1",
                        f"--export={env}", f"--output={run_dir}.out", "slurm/pretrain_1p3b.sh")


def run_job(slurm, run_dir: Path, data: Path, tasks: int) -> str:
    info = slurm.wait(submit(slurm, run_dir, data, tasks), TIMEOUT)
    log = Path(f"{run_dir}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert f"1 nodes x {tasks} tasks" in log, log
    return log


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(run_dir).records() if r.get("kind", "train") == "train"}


def back_to(run_dir: Path, step: int, to: Path) -> Path:
    """The run directory as it was when its checkpoint at `step` was the newest."""
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("metrics.jsonl", "run.lock", "wandb"))
    for later in (to / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (to / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return to


def test_slurm_resubmitted_with_another_task_count_continues(slurm, local_data, tmp_path):
    two, one = "world 2 = tp 1 x pp 1 x dp 2, ZeRO-1, micro-batch 2", "world 1 = tp 1 x pp 1 x dp 1, ZeRO-1, micro-batch 2"
    reference = tmp_path / "uninterrupted"
    run_job(slurm, reference, local_data, tasks=2)
    ref = losses(reference)
    assert sorted(ref) == list(range(1, STEPS + 1)), ref

    shrunk = back_to(reference, EVERY, tmp_path / "shrunk")  # 2 tasks -> 1 from step 4
    log = run_job(slurm, shrunk, local_data, tasks=1)
    assert f"resumed from {shrunk / 'checkpoints' / f'step_{EVERY:08d}'} at step {EVERY}" in log, log
    assert f"layout change: {two} -> {one}" in log, log
    got = losses(shrunk)
    assert sorted(got) == list(range(EVERY + 1, STEPS + 1)), got
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-4), (step, got, ref)

    grown = back_to(shrunk, 2 * EVERY, tmp_path / "grown")  # and back: 1 task -> 2 from step 8
    log = run_job(slurm, grown, local_data, tasks=2)
    assert f"layout change: {one} -> {two}" in log, log
    got = losses(grown)
    assert sorted(got) == list(range(2 * EVERY + 1, STEPS + 1)), got
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-4), (step, got, ref)
