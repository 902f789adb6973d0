"""The run directory's own files: `run.lock` (one trainer at a time) and `config.yaml` with its
history. (Checkpoints are pretrain/checkpoint.py's, metrics.jsonl pretrain/metrics.py's.)

    RUN_DIR/run.lock                   "host H pid P since T job J": who holds the lock
    RUN_DIR/config.yaml                the config of the latest start
    RUN_DIR/config.step_00000000.yaml  the config in effect from step 0, and one more for every
                                       start whose config differs from the one before

The lock is an advisory `fcntl.flock` on run.lock, taken by global rank 0 and held until the
process ends; the kernel drops it when the process dies (kill -9, node reboot, SLURM requeue),
so a stale run.lock never blocks a resume. The file stays (deleting a lock file races with a
process about to lock it); its text only says who held it last. On a network file system the
lock is the server's: after a node crash NFSv4 keeps it until the dead client's lease ends (90 s
by default), so a requeued start of the same SLURM job waits for its predecessor's lock (up to
`PREDECESSOR_WAIT_S`) instead of being refused. Lustre needs the `flock` mount option, else the
lock is refused and we warn.

Every file we write in a run directory is opened without following a symbolic link
(`open_in_run_dir`, O_NOFOLLOW; temporary names are removed first): a link planted there (run.lock,
metrics.jsonl, config.yaml.tmp, config.step_*.yaml, checkpoints/latest.tmp -> a file elsewhere) is
refused or replaced, never written through. The run directory itself may be a link.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import time
from fnmatch import fnmatch
from pathlib import Path

import yaml

LOCK = "run.lock"
PREDECESSOR_WAIT_S = 300.0
"""How long a requeued SLURM job waits for the lock of its own earlier start (3 NFSv4 leases)."""


class RunDirError(RuntimeError):
    """A run-directory file that cannot be used; the message says which, why and what to do."""


class RunDirBusy(RunDirError):
    """Another trainer holds the run directory; the message names it."""


def open_in_run_dir(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """os.open(path, flags) refusing a symbolic link as the file itself (O_NOFOLLOW)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise RunDirError(f"{path} is a symbolic link (to {os.readlink(path)}): refusing to write through it to a "
                          "file outside the run directory; remove the link") from None


def busy_message(run_dir: Path, holder: str) -> str:
    return (f"run directory {run_dir} is in use by another trainer ({holder or 'holder unknown'}): wait for it to "
            "finish or stop it, or give this run its own --run-dir")


WRITTEN_IN_PLACE = (LOCK, "metrics.jsonl", "wandb_id.txt", "config.step_*.yaml")
"""The run directory's files opened for writing under their own name (the others are written to
a temporary name and renamed over, which replaces a link instead of following it)."""


def link_errors(run_dir: str | Path) -> list[str]:
    """Preflight, on every rank: the files of WRITTEN_IN_PLACE that are symbolic links."""
    run_dir = Path(run_dir)
    files = list(run_dir.iterdir()) if run_dir.is_dir() else []
    links = sorted(p for p in files if p.is_symlink() and any(fnmatch(p.name, pat) for pat in WRITTEN_IN_PLACE))
    return [f"{p} is a symbolic link (to {os.readlink(p)}): refusing to write through it to a file outside the "
            "run directory; remove the link" for p in links]


def _job() -> str:
    """This process's SLURM job and restart, as written into run.lock ("" outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    return f" job {job} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else ""


def is_predecessor(holder_text: str) -> bool:
    """The holder is an earlier start of this same SLURM job (a requeue after a node failure)."""
    m, mine = re.search(r"job (\d+) restart (\d+)", holder_text), re.search(r"job (\d+) restart (\d+)", _job())
    return bool(m and mine and m[1] == mine[1] and int(m[2]) < int(mine[2]))


def holder(run_dir: str | Path) -> str | None:
    """Who holds the run directory's lock right now ("host H pid P since T ..."), or None. Takes
    no lock itself (a shared probe, released at once): safe to call from every rank."""
    path = Path(run_dir) / LOCK
    try:
        f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None  # a planted link: RunLock.acquire refuses it with the message
        raise
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip()
        except OSError:
            return None  # no flock on this file system: RunLock warns when it tries
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


class RunLock:
    """The exclusive lock on RUN_DIR/run.lock, held from `acquire` until `release` or the end of
    the process."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self, wait_s: float = PREDECESSOR_WAIT_S) -> None:
        """Take the lock at once or raise RunDirBusy naming the holder (host, pid, since, job);
        only an earlier start of this SLURM job is waited for, up to `wait_s`."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = open_in_run_dir(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT)
        deadline, waiting = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                if not is_predecessor(text) or time.monotonic() > deadline:
                    os.close(fd)
                    raise RunDirBusy(busy_message(self.run_dir, text)) from None
                if not waiting:
                    print(f"waiting up to {wait_s:.0f} s for the lock of this job's earlier start ({text}): a network "
                          "file system keeps a crashed node's lock until its lease ends", flush=True)
                    waiting = True
                time.sleep(min(5.0, wait_s / 10))
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.close(fd)
                print(f"WARNING: cannot lock {self.run_dir / LOCK} ({e.strerror}: this file system has no flock); "
                      "a second trainer on this run directory will not be detected", flush=True)
                return
        since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        text = f"host {socket.gethostname()} pid {os.getpid()} since {since}{_job()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, (text + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def write_config(run_dir: str | Path, config: dict, step: int) -> Path | None:
    """config.yaml := `config`; when it differs from the previous config.yaml (or there is none),
    also config.step_N.yaml (N = the step this start begins at), so the history of every change
    is kept. Returns the history file written, or None."""
    run_dir = Path(run_dir)
    text = yaml.safe_dump(config, sort_keys=False)
    current = run_dir / "config.yaml"
    if current.is_file() and current.read_text() == text:
        return None
    history = run_dir / f"config.step_{step:08d}.yaml"
    with os.fdopen(open_in_run_dir(history, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
        f.write(text)
    write_atomic(current, text)
    return history


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary name, fsync, rename: readers see the old file or the new one.
    A file (or link) left at the temporary name is removed first, never written through."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(open_in_run_dir(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
