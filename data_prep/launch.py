"""Launchers: run chunk tasks as local processes, or as a SLURM job array through submitit
(`slurm`; `submitit-local` runs the same code path under submitit's LocalExecutor for tests).

Local: a fork process pool (workers inherit the imported modules), biggest chunks first; a
worker that dies (OOM killer) fails the run with a resume hint instead of hanging it; workers post
(bytes, tokens) per batch on a queue for the progress bar; the coordinator only waits.
submitit: the pending chunks are dealt round-robin to `tasks` array tasks; each task runs the
local pool on its own cores; the coordinator polls the chunks' result files for progress.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from data_prep.manifest import OutputDir
from data_prep.plan import Chunk
from data_prep.settings import PrepSettings
from data_prep.worker import indexed_dataset, load_done, load_tokenizer, run_chunk

_QUEUE = None
# how long an unfinished task may be absent from squeue before it counts as lost
LOST_GRACE_S = float(os.environ.get("PREPROCESS_LOST_GRACE_S", 60))


class TaskFailedError(RuntimeError):
    """A submitit/SLURM array task failed, was cancelled, or left the queue without a final state."""


_RESUME = "completed chunks are kept: run the same command again to resume"


def _task_failure(what: str, failed: list[tuple]) -> TaskFailedError:
    """One message for failed array tasks, [(job, detail or None)]: each id, its log, and how to resume."""
    tasks = "; ".join(f"{j.job_id} (log {j.paths.stderr})" + (f": {d}" if d else "") for j, d in failed)
    return TaskFailedError(f"array task(s) {what}: {tasks}\n{_RESUME}")




class WorkerDiedError(RuntimeError):
    """A pool worker was killed (e.g. by the OOM killer)."""


def _init_worker(q) -> None:
    """Pool worker set-up: die with the parent (kill -9 of the coordinator leaves no orphans)."""
    global _QUEUE
    _QUEUE = q
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_task(chunk: Chunk, s: PrepSettings, plan_id: str) -> dict:
    report = (lambda b, t: _QUEUE.put((b, t))) if _QUEUE is not None else None
    return run_chunk(chunk, s, plan_id, report)


def run_local(chunks: list[Chunk], s: PrepSettings, plan_id: str, workers: int, progress=None) -> dict[str, dict]:
    """Run `chunks` on `workers` processes; progress: optional object with advance(bytes, tokens)."""
    results: dict[str, dict] = {}
    order = sorted(chunks, key=lambda c: -c.est_bytes)
    if workers <= 1 or len(chunks) <= 1:
        for c in order:
            results[c.id] = run_chunk(c, s, plan_id, progress.advance if progress else None)
        return results
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    n = min(workers, len(chunks))
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
        futures = {pool.submit(_pool_task, c, s, plan_id): c.id for c in order}
        try:
            while futures:
                done, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(q, progress)
                for f in done:
                    results[futures.pop(f)] = f.result()  # re-raises a worker's error here
        except BrokenProcessPool as e:
            raise WorkerDiedError(f"a worker process died (killed, or out of memory?); {_RESUME}") from e
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # running chunks end, queued ones never start
            raise
    _drain(q, progress)
    return results


def _drain(q, progress) -> None:
    while True:
        try:
            b, t = q.get_nowait()
        except queue_mod.Empty:
            return
        if progress:
            progress.advance(b, t)


def _executor(s: PrepSettings, name: str, cpus: int):
    import submitit

    cluster = "slurm" if s.launcher == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=str(OutputDir(s.out_dir).submitit), cluster=cluster)
    params = {"timeout_min": s.slurm_time_min, "cpus_per_task": cpus, "name": name}
    if cluster == "slurm":
        params.update(s.slurm)
    executor.update_parameters(**params)
    return executor, cluster


def map_tasks(fn, args_list: list[tuple], s: PrepSettings) -> list:
    """fn(*args) for each args, in parallel with the run's launcher (used for the merge step)."""
    if not args_list:
        return []
    if s.launcher == "local":
        if s.workers <= 1 or len(args_list) == 1:
            return [fn(*a) for a in args_list]
        with mp.get_context("fork").Pool(min(s.workers, len(args_list)), initializer=_init_worker,
                                         initargs=(None,)) as pool:
            return pool.starmap(fn, args_list)
    executor, cluster = _executor(s, "merge", 1)
    jobs = executor.map_array(fn, *zip(*args_list))
    _wait(jobs, cluster)
    return [j.result() for j in jobs]


