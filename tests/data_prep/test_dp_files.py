"""data_prep/files.py, the atomic writer and the lock both the output directory and the run
directory use: old file or new, never a torn one or a followed link; one holder at a time, named."""

from __future__ import annotations

import errno
import os

import pytest

from data_prep.files import FileLock, LockBusy, lock_holder, write_atomic
from data_prep.manifest import OutputDir
from data_prep.pipeline import _locked
from pretrain.rundir import RunLock


def test_write_atomic_replaces_links_and_leaves_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "state.json"
    os.symlink(victim, f"{path}.tmp{os.getpid()}")  # a planted link at our temporary name
    write_atomic(path, "one\n")
    assert path.read_bytes() == b"one\n" and victim.read_text() == "precious\n"
    link = tmp_path / "link"
    link.symlink_to(victim)  # a link at the name itself is replaced, its target untouched
    write_atomic(link, b"\x00two")
    assert not link.is_symlink() and link.read_bytes() == b"\x00two" and victim.read_text() == "precious\n"

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "three\n")
    assert path.read_bytes() == b"one\n" and sorted(p.name for p in tmp_path.iterdir()) == ["link", "state.json",
                                                                                           "victim"]


def test_lock_is_exclusive_names_its_holder_and_refuses_a_link(tmp_path):
    path = tmp_path / "lock"
    assert lock_holder(path) is None
    first = FileLock(path)
    first.acquire("pid 1 on host a")
    assert lock_holder(path) == "pid 1 on host a"
    with pytest.raises(LockBusy) as busy:
        FileLock(path).acquire("pid 2 on host b")
    assert busy.value.holder == "pid 1 on host a" and path.read_text() == "pid 1 on host a\n"
    first.release()
    assert lock_holder(path) is None and path.read_text() == "pid 1 on host a\n"  # stale text, no lock
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError) as e:
        FileLock(tmp_path / "link").acquire("me")
    assert e.value.errno == errno.ELOOP and not (tmp_path / "elsewhere").exists()


def test_a_child_forked_while_the_lock_is_held_does_not_hold_it(tmp_path):
    """A worker pool forked by the lock's holder: when the holder dies (its descriptor closed, no
    unlock), the lock is free although the workers live on."""
    path = tmp_path / "lock"
    lock = FileLock(path)
    lock.acquire("the coordinator")
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker: says it runs, then waits until the test is done
        os.write(ready_w, b"x")
        os.read(r, 1)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        os.close(lock.fd)  # the holder dies: the kernel closes its descriptor, nothing unlocks
        lock.fd = None
        assert lock_holder(path) is None
        again = FileLock(path)
        again.acquire("a rerun")
        again.release()
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        for fd in (r, w, ready_r, ready_w):
            os.close(fd)


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL])
def test_a_file_system_without_flock_warns_and_runs_unlocked(code, tmp_path, monkeypatch, caplog, capsys):
    """Lustre mounted without `flock` answers ENOSYS, others ENOLCK/EOPNOTSUPP/EINVAL: both sides
    warn and go on (nothing can be locked there), neither refuses nor crashes."""
    def no_flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("data_prep.files.fcntl.flock", no_flock)
    out = OutputDir(tmp_path / "data")
    out.lock.parent.mkdir(parents=True)
    with _locked(out):
        pass
    assert f"cannot lock {out.lock} ({os.strerror(code)}: the file system has no locks)" in caplog.text
    RunLock(tmp_path / "run").acquire()
    assert f"WARNING: cannot lock {tmp_path / 'run' / 'run.lock'} ({os.strerror(code)}" in capsys.readouterr().out
