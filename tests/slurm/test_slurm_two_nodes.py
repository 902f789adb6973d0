"""slurm/pretrain_1p3b.sh and data prep on a real two-node SLURM (n1, n2: two slurmd on this
machine, gloo over loopback), each through the user's own `sbatch` line with CPU overrides:
- tp=2 inside a node and dp=2 across nodes, and pp=2 across nodes with a USR1 requeue mid-run:
  every step's loss equals the single-process run's (the layouts tolerance);
- node failure (kill -9 of n2's slurmd and its tasks): the job ends within a bound, is requeued,
  and when n2 is back resumes from the newest checkpoint and finishes with the right losses;
- a crash (kill -9 of one rank, twice): requeued once, since the run made a checkpoint, not the
  second time, which repeats the crash with no new checkpoint; the log names the first failure;
- `preprocess.py --launcher slurm` over both nodes is byte-identical to `--launcher local`.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 12
TIMEOUT = 400  # s per job: 4 ranks on 2 loaded cores
LOSS_TOL = 1e-5  # tests/train/test_train_layouts.py: fp32 layouts vs the single process
DIST_TIMEOUT_S = 30  # train.dist_timeout_s in these jobs: a dead peer ends the others within this
BOUND_S = 150  # kill -> job no longer running: dist timeout + the requeue decision's probes, on a loaded machine


def train_args(run_dir: Path, data: Path, extra: str = "") -> list[str]:
    return ["--config", "configs/tiny_alibi.yaml", "--run-dir", str(run_dir), "--data", str(data), "--steps",
            str(STEPS), "--log-interval", "1", *extra.split()]


def submit(slurm, run_dir: Path, data: Path, extra: str) -> int:
    """2 nodes x 2 CPU tasks (gloo); `extra`: more train.py arguments."""
    env = (f"ALL,CONFIG=configs/tiny_alibi.yaml,RUN_DIR={run_dir},DATA={data},WANDB_MODE=disabled,"
           f"EXTRA_ARGS=--steps {STEPS} --log-interval 1 train.dist_timeout_s={DIST_TIMEOUT_S} {extra}")
    return slurm.sbatch("--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                        f"--export={env}", f"--output={run_dir}.out", "slurm/pretrain_1p3b.sh")


def metrics(run_dir: Path) -> list[dict]:
    return RunDir(run_dir).records()


def final_losses(run_dir: Path) -> dict[int, float]:
    """Each step's last logged loss (a step redone after a resume is logged again)."""
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def assert_losses(run_dir: Path, reference: dict[int, float]) -> None:
    got = final_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    worst = max(abs(got[s] - reference[s]) for s in got)
    assert worst < LOSS_TOL, f"worst loss difference to the single process {worst:.2e}: {got} vs {reference}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


def log_of(run_dir: Path) -> str:
    path = Path(f"{run_dir}.out")
    return path.read_text() if path.exists() else ""


