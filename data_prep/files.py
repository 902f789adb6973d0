"""The two primitives every directory we own is written with, on both sides (data_prep's output
directory, pretrain's run directory): the atomic writer and the exclusive lock.

`write_atomic` writes to `name.tmp<pid>` (whatever is there is removed first, never written
through: `fresh_tmp`), fsyncs and renames over the file: a reader, a kill or a full disk sees the
old file or the new one, never a torn one; a failed write leaves no temporary file.

`FileLock` is an advisory `fcntl.flock` on one file, taken without waiting and held until
`release` or the end of the process; the kernel drops it when the process dies (kill -9, node
reboot), so a stale lock file never blocks anything. The file stays (deleting a lock file races
with a process about to lock it); its text says who holds it, or held it last. A process forked
while holding the lock (a worker pool) does not hold it: the child closes its copy at fork.
"""

from __future__ import annotations

import errno
import fcntl
import os
import weakref
from pathlib import Path

TMP = ".tmp"  # marks a file being written: `name.tmp<pid>`; a new run deletes leftovers


def tmp_name(path: str | Path) -> str:
    """This process's temporary name for `path` (renamed into place when complete)."""
    return f"{path}{TMP}{os.getpid()}"


def fresh_tmp(path: str | Path) -> str:
    """tmp_name(path), with whatever is there removed: a file left by a killed process of the
    same pid, or a planted symlink, which `open(..., "w")` would follow and truncate its target."""
    tmp = tmp_name(path)
    Path(tmp).unlink(missing_ok=True)
    return tmp


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` to a temporary name, fsync, rename: readers see the old file or the new one.
    The temporary file is created new (O_EXCL: never through a symlink); the rename replaces a
    symlink at `path` itself, never its target."""
    tmp = fresh_tmp(path)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644),
                       "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LockUnsupported(OSError):
    """The lock file opened but flock failed: a file system without it (Lustre without the
    `flock` mount option says ENOSYS, others ENOLCK, EOPNOTSUPP or EINVAL). Nothing is locked:
    the caller warns and goes on."""


class LockBusy(RuntimeError):
    """Another process holds the lock; `holder` is the text it wrote into the lock file."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'holder unknown'}")
        self.holder = holder


_HELD: weakref.WeakSet[FileLock] = weakref.WeakSet()


def _forget_in_child() -> None:
    for lock in list(_HELD):
        if lock.fd is not None:
            os.close(lock.fd)  # the child's copy: the parent keeps the lock
            lock.fd = None


os.register_at_fork(after_in_child=_forget_in_child)


class FileLock:
    """The exclusive flock on `path`, held from `acquire` until `release` (or the process's end)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, holder: str) -> None:
        """Take the lock at once and write `holder` (who we are) into the file. Raises LockBusy
        with the holder's text when another process holds it; OSError when the file cannot be
        opened (ELOOP: it is a symbolic link, never followed); LockUnsupported when it opened but
        the file system has no flock."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LockBusy(self.path, text) from None
        except OSError as e:
            os.close(fd)
            raise LockUnsupported(e.errno, e.strerror) from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder + "\n").encode(), 0)
        self.fd = fd
        _HELD.add(self)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            _HELD.discard(self)


def lock_holder(path: str | Path) -> str | None:
    """Who holds the lock on `path` right now (the text it wrote), or None. Takes no lock itself
    (a shared probe, released at once); a symbolic link or a file system without flock: None."""
    try:
        f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a planted link: acquire refuses it
            return None
        raise
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip()
        except OSError:
            return None
        fcntl.flock(f, fcntl.LOCK_UN)
        return None
