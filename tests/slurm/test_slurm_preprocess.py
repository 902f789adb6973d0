"""Data prep on a real SLURM: submitit job arrays give the local launcher's bytes, and
slurm/preprocess.sh retries a failed array task and reports its log."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VALID_FRACTION = 0.05  # as conftest.local_data
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def output_bytes(out_dir: Path) -> dict[str, bytes]:
    """Every shard and merged file of a preprocess output, by relative path."""
    return {str(p.relative_to(out_dir)): p.read_bytes() for d in ("shards", "merged")
            for p in sorted((out_dir / d).iterdir())}


def manifest(out_dir: Path) -> dict:
    m = json.loads((out_dir / "manifest.json").read_text())
    return {k: v for k, v in m.items() if k not in ("run", "output_dir")}


def preprocess_args(corpus, tok, out: Path) -> list[str]:
    return ["--input", *map(str, corpus), "--tokenizer", str(tok), "--output-dir", str(out),
            "--workers", "1", "--nodes", "2", "--valid-fraction", str(VALID_FRACTION), "--quiet"]


def array_tasks(slurm, name: str) -> list[str]:
    """sacct lines `jobid|state` of the array tasks named `name` (submitit names them so)."""
    out = slurm.run("sacct", "-X", "-n", "-P", "--name", name, "--format=jobid,state")
    return [line for line in out.splitlines() if "_" in line.split("|")[0]]


def test_slurm_submitit_launcher_is_byte_identical(slurm, corpus_and_tokenizer, local_data, tmp_path):
    corpus, tok = corpus_and_tokenizer
    before = set(array_tasks(slurm, "preprocess"))
    out = subprocess.run([sys.executable, "data_prep/preprocess.py", "--launcher", "slurm",
                          *preprocess_args(corpus, tok, tmp_path)],
                         cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 20  # accounting records the end a moment after the result file
    while True:  # the two array tasks really ran on SLURM
        tasks = [t for t in array_tasks(slurm, "preprocess") if t not in before]
        if len(tasks) == 2 and all(t.endswith("|COMPLETED") for t in tasks) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(tasks) == 2 and all(t.endswith("|COMPLETED") for t in tasks), tasks
    assert output_bytes(tmp_path) == output_bytes(local_data)
    assert manifest(tmp_path) == manifest(local_data)


def test_slurm_preprocess_sh_retries_a_failed_task(slurm, corpus_and_tokenizer, local_data, tmp_path):
    """Cancel an array task while it runs (as a node failure or preemption would end it): the
    coordinator's first attempt fails naming the task's files, the second runs only the missing
    chunks, and the output is the local launcher's, byte for byte."""
    corpus, tok = corpus_and_tokenizer
    log = tmp_path / "coordinator.out"
    out_dir = tmp_path / "data"
    job = slurm.sbatch(f"--output={log}", "slurm/preprocess.sh", *preprocess_args(corpus, tok, out_dir))
    deadline = time.monotonic() + 120
    # (a task cancelled while still *pending* leaves no accounting record: submitit then waits forever)
    while not (running := slurm.run("squeue", "-h", "-r", "-n", "preprocess", "-t", "RUNNING", "-o", "%i").split()):
        assert time.monotonic() < deadline and slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), \
            log.read_text()
        time.sleep(0.2)
    # The task dies at once, as on a node failure. Not `--signal=KILL`: SLURM turns that into a
    # cancel (SIGTERM, which submitit's task ignores, then SIGKILL after KillWait), and a task
    # that finishes its chunks inside KillWait (they take seconds) then counts as done. SIGABRT
    # is delivered as it is and ends the python at once. But a task is RUNNING before its python
    # exists (the .batch step, then srun's step .0 launching it): a signal sent then reaches no
    # process and the task goes on to finish. So signal until the task has left the queue.
    while running[0] in slurm.run("squeue", "-h", "-r", "-n", "preprocess", "-o", "%i").split():
        assert time.monotonic() < deadline, log.read_text()
        slurm.run("scancel", "--signal=ABRT", running[0], check=False)
        time.sleep(0.2)
    info = slurm.wait(job, 180)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "attempt 1 failed" in text and "attempt 2 of 3" in text, text
    assert str(out_dir / ".work" / "submitit") in text, text  # the failed task's files are named
    assert output_bytes(out_dir) == output_bytes(local_data)
    assert manifest(out_dir) == manifest(local_data)


def test_slurm_task_cancelled_while_pending_fails_with_its_log(slurm, corpus_and_tokenizer, tmp_path):
    """A task cancelled before it starts: whether its CANCELLED state reaches accounting or it
    leaves no record at all (submitit would then wait on UNKNOWN forever), preprocess names the
    task and its log, says how to resume, and exits 1."""
    corpus, tok = corpus_and_tokenizer
    args = preprocess_args(corpus, tok, tmp_path / "data")
    args[args.index("--workers") + 1] = "2"  # 2 cores per task on a 2-core node: one task waits
    proc = subprocess.Popen([sys.executable, "data_prep/preprocess.py", "--launcher", "slurm", *args], cwd=REPO,
                            env={**slurm.env, "PREPROCESS_LOST_GRACE_S": "5"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (pending := slurm.run("squeue", "-h", "-r", "-n", "preprocess", "-t", "PENDING", "-o", "%i").split()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    slurm.run("scancel", pending[-1])
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out
    assert f"{pending[-1]} (log " in out and "run the same command again to resume" in out, out
    slurm.run("scancel", "--name", "preprocess")  # the other task would keep the node busy for the next test
