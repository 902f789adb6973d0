"""The run directory's lock and config history (pretrain/rundir.py), with real processes: a
held lock refuses a second holder naming host and pid, a holder killed with SIGKILL leaves a
stale run.lock that blocks nothing; config.yaml keeps a file per changed start."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import hold_lock, hold_lock_then_kill9  # noqa: E402


def test_lock_is_exclusive_names_its_holder_and_a_killed_holder_blocks_nothing(tmp_path):
    from pretrain.rundir import RunDirBusy, RunLock, holder

    run = tmp_path / "run"
    p = hold_lock(run)
    who = f"host {socket.gethostname()} pid {p.pid} since "
    assert holder(run).startswith(who)
    with pytest.raises(RunDirBusy, match=f"run directory {run} is in use by another trainer \\({who}"):
        RunLock(run).acquire()
    p.kill()
    p.wait()
    assert holder(run) is None and f"pid {p.pid} " in (run / "run.lock").read_text()  # stale: left, not held
    lock = RunLock(run)
    lock.acquire()
    assert holder(run).startswith(f"host {socket.gethostname()} pid {os.getpid()} since ")
    lock.release()
    dead = hold_lock_then_kill9(run)  # the conftest helper the end-to-end resume test uses
    assert holder(run) is None and f"pid {dead} " in (run / "run.lock").read_text()


def test_config_history_keeps_one_file_per_changed_start(tmp_path):
    from pretrain.rundir import write_config

    cfg = {"model": {"seq_length": 64}, "train": {"steps": 10}}
    assert write_config(tmp_path, cfg, 0).name == "config.step_00000000.yaml"
    assert write_config(tmp_path, cfg, 4) is None  # a plain requeue: nothing new
    changed = {"model": {"seq_length": 32}, "train": {"steps": 10}}
    assert write_config(tmp_path, changed, 7).name == "config.step_00000007.yaml"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == changed
    assert yaml.safe_load((tmp_path / "config.step_00000000.yaml").read_text()) == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.step_00000000.yaml", "config.step_00000007.yaml",
                                                          "config.yaml"]


def test_a_requeued_slurm_job_waits_for_its_own_earlier_starts_lock_only(tmp_path, monkeypatch):
    """After a node crash a network file system keeps the dead start's lock for a lease (~90 s):
    the requeued start of the same job waits for it; any other holder is refused at once."""
    import threading
    import time

    from pretrain.rundir import RunDirBusy, RunLock

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    earlier = hold_lock(tmp_path)  # restart 0 of job 77 (inherits the environment)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    threading.Timer(1.0, earlier.kill).start()  # its lease ends
    t0 = time.monotonic()
    lock = RunLock(tmp_path)
    lock.acquire(wait_s=30)
    assert 0.9 < time.monotonic() - t0 < 30 and "job 77 restart 1" in (tmp_path / "run.lock").read_text()
    lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: refused without waiting
    other = hold_lock(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(RunDirBusy, match=f"pid {other.pid} .* job 78 restart 1"):
        RunLock(tmp_path).acquire(wait_s=30)
    monkeypatch.setenv("SLURM_JOB_ID", "79")
    with pytest.raises(RunDirBusy):
        RunLock(tmp_path).acquire(wait_s=30)
    assert time.monotonic() - t0 < 5
    other.kill()
    other.wait()
