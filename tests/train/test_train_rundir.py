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
