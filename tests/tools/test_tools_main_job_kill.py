"""The main job killed with kill -9 takes its trainers with it (they get SIGTERM from the kernel:
PR_SET_PDEATHSIG), and a rerun while a trainer or another main job holds the output says "in
use" in one line (issue 18, item 20). Waits poll a condition against a deadline."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pretrain.rundir import RunDir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
RUNS = ("sinusoidal", "rope", "t5", "alibi")


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def trainer_pids(out: Path) -> dict[str, int]:
    """Run name -> pid of the trainer holding its run.lock, for the runs locked now."""
    held = {name: RunDir(out / "runs" / name).holder() for name in RUNS}
    return {name: int(re.search(r"pid (\d+)", h)[1]) for name, h in held.items() if h}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def hold(code: str, *args: str) -> subprocess.Popen:
    """A process that runs `code` (taking a lock), prints 'held' and sleeps until killed."""
    p = subprocess.Popen([sys.executable, "-c", code + "\nprint('held', flush=True)\nimport time; time.sleep(600)", *args],
                         stdout=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    assert p.stdout.readline().strip() == "held"
    return p


CMD = [sys.executable, str(REPO / "tools" / "main_job.py"), "--quick", "--steps", "2000", "--output"]
"""Trainers that run long enough to be killed."""


def test_kill9_of_the_main_job_stops_its_trainers_and_a_rerun_says_in_use(quick_job, tmp_path):
    out = tmp_path / "job"
    for stage in ("corpus", "tokenizer", "data"):  # the finished data stages are reused: the job starts training
        shutil.copytree(quick_job[0] / stage, out / stage)
    pids: dict[str, int] = {}
    helpers: list[subprocess.Popen] = []
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(CMD + [str(out)], cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        pids = wait_for(lambda: p if len(p := trainer_pids(out)) == len(RUNS) else None, 600,
                        f"all four trainers started (log: {tmp_path / 'job.log'})")
        assert job.poll() is None
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
        wait_for(lambda: not any(alive(p) for p in pids.values()), 180,
                 f"trainers {pids} gone after kill -9 of their main job")
        assert trainer_pids(out) == {}

        # a trainer still running on one of the runs (say, started by hand): the rerun names it
        helpers.append(hold("import sys\nfrom pretrain.rundir import RunLock\nRunLock(sys.argv[1]).acquire()",
                            str(out / "runs" / "rope")))
        res = subprocess.run(CMD + [str(out)], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
        assert res.returncode == 1, res.stderr
        (line,) = [x for x in res.stderr.splitlines() if x.startswith("main_job.py: error:")]
        assert f"run directory {out / 'runs' / 'rope'} is in use by another trainer (host " in line
        assert f"pid {helpers[0].pid} since" in line and "Traceback" not in res.stderr
        assert trainer_pids(out) == {"rope": helpers[0].pid}  # no trainer was started beside it
        helpers.pop().kill()

        # another main job on the same --output
        helpers.append(hold("import sys\nfrom pathlib import Path\nfrom tools.jobs import OutputLock\n"
                            "OutputLock(Path(sys.argv[1]), 'main job', '.main_job.lock').acquire()", str(out)))
        res = subprocess.run(CMD + [str(out)], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        (line,) = [x for x in res.stderr.splitlines() if x.startswith("main_job.py: error:")]
        assert re.fullmatch(rf"main_job\.py: error: {re.escape(str(out))} is in use by another main job \(pid "
                            rf"{helpers[0].pid} since [^)]+\): wait for it to finish or stop it, or give this one "
                            r"another --output", line), line
    finally:
        if job.poll() is None:
            job.kill()
        for p in helpers:
            p.kill()
        for pid in pids.values():  # on failure only: the trainers this test started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
