"""The run directory's lock and config history (pretrain/rundir.py), with real processes: a
held lock refuses a second holder naming host and pid, a holder killed with SIGKILL leaves a
stale run.lock that blocks nothing; config.yaml keeps a file per changed start."""

from __future__ import annotations

import os
import socket

import pytest
import yaml

from helpers import REPO, hold_lock, hold_lock_then_kill9


def test_lock_is_exclusive_names_its_holder_and_a_killed_holder_blocks_nothing(tmp_path):
    from pretrain.rundir import RunDir, RunDirBusy, RunLock

    run = tmp_path / "run"
    holder = RunDir(run).holder
    p = hold_lock(run)
    who = f"host {socket.gethostname()} pid {p.pid} since "
    assert holder().startswith(who)
    with pytest.raises(RunDirBusy, match=f"run directory {run} is in use by another trainer \\({who}"):
        RunLock(run).acquire()
    p.kill()
    p.wait()
    assert holder() is None and f"pid {p.pid} " in (run / "run.lock").read_text()  # stale: left, not held
    lock = RunLock(run)
    lock.acquire()
    assert holder().startswith(f"host {socket.gethostname()} pid {os.getpid()} since ")
    lock.release()
    dead = hold_lock_then_kill9(run)  # the conftest helper the end-to-end resume test uses
    assert holder() is None and f"pid {dead} " in (run / "run.lock").read_text()


def test_config_history_keeps_one_file_per_changed_start(tmp_path):
    from pretrain.rundir import RunDir

    write_config = RunDir(tmp_path).write_config
    cfg = {"model": {"seq_length": 64}, "train": {"steps": 10}}
    assert write_config(cfg, 0).name == "config.step_00000000.yaml"
    assert write_config(cfg, 4) is None  # a plain requeue: nothing new
    changed = {"model": {"seq_length": 32}, "train": {"steps": 10}}
    assert write_config(changed, 7).name == "config.step_00000007.yaml"
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


def test_symlinks_planted_in_a_run_directory_are_never_written_through(tmp_path):
    """run.lock, metrics.jsonl, config.step_*.yaml, wandb_id.txt -> a victim file outside: the
    trainer's writers refuse them (preflight lists them, one line each) and the victim keeps its
    bytes; config.yaml.tmp<pid> and checkpoints/latest.tmp<pid> -> the victim are replaced, not followed."""
    from pretrain.config import load_config
    from pretrain.metrics import MetricsLogger
    from data_prep.files import write_atomic
    from pretrain.rundir import RunDir, RunDirError, RunLock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("run.lock", "metrics.jsonl", "config.step_00000000.yaml", "wandb_id.txt",
                 f"config.yaml.tmp{os.getpid()}", f"checkpoints/latest.tmp{os.getpid()}"):
        (run / name).symlink_to(victim)
    cfg = load_config(REPO / "configs" / "tiny_alibi.yaml", ["wandb.mode=offline"])
    for write in (lambda: RunLock(run).acquire(), lambda: MetricsLogger(cfg, run, 0, 0),
                  lambda: RunDir(run).write_config({"a": 1}, 0)):
        with pytest.raises(RunDirError, match="is a symbolic link .*refusing to write through it"):
            write()
    assert sorted(e.split(" is a symbolic link")[0] for e in RunDir(run).link_errors()) == [
        str(run / n) for n in ("config.step_00000000.yaml", "metrics.jsonl", "run.lock", "wandb_id.txt")]
    write_atomic(run / "checkpoints" / "latest", "step_00000001\n")
    (run / "config.step_00000000.yaml").unlink()
    RunDir(run).write_config({"a": 1}, 0)
    assert victim.read_text() == "precious\n"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001\n" and not (run / "config.yaml").is_symlink()


def test_metrics_jsonl_torn_last_line_is_skipped_by_every_reader_and_cut_on_restart(tmp_path):
    """A kill (or a full disk) mid-write leaves a torn last line: the one reader (RunDir.records,
    which the training loop and tools.runs, tools.main_pipeline, tools.bench.compare use) skips
    it, a damaged line before the last is refused naming the file and the line, and the next start
    of the run cuts the torn line before appending. Expected records: hand-written JSON lines."""
    from pretrain.config import load_config
    from pretrain.metrics import MetricsLogger
    from pretrain.rundir import RunDir, read_metrics
    from tools.main_pipeline import _last_step
    from tools.runs import read_run

    run = tmp_path / "run"
    run.mkdir()
    path = run / "metrics.jsonl"
    good = '{"step": 1, "loss": 4.0, "step_time_s": 1.0}\n{"step": 2, "loss": 3.0, "step_time_s": 1.0}\n'
    records = [{"step": 1, "loss": 4.0, "step_time_s": 1.0}, {"step": 2, "loss": 3.0, "step_time_s": 1.0}]
    assert RunDir(run).records() == []  # no file yet
    path.write_text(good)
    assert RunDir(run).records() == records and read_metrics(path) == records
    path.write_text(good + '{"step": 3, "loss": 2.')  # torn
    assert RunDir(run).records() == records and read_metrics(path) == records
    assert _last_step(run) == 2 and sorted(read_run(run).hours) == [1, 2] and sorted(read_run(path).hours) == [1, 2]
    path.write_text('{"step": 1, "loss": 4.0}\n{"step": 2, "lo\n{"step": 3, "loss": 2.0}\n')  # torn in the middle
    for read in (RunDir(run).records, lambda: read_run(run), lambda: _last_step(run)):
        with pytest.raises(ValueError, match=f"^{path}: line 2 is not a metrics record"):
            read()
    path.write_text(good + '[1, 2]\n{"step": 3}\n')  # a JSON line that is not a record
    with pytest.raises(ValueError, match=f"^{path}: line 3 is not a metrics record \\(a JSON list, not an object"):
        read_metrics(path)
    path.write_text(good + '{"step": 3, "loss": 2.')
    cfg = load_config(REPO / "configs" / "tiny_alibi.yaml", ["wandb.enabled=false"])
    logger = MetricsLogger(cfg, run, 0, 2)
    logger.log({"step": 3, "loss": 2.5})
    logger.close()
    assert [r["step"] for r in RunDir(run).records()] == [1, 2, 3] and path.read_text().startswith(good)
    assert path.read_text()[len(good):].startswith('{"time": ') and path.read_text().endswith('"loss": 2.5}\n')


def test_metrics_record_that_hits_a_full_disk_leaves_no_torn_line(tmp_path, capsys, monkeypatch):
    import errno
    import os as os_module

    from pretrain import metrics
    from pretrain.config import load_config
    from pretrain.rundir import RunDir

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(REPO / "configs" / "tiny_alibi.yaml", ["wandb.enabled=false"])
    logger = metrics.MetricsLogger(cfg, run, 0, 0)
    logger.log({"step": 1, "loss": 3.0})
    real_write = os_module.write

    def full_disk(fd, data):  # the device fills up after 10 bytes of the line
        if len(data) > 10:
            return real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, os_module.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics.os, "write", full_disk)
    logger.log({"step": 2, "loss": 2.0})
    monkeypatch.undo()
    logger.log({"step": 3, "loss": 1.0})
    logger.close()
    assert [r["step"] for r in RunDir(run).records()] == [1, 3]
    assert "the record of step 2 was not written (No space left on device)" in capsys.readouterr().out