def wait_for(what, timeout: float, check, job=None, slurm=None, run_dir=None):
    """Poll `check()` every 0.1 s until it returns a truthy value; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            state = slurm.job(job) if slurm else {}
            pytest.fail(f"{what}: not after {timeout} s; job {state}\n{log_of(run_dir) if run_dir else ''}")
        time.sleep(0.1)
    return value


def processes(**env) -> list[int]:
    """Pids whose environment holds every NAME=value of `env` (the tasks of a job on one node);
    NAME=None: NAME is not set."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if not p.name.isdigit():
                continue
            have = dict(v.split(b"=", 1) for v in (p / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if all(have.get(k.encode()) == (v if v is None else v.encode()) for k, v in env.items()):
            pids.append(int(p.name))
    return pids


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture(scope="module")
def reference(local_data, tmp_path_factory) -> dict[int, float]:
    """The single-process run (no SLURM, no process group to speak of): per-step losses."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                         "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, "pretrain/train.py", *train_args(run_dir, local_data)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    return final_losses(run_dir)


def test_two_nodes_tp2_dp2_match_single_process(slurm2, local_data, reference, tmp_path):
    t0 = time.monotonic()
    run_dir = tmp_path / "tp2"
    info = slurm2.wait(submit(slurm2, run_dir, local_data, "--tp 2"), TIMEOUT)
    log = log_of(run_dir)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", log
    assert "2 nodes x 4 tasks" in log, log
    assert_losses(run_dir, reference)
    print(f"2 nodes x 2 tasks tp=2 dp=2, {STEPS} steps: {time.monotonic() - t0:.1f} s from sbatch to the end")


def test_two_nodes_pp2_usr1_requeue_keeps_every_step(slurm2, local_data, reference, tmp_path):
    run_dir = tmp_path / "pp2"
    job = submit(slurm2, run_dir, local_data, "--pp 2 --save-interval 1000")
    wait_for("step 3", TIMEOUT, lambda: metrics(run_dir) and metrics(run_dir)[-1]["step"] >= 3, job, slurm2, run_dir)
    slurm2.run("scancel", "--signal=USR1", "--batch", str(job))
    info = slurm2.wait(job, TIMEOUT)
    log = log_of(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "requeueing (restart 1 of at most 30): checkpoint saved after SIGUSR1" in log, log
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1)), steps  # none lost or repeated across the requeue
    assert_losses(run_dir, reference)


def kill_node(slurm2, node: str) -> list[int]:
    """kill -9 of `node`'s slurmd and everything running for it: its tasks and their slurmstepd."""
    tasks = processes(SLURMD_NODENAME=node, SLURM_CONF=slurm2.env["SLURM_CONF"])
    victims = set(tasks) | {parent(p) for p in tasks if b"slurmstepd" in Path(f"/proc/{parent(p)}/cmdline").read_bytes()}
    slurmd = int(Path(slurm2.env["SLURM_CONF"]).parents[1].joinpath("run", f"slurmd.{node}.pid").read_text())
    for pid in victims | {slurmd}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(victims)


def test_node_failure_requeues_and_resumes_when_the_node_returns(slurm2, local_data, reference, tmp_path):
    run_dir = tmp_path / "nodefail"
    job = submit(slurm2, run_dir, local_data, "--tp 2 --save-interval 4")
    wait_for("step 6", TIMEOUT, lambda: metrics(run_dir) and metrics(run_dir)[-1]["step"] >= 6, job, slurm2, run_dir)
    killed = kill_node(slurm2, "n2")
    t_kill = time.monotonic()
    assert len(killed) >= 3, killed  # 2 tasks (and their python) and a slurmstepd
    # the surviving ranks on n1 end and the job leaves RUNNING (requeued: PENDING, or completing)
    slurm2.wait(job, BOUND_S, until=lambda i: i["JobState"] != "RUNNING" or i["Restarts"] != "0")
    t_end = time.monotonic() - t_kill
    subprocess.run([str(SCRIPT), "--nodes", "2", "start"], env=slurm2.env, check=True, capture_output=True, timeout=120)
    info = slurm2.wait(job, TIMEOUT)
    t_done = time.monotonic() - t_kill
    log = log_of(run_dir)
    # a second restart when SLURM's late cleanup of the lost attempt ends the first one on n2
    assert info["JobState"] == "COMPLETED" and info["Restarts"] in ("1", "2"), log
    if info["Restarts"] == "2":
        assert re.search(r"requeueing \(restart 2 of at most 30\): the previous attempt (lost node\(s\) n2|was ended by SLURM)",
                         log), log
    ours = "requeueing (restart 1 of at most 30): the allocation lost node(s) n2" in log
    assert ours or "DUE TO NODE FAILURE" in log, log  # our decision, or SLURM's if it marked n2 down first
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))  # the first resume
    assert resumed >= 4 and resumed % 4 == 0, log  # the newest checkpoint before the kill
    assert_losses(run_dir, reference)
    print(f"node failure: kill -> job not running {t_end:.1f} s, kill -> run finished {t_done:.1f} s, "
          f"requeued by {'the script (lost node)' if ours else 'SLURM (node down)'}, resumed at step {resumed}, "
          f"restarts {info['Restarts']}")


