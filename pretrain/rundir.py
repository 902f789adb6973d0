"""The run directory: `RunDir` names its files, holds its lock (one trainer at a time), writes
them and reads metrics.jsonl (the one reader of it).

    RUN_DIR/checkpoints/               step_N/ and `latest` (pretrain/checkpoint.py's format)
    RUN_DIR/metrics.jsonl              one JSON record per line (pretrain/metrics.py logs them)
    RUN_DIR/run.lock                   "host H pid P since T job J": who holds the lock
    RUN_DIR/config.yaml                the config of the latest start
    RUN_DIR/config.step_00000000.yaml  the config in effect from step 0, and one more for every
                                       start whose config differs from the one before
    RUN_DIR/wandb_id.txt, wandb/       the wandb run id (stable across requeues), wandb's files
    RUN_DIR/train.log                  the trainer's console when a tool runs it (tools/main_pipeline.py)

The lock is data_prep/files.py's `FileLock` (an advisory `fcntl.flock`) on run.lock, taken by
global rank 0 and held until the process ends; the kernel drops it when the process dies (kill
-9, node reboot, SLURM requeue), so a stale run.lock never blocks a resume. Its text only says
who held it last. On a network file system the lock is the server's: after a node crash NFSv4
keeps it until the dead client's lease ends (90 s by default), so a requeued start of the same
SLURM job waits for its predecessor's lock (up to `PREDECESSOR_WAIT_S`) instead of being
refused. Lustre needs the `flock` mount option; without it nothing is locked and we warn.

metrics.jsonl is written one whole line per write (`MetricsFile.append`): a write that fails (a
full disk) is cut back to the last complete line, and a line torn by a kill is removed when the
run starts again. Its one reader, `read_metrics`, skips a torn last line (a run being written,
or killed) and refuses a damaged line before it, naming the file and the line.

Every file we write in a run directory is opened without following a symbolic link
(`open_in_run_dir`, O_NOFOLLOW; data_prep/files.py's `write_atomic` removes its temporary name
first): a link planted there (run.lock, metrics.jsonl, config.yaml.tmp<pid>, config.step_*.yaml,
checkpoints/latest.tmp<pid> -> a file elsewhere) is refused or replaced, never written through.
The run directory itself may be a link.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import yaml

from data_prep.files import FileLock, LockBusy, LockUnsupported, lock_holder, write_atomic

LOCK, METRICS, CONFIG, WANDB_ID = "run.lock", "metrics.jsonl", "config.yaml", "wandb_id.txt"
PREDECESSOR_WAIT_S = 300.0
"""How long a requeued SLURM job waits for the lock of its own earlier start (3 NFSv4 leases)."""
WRITTEN_IN_PLACE = (LOCK, METRICS, WANDB_ID, "config.step_*.yaml")
"""The run directory's files opened for writing under their own name (the others are written to
a temporary name and renamed over, which replaces a link instead of following it)."""


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
        raise RunDirError(_link_message(path)) from None


def _link_message(path: str | Path) -> str:
    return (f"{path} is a symbolic link (to {os.readlink(path)}): refusing to write through it to a file outside "
            "the run directory; remove the link")


def busy_message(run_dir: Path, holder: str) -> str:
    return (f"run directory {run_dir} is in use by another trainer ({holder or 'holder unknown'}): wait for it to "
            "finish or stop it, or give this run its own --run-dir")


def _job() -> str:
    """This process's SLURM job and restart, as written into run.lock ("" outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    return f" job {job} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else ""


def is_predecessor(holder_text: str) -> bool:
    """The holder is an earlier start of this same SLURM job (a requeue after a node failure)."""
    m, mine = re.search(r"job (\d+) restart (\d+)", holder_text), re.search(r"job (\d+) restart (\d+)", _job())
    return bool(m and mine and m[1] == mine[1] and int(m[2]) < int(mine[2]))


class RunLock:
    """The exclusive lock on RUN_DIR/run.lock, held from `acquire` until `release` or the end of
    the process."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.file = FileLock(self.run_dir / LOCK)

    def acquire(self, wait_s: float = PREDECESSOR_WAIT_S) -> None:
        """Take the lock at once or raise RunDirBusy naming the holder (host, pid, since, job);
        only an earlier start of this SLURM job is waited for, up to `wait_s`."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline, waiting = time.monotonic() + wait_s, False
        while True:
            try:
                since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                self.file.acquire(f"host {socket.gethostname()} pid {os.getpid()} since {since}{_job()}")
                return
            except LockBusy as e:
                if not is_predecessor(e.holder) or time.monotonic() > deadline:
                    raise RunDirBusy(busy_message(self.run_dir, e.holder)) from None
                if not waiting:
                    print(f"waiting up to {wait_s:.0f} s for the lock of this job's earlier start ({e.holder}): a "
                          "network file system keeps a crashed node's lock until its lease ends", flush=True)
                    waiting = True
                time.sleep(min(5.0, wait_s / 10))
            except LockUnsupported as e:
                print(f"WARNING: cannot lock {self.file.path} ({e.strerror}: this file system has no flock); "
                      "a second trainer on this run directory will not be detected", flush=True)
                return
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise RunDirError(_link_message(self.file.path)) from None
                raise

    def release(self) -> None:
        self.file.release()


