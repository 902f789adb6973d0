"""slurm/pretrain_1p3b.sh on a real SLURM, 1 node x 2 CPU tasks (gloo), the tiny ALiBi config:
it trains to the end, and a USR1 sent mid-run makes the job checkpoint, requeue itself and
resume, with the losses of an uninterrupted run."""

import math
import time
from pathlib import Path

import pytest

from pretrain.rundir import RunDir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 30
TIMEOUT = 240  # s per job; a tiny run takes ~20 s on 2 cores


def submit(slurm, run_dir: Path, data: Path) -> int:
    """The issue's command line for the CPU test cluster. No periodic checkpoint before the end:
    a resumed run can only have started from the checkpoint the signal made."""
    env = (f"ALL,CONFIG=configs/tiny_alibi.yaml,RUN_DIR={run_dir},DATA={data},WANDB_MODE=disabled,"
           f"EXTRA_ARGS=--steps {STEPS} --log-interval 1 --save-interval 1000")
    return slurm.sbatch("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--export={env}",
                        f"--output={run_dir}.out", "slurm/pretrain_1p3b.sh")


def metrics(run_dir: Path) -> list[dict]:
    """Rows of metrics.jsonl (a line still being written is left out)."""
    return RunDir(run_dir).records()


def latest_checkpoint(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def uninterrupted(slurm, local_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain") / "uninterrupted"
    info = slurm.wait(submit(slurm, run_dir, local_data), TIMEOUT)
    return run_dir, info


def test_slurm_pretrain_trains_to_the_end(uninterrupted):
    run_dir, info = uninterrupted
    log = Path(f"{run_dir}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "0" and "1 nodes x 2 tasks" in log, log
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # it learns (8.3 -> ~6.3 in 30 steps)
    assert latest_checkpoint(run_dir) == f"step_{STEPS:08d}"


def test_slurm_usr1_checkpoints_requeues_and_resumes(slurm, uninterrupted, local_data, tmp_path):
    reference = {r["step"]: r["loss"] for r in metrics(uninterrupted[0])}
    run_dir = tmp_path / "signalled"
    job = submit(slurm, run_dir, local_data)
    deadline = time.monotonic() + TIMEOUT
    while not metrics(run_dir) or metrics(run_dir)[-1]["step"] < 3:  # mid-run, past start-up
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            Path(f"{run_dir}.out").read_text()
        time.sleep(0.1)
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))  # what --signal=B:USR1@300 sends
    info = slurm.wait(job, TIMEOUT)
    log = Path(f"{run_dir}.out").read_text()  # --open-mode=append: both runs in one log
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    assert "got SIGUSR1" in log and "requeueing (restart 1" in log and "start (restart 1)" in log, log

    rows = metrics(run_dir)
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, STEPS + 1)), steps  # no step lost or repeated across the requeue
    stopped = int(log.split("checkpoint at step ")[1].split()[0])  # the trainer's own words
    assert 3 <= stopped < STEPS
    for r in rows:  # before and after the resume: the uninterrupted run's losses
        assert r["loss"] == pytest.approx(reference[r["step"]], rel=1e-6, abs=1e-6), (r["step"], stopped)
    assert latest_checkpoint(run_dir) == f"step_{STEPS:08d}"