def run_group(chunks: list[Chunk], s: PrepSettings, plan_id: str) -> list[str]:
    """One submitit/SLURM array task: its share of the chunks on its own cores."""
    n = s.workers or len(os.sched_getaffinity(0))
    indexed_dataset()  # import and load before forking the pool: the workers share them
    load_tokenizer(s, s.encoder)
    return sorted(run_local(chunks, s, plan_id, n))


def _lost_tasks(jobs, missing_since: dict, grace_s: float = LOST_GRACE_S) -> list:
    """Unfinished tasks absent from `squeue` for over `grace_s`. A task cancelled while pending
    leaves no accounting record, so submitit reports it UNKNOWN forever; the grace covers the
    gap between a task leaving the queue and its final state reaching sacct."""
    import subprocess

    pending = [j for j in jobs if not j.done()]
    if not pending:
        return []
    ids = ",".join(sorted({j.job_id.split("_")[0] for j in pending}))
    q = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ids], capture_output=True, text=True)
    if q.returncode and "invalid job id" not in q.stderr.lower():  # controller busy: decide nothing now
        return []
    queued, now, lost = set(q.stdout.split()), time.monotonic(), []
    for j in pending:
        if j.job_id in queued:
            missing_since.pop(j.job_id, None)
        elif now - missing_since.setdefault(j.job_id, now) > grace_s:
            lost.append(j)
    return lost


def _wait(jobs, cluster: str, poll=None) -> None:
    """Wait for submitit `jobs`, calling `poll()` between checks; raise for every task that
    crashed, was cancelled, or (SLURM) left the queue without a final state (see _lost_tasks)."""
    missing_since: dict = {}
    while not all(j.done() for j in jobs):
        if cluster == "slurm" and (lost := _lost_tasks(jobs, missing_since)):
            raise _task_failure("left the SLURM queue without finishing (cancelled while pending, or lost)",
                                [(j, None) for j in lost])
        if poll:
            poll()
        time.sleep(0.5 if cluster != "slurm" else 5)
    if failed := [(j, e) for j in jobs if (e := j.exception()) is not None]:  # submitit's text kept
        raise _task_failure("did not finish", failed)


def run_submitit(chunks: list[Chunk], s: PrepSettings, plan_id: str, progress=None) -> dict[str, dict]:
    """Submit `s.tasks` array tasks of `s.workers` cores each; wait; return the chunk results."""
    executor, cluster = _executor(s, "preprocess", s.workers)
    executor.update_parameters(tasks_per_node=1, nodes=1)
    if cluster == "slurm":
        executor.update_parameters(slurm_array_parallelism=s.tasks)
    ntasks = max(1, min(s.tasks, len(chunks)))
    groups = [chunks[i::ntasks] for i in range(ntasks)]
    jobs = executor.map_array(run_group, groups, [s] * ntasks, [plan_id] * ntasks)
    layout, seen, wanted = OutputDir(s.out_dir), {}, {c.id for c in chunks}

    def poll():  # progress: read only result files that are new
        for entry in os.scandir(layout.done_dir):
            cid = entry.name[:-5]
            if entry.name.endswith(".json") and cid in wanted and cid not in seen:
                if (r := load_done(layout, cid, plan_id)) is not None:
                    seen[cid] = r
                    if progress:
                        progress.advance(r["bytes"], sum(s["tokens"] for s in r["splits"].values()))

    _wait(jobs, cluster, poll)
    results = {}
    for c in chunks:
        r = load_done(layout, c.id, plan_id)
        if r is None:
            raise RuntimeError(f"chunk {c.id} has no result after its job ended; run again to resume")
        results[c.id] = r
        if c.id not in seen and progress:
            progress.advance(r["bytes"], sum(s["tokens"] for s in r["splits"].values()))
    return results