class MetricsFile:
    """RUN_DIR/metrics.jsonl opened for appending (rank 0 of a trainer): one whole line per record.
    Opening it cuts a torn last line (`cut`: the bytes removed), so the next record starts a line."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = open_in_run_dir(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        size = os.fstat(self.fd).st_size
        tail = os.pread(self.fd, min(size, 1 << 20), max(size - (1 << 20), 0))
        self.cut = 0
        if tail and not tail.endswith(b"\n"):
            self.cut = len(tail) - tail.rfind(b"\n") - 1  # rfind -1: no newline in the last MiB
            os.ftruncate(self.fd, size - self.cut)

    def append(self, record: dict) -> None:
        """One line, whole or not at all: a write that fails (a full disk) is cut back to the last
        complete line before its OSError is raised."""
        data, end = (json.dumps(record) + "\n").encode(), os.lseek(self.fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            os.ftruncate(self.fd, end)
            raise

    def close(self) -> None:
        os.close(self.fd)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in order: the one reader of the format. A torn last line
    (the run is writing it, or was killed mid-write) is skipped; a line before it that is not a
    JSON object is damage: ValueError naming the file and the line."""
    lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as e:
            record, why = None, str(e)
        else:
            why = f"a JSON {type(record).__name__}, not an object"
        if isinstance(record, dict):
            out.append(record)
        elif i < len(lines) - 1:
            raise ValueError(f"{path}: line {i + 1} is not a metrics record ({why}): the file was damaged or "
                             "written by something else")
    return out


@dataclass(frozen=True)
class RunDir:
    """One training run directory: its paths (the module docstring), lock, writers and the
    metrics reader."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    def config_at(self, step: int) -> Path:
        """The config history file of a start at `step`."""
        return self.root / f"config.step_{step:08d}.yaml"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK

    @property
    def wandb_id(self) -> Path:
        return self.root / WANDB_ID

    @property
    def wandb(self) -> Path:
        """wandb's directory (`wandb.init(dir=RUN_DIR)`): offline-run-*/run-*.wandb."""
        return self.root / "wandb"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    def records(self) -> list[dict]:
        """metrics.jsonl's records (`read_metrics`); none when there is no such file yet."""
        return read_metrics(self.metrics) if self.metrics.is_file() else []

    def open_metrics(self) -> MetricsFile:
        return MetricsFile(self.metrics)

    def lock(self) -> RunLock:
        return RunLock(self.root)

    def holder(self) -> str | None:
        """Who holds the run directory's lock right now ("host H pid P since T ..."), or None.
        Takes no lock itself (a shared probe, released at once): safe to call from every rank."""
        return lock_holder(self.lock_file)

    def link_errors(self) -> list[str]:
        """Preflight, on every rank: the files of WRITTEN_IN_PLACE that are symbolic links."""
        files = list(self.root.iterdir()) if self.root.is_dir() else []
        links = sorted(p for p in files if p.is_symlink() and any(fnmatch(p.name, pat) for pat in WRITTEN_IN_PLACE))
        return [_link_message(p) for p in links]

    def write_config(self, config: dict, step: int) -> Path | None:
        """config.yaml := `config`; when it differs from the previous config.yaml (or there is
        none), also config.step_N.yaml (N = the step this start begins at), so the history of
        every change is kept. Returns the history file written, or None."""
        text = yaml.safe_dump(config, sort_keys=False)
        if self.config.is_file() and self.config.read_text() == text:
            return None
        history = self.config_at(step)
        with os.fdopen(open_in_run_dir(history, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
            f.write(text)
        write_atomic(self.config, text)
        return history

    def wandb_run_id(self) -> str:
        """A stable wandb run id per run directory, so a resumed (requeued) job continues the same run."""
        if not os.path.lexists(self.wandb_id):
            with os.fdopen(open_in_run_dir(self.wandb_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w") as f:
                f.write(uuid.uuid4().hex[:12])
        return self.wandb_id.read_text().strip()