def test_crash_requeues_once_after_progress_and_not_when_it_repeats(slurm2, local_data, tmp_path):
    run_dir = tmp_path / "crash"
    job = submit(slurm2, run_dir, local_data, "--tp 2 --save-interval 4")

    def rank3(restart: int) -> list[int]:  # rank 3's python (on n2) in the given attempt, not its task.sh
        count = str(restart) if restart else None  # unset in the first attempt
        return [p for p in processes(SLURM_JOB_ID=str(job), SLURM_PROCID="3", SLURM_RESTART_COUNT=count,
                                     SLURM_CONF=slurm2.env["SLURM_CONF"])
                if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[1:2] == [str(REPO / "pretrain" / "train.py").encode()]]

    # attempt 1 crashes after its step-4 checkpoint: requeued, since it made progress
    wait_for("step 5", TIMEOUT, lambda: metrics(run_dir) and metrics(run_dir)[-1]["step"] >= 5, job, slurm2, run_dir)
    os.kill(wait_for("rank 3", 30, lambda: rank3(0))[0], signal.SIGKILL)
    # attempt 2 crashes the same way before any new checkpoint: not requeued
    os.kill(wait_for("rank 3 of the requeued job", TIMEOUT, lambda: rank3(1), job, slurm2, run_dir)[0], signal.SIGKILL)
    info = slurm2.wait(job, TIMEOUT)
    log = log_of(run_dir)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", log
    first = re.search(r"requeueing \(restart 1 of at most 30\): a failed step with a newer checkpoint "
                      r"\((step_\d+)\) than this attempt started from \(none\)", log)
    assert first, log
    assert "not requeueing: the step failed with no checkpoint newer than the one this attempt started from " \
           f"({first.group(1)})" in log, log
    # the first attempt's part of the log ends with its first failure: rank 3 on n2, not the
    # others' broken connections (the second attempt's first failure may be SLURM's late
    # cleanup of the first: docs/slurm.md)
    first_attempt = log.split("start (restart 1)")[0].rsplit("\n", 1)[0]
    ours = [line for line in first_attempt.splitlines() if line.startswith("[pretrain_1p3b.sh")]
    assert re.search(r"first failure: rank 3 on node n2 failed first \(killed by SIGKILL at [\d:.]+\); its last "
                     r"error line: ", ours[-1]), ours[-3:]
    assert "not requeueing" in [line for line in log.splitlines() if line.startswith("[pretrain_1p3b.sh")][-2]


def test_preprocess_over_both_nodes_is_byte_identical(slurm2, corpus_and_tokenizer, local_data, tmp_path):
    corpus, tok = corpus_and_tokenizer
    args = ["--input", *map(str, corpus), "--tokenizer", str(tok), "--output-dir", str(tmp_path), "--nodes", "2",
            "--workers", "2", "--valid-fraction", "0.05", "--quiet"]  # as conftest.local_data; 2 cores: a node each
    out = subprocess.run([sys.executable, "data_prep/preprocess.py", "--launcher", "slurm", *args],
                         cwd=REPO, env=slurm2.env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    nodes = wait_for("accounting of the array tasks", 30, lambda: {
        line.split("|")[1] for line in slurm2.run("sacct", "-X", "-n", "-P", "--name", "preprocess",
                                                  "--format=jobid,nodelist,state").splitlines()
        if "_" in line.split("|")[0] and line.endswith("|COMPLETED")} >= {"n1", "n2"})
    assert nodes
    # every token file (training on local_data adds its index caches beside them: not compared)
    names = sorted(str(p.relative_to(local_data)) for d in ("shards", "merged") for p in (local_data / d).iterdir()
                   if p.suffix in (".bin", ".idx"))
    assert names and sorted(str(p.relative_to(tmp_path)) for d in ("shards", "merged")
                            for p in (tmp_path / d).iterdir()) == names
    for name in names:
        assert (tmp_path / name).read_bytes() == (local_data / name).read_bytes(), name
    mine, theirs = (json.loads((o / "manifest.json").read_text()) for o in (tmp_path, local_data))
    assert {k: v for k, v in mine.items() if k not in ("run", "output_dir")} == \
        {k: v for k, v in theirs.items() if k not in ("run", "output_dir")}
