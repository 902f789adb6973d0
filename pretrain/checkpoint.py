"""Checkpoints: atomic save, verification, keep-last-N, resume with fallback, and consolidation
for tools. Format 2 (format 1 needed pickle to load and is refused with a message)::

    RUN_DIR/checkpoints/latest                    "step_00000100" (replaced atomically)
    RUN_DIR/checkpoints/step_00000100/
        meta.json                                 format version, step, consumed samples, config,
                                                  tokenizer, data fingerprint, layout, every file's
                                                  size and hash
        meta.json.xxh3_128                        meta.json's own hash
        model/tp00_pp00.safetensors               {global name: tensor}: this TP/PP shard with
                                                  global layer numbers, full over ZeRO ranks; the
                                                  parameter table in the safetensors metadata
        optim/tp00_pp00_dp00.safetensors          {"fp32|exp_avg|exp_avg_sq/<global name>": tensor}:
                                                  master weights and Adam moments by global name,
                                                  the Adam step (pretrain/reshard.py: any layout
                                                  resumes them)
        rng/rank00000.safetensors                 every RNG of that rank
    RUN_DIR/checkpoints/corrupt_step_00000090/    one that failed verification on resume, set aside

Written under a temporary name and renamed when every rank has finished, so `latest` never
names a partial checkpoint. `load_consolidated` merges the model files into the TP=1/PP=1 state
dict with no process group, using the partition dim recorded per parameter.

Safety (docs/design.md, "Checkpoints"): nothing here unpickles arbitrary objects. Model shards,
optimizer states and RNG states are safetensors (tensors and strings, no code). Checkpoints
written before elastic resume hold DeepSpeed's own files (ds/) instead of optim/: those are read
through `_safe_torch_load` (torch.load(weights_only=True), three DeepSpeed data classes
allowed), only by `resume`, on their own layout; the tools read meta.json and the safetensors
model shards only.

Verification: meta.json records every file's size and xxh3_128 hash (read back at save time),
and meta.json.xxh3_128 meta.json's own: an edited or damaged meta.json (a changed step, consumed
samples or format version, a file entry outside the checkpoint, an absurd layout) makes the
checkpoint unusable, never a resume at the wrong place.
Every rank checks sizes in preflight; `resume` checks the hashes collectively (each rank hashes
a share of the files) and falls back to the previous checkpoint with one warning, setting the
failed one aside so that keep-last-N never counts it; the tools check the model files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from data_prep.files import write_atomic
from pretrain import reshard
from pretrain.config import Config, from_dict, to_dict
from pretrain.layout import Layout
from pretrain.parallel import accelerator_device, seed_rng, use_gpu
from pretrain.resume import layout_change
from pretrain.rundir import RunDir

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
HASH = "xxh3_128"
STEP_DIR = re.compile(r"step_\d{8}")
META_HASH = "meta.json." + HASH
MAX_WORLD = 1 << 20
"""Layout fields above this in a meta.json are damage, not a cluster (convert would allocate per shard)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class FormatError(CheckpointError):
    """A checkpoint of another format version: no fallback, since its neighbours share it."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return RunDir(run_dir).checkpoints


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def digest(path: Path) -> str:
    """xxh3_128 of a file (15 GB/s from the page cache here vs 1.8 GB/s for sha256, docs/design.md)."""
    import xxhash

    with open(path, "rb") as f:
        return hashlib.file_digest(f, xxhash.xxh3_128).hexdigest()


def _text_digest(data: bytes) -> str:
    import xxhash

    return xxhash.xxh3_128(data).hexdigest()


# ---------------------------------------------------------------- the files: model shards, RNG, DeepSpeed


def _write_model_shard(path: Path, tensors: dict[str, torch.Tensor], table: dict[str, dict]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"table": json.dumps(table)})


def _read_model_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            table = json.loads((f.metadata() or {})["table"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError, a missing table, bad JSON: a foreign or damaged file
        raise CheckpointError(f"{path}: not a model shard of ours ({type(e).__name__}: {_first_line(e)})") from None
    if set(tensors) != set(table):
        raise CheckpointError(f"{path}: its tensors and its parameter table disagree")
    return tensors, table


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if use_gpu():
        state["cuda"] = torch.cuda.get_rng_state()
        from megatron.core import tensor_parallel

        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if use_gpu() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _write_rng(path: Path, state: dict[str, Any]) -> None:
    """numpy's state ('MT19937', 624 uint32 keys, pos, has_gauss, cached_gaussian) and python's
    (version, 625 ints, gauss_next) as int64 tensors plus JSON scalars (floats round-trip exactly)."""
    from safetensors.torch import save_file

    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    tensors = {"torch": state["torch"], "numpy": torch.from_numpy(keys.astype(np.int64)),
               "python": torch.tensor(internal, dtype=torch.int64)}
    if "cuda" in state:  # ByteTensors (megatron's tracker without cudagraph-safe RNG, our setting)
        tensors["cuda"] = state["cuda"].cpu()
        tensors.update({f"tracker.{k}": v.cpu() for k, v in state["tracker"].items()})
    scalars = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, gauss_next]}
    save_file(tensors, path, metadata={"scalars": json.dumps(scalars)})


def _read_rng(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            scalars = json.loads((f.metadata() or {})["scalars"])
            t = {name: f.get_tensor(name) for name in f.keys()}
        kind, pos, has_gauss, cached = scalars["numpy"]
        version, gauss_next = scalars["python"]
        state = {"torch": t["torch"], "numpy": (kind, t["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
                 "python": (version, tuple(t["python"].tolist()), gauss_next)}
    except Exception as e:
        raise CheckpointError(f"{path}: not an RNG state of ours ({type(e).__name__}: {_first_line(e)})") from None
    if "cuda" in t:
        state["cuda"] = t["cuda"]
        state["tracker"] = {k.removeprefix("tracker."): v for k, v in t.items() if k.startswith("tracker.")}
    return state


def _deepspeed_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 writes into its ZeRO optimizer files (listed by
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3, fp32 and bf16): plain data,
    rebuilt without running any of their code beyond attribute assignment."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def _safe_torch_load(path: str, map_location=None) -> Any:
    """DeepSpeed's checkpoint reader, made safe: torch.load(weights_only=True) with only
    `_deepspeed_globals` allowed; a file that needs anything else is refused, never run."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        try:
            extra = f"it needs {torch.serialization.get_unsafe_globals_in_checkpoint(path)}, "
        except Exception:
            extra = ""
        raise CheckpointError(f"{path}: refused to load ({extra}{type(e).__name__}: {_first_line(e)}); a file "
                              "DeepSpeed wrote for this run needs none of that: it was replaced") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


# ---------------------------------------------------------------- save


def _model_shard(trainer) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """This rank's full (un-ZeRO'd) model shard by global name, and its parameter table."""
    from megatron.core import parallel_state as ps

    from pretrain.model.params import global_names, partition_dim

    tp = ps.get_tensor_model_parallel_world_size()
    names = global_names(trainer.gpt)
    tensors, table = {}, {}
    zero3 = trainer.cfg.parallel.zero_stage == 3
    for local, p in trainer.gpt.named_parameters():
        if getattr(p, "ds_pipe_replicated", False):
            continue  # the tied copy on the last stage; the first stage saves it
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                value = p.detach().cpu().clone()
        else:
            value = p.detach().cpu().clone()
        dim = partition_dim(p)
        shape = list(value.shape)
        if dim is not None:
            shape[dim] *= tp
        tensors[names[local]] = value
        table[names[local]] = {"shape": shape, "partition_dim": dim, "dtype": str(value.dtype)}
    return tensors, table


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_meta(ckpt: Path, meta: dict) -> None:
    """meta.json and, beside it, its hash (read_meta checks one against the other)."""
    text = json.dumps(meta, indent=1)
    write_atomic(ckpt / "meta.json", text)
    write_atomic(ckpt / META_HASH, _text_digest(text.encode()) + "\n")


def _disk_full(root: Path, tmp: Path, e: OSError) -> CheckpointError:
    """The one-line message for a save that ran out of space; rank 0 removes the partial directory."""
    written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
    dist.barrier()  # every rank has measured it
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = [c for c in sorted(root.glob("step_*")) if (c / "meta.json").is_file()]
    try:
        need = sum(r["size"] for r in json.loads((previous[-1] / "meta.json").read_text())["files"].values())
        need = f"about {need / 2**30:.2f} GiB (the size of {previous[-1].name})"
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        need = f"more than the {written / 2**30:.2f} GiB written before it ran out"
    free = shutil.disk_usage(root).free / 2**30
    return CheckpointError(f"no space left on the device of {root} ({e.strerror}) while writing a checkpoint: it "
                           f"needs {need}, {free:.2f} GiB are free; the partial checkpoint was removed. Free space "
                           "or lower checkpoint.keep_last, then resume")


def _latest_full(root: Path, final: Path, e: OSError) -> CheckpointError:
    """The one-line message for a full disk at `latest`, after the rename: `final` is complete, and
    rank 0 removes `latest` (that needs no space) so that a resume takes it, not the one before."""
    if dist.get_rank() == 0:
        (root / "latest").unlink(missing_ok=True)
    return CheckpointError(f"no space left on the device of {root} ({e.strerror}) after {final.name} was written: it "
                           "is complete, and `latest` was removed so that a resume takes it; free space or lower "
                           "checkpoint.keep_last, then resume")


def _agree_ok(failed: OSError | None) -> bool:
    """Collective: True when no rank's write failed (a failed rank must not leave the others
    waiting in a barrier)."""
    flag = torch.tensor([int(failed is not None)], dtype=torch.int64, device=accelerator_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not flag.item()


@contextlib.contextmanager
def _space_agreed(elsewhere: str, error: Callable[[OSError], CheckpointError]):
    """Collective: run the block on every rank; when one runs out of space (ENOSPC, EDQUOT), every
    rank raises `error(its OSError)`'s one line (none is left waiting in a barrier). `elsewhere`
    names the device for the ranks whose own writes succeeded."""
    failed: OSError | None = None
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        failed = e
    if not _agree_ok(failed):
        raise error(failed or OSError(errno.ENOSPC, f"no space left on {elsewhere}"))


def save_checkpoint(trainer, run_dir: str | Path, step: int, extra: dict[str, Any], tokenizer: dict) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. Out of disk space
    on any rank: raises CheckpointError (one line: the directory, the space needed) on every rank,
    with the partial directory removed and `latest` unchanged."""
    from megatron.core import parallel_state as ps

    rank, world = dist.get_rank(), dist.get_world_size()
    root = checkpoints_dir(run_dir)
    final = root / _step_name(step)
    tmp = root / f".tmp_{_step_name(step)}"
    if rank == 0:
        if tmp.is_symlink():  # planted: rmtree refuses links and mkdir would write through it
            tmp.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        (tmp / "rng").mkdir()
    dist.barrier()

    with _space_agreed("another rank's device", lambda e: _disk_full(root, tmp, e)):
        reshard.save(trainer, tmp)  # the optimizer state by global name (was DeepSpeed's ds/, by layout)
        tensors, table = _model_shard(trainer)
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        if ps.get_data_parallel_rank() == 0:
            _write_model_shard(tmp / "model" / f"tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors", tensors, table)
        _write_rng(tmp / "rng" / f"rank{rank:05d}.safetensors", _rng_state())

    # Every rank reads back and hashes a share of the files (rank 0's listing), so the checkpoint
    # is read once in all, spread over the job.
    listing = [sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    mine = {rel: {"size": (tmp / rel).stat().st_size, HASH: digest(tmp / rel)} for rel in listing[0][rank::world]}
    shares = [None] * world
    dist.all_gather_object(shares, mine)

    if rank == 0:
        cfg = trainer.cfg
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "consumed_samples": step * cfg.train.global_batch_size,
            "config": to_dict(cfg),
            "tokenizer": tokenizer,
            "layout": reshard.layout_record(trainer.layout, cfg),
            **extra,
            "files": dict(sorted(kv for share in shares for kv in share.items())),
        }
    with _space_agreed("rank 0's device", lambda e: _disk_full(root, tmp, e)):
        if rank == 0:
            write_meta(tmp, meta)
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
    with _space_agreed("rank 0's device", lambda e: _latest_full(root, final, e)):  # the checkpoint is complete
        if rank == 0:
            write_atomic(root / "latest", final.name + "\n")
            _prune(root, cfg.checkpoint.keep_last)
    return final


def is_good(meta: dict) -> bool:
    """Written with no non-finite step just before it (not while the run was diverging)."""
    return not meta.get("bad_in_row", 0)


def last_good(root: Path) -> Path | None:
    """The newest checkpoint written while the run was not diverging (meta.json read as is: only
    to decide what pruning keeps)."""
    for ckpt in sorted(root.glob("step_*"), reverse=True):
        try:
            if is_good(json.loads((ckpt / "meta.json").read_text())):
                return ckpt
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and never the newest good one: checkpoints
    written while a run diverges (a divergence stop, a retry that diverges again) must not push out
    the last one to go back to. Only verified ones are counted: the newest was just written and
    read back, the others were either written by this run or verified when it resumed; one that
    failed verification was moved to corrupt_* and is never counted or deleted."""
    good = last_good(root)
    for old in sorted(root.glob("step_*"))[:-keep]:
        if old != good:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- find and verify


def read_meta(ckpt: Path) -> dict:
    """meta.json of a checkpoint whose files are all present at their recorded sizes (cheap:
    no file is read but meta.json); raises CheckpointError saying what is missing, truncated,
    unreadable or implausible. meta.json must match its hash (META_HASH) when it has one (all
    checkpoints written since it was added): a meta.json edited by hand or damaged is refused,
    format version included, so that the previous checkpoint is used instead."""
    try:
        raw = (ckpt / "meta.json").read_bytes()
        meta = json.loads(raw)
        version = meta.get("format_version")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{ckpt}: unreadable meta.json ({_first_line(e)})") from None
    hash_file = ckpt / META_HASH
    if hash_file.is_file() or hash_file.is_symlink():
        try:
            recorded = hash_file.read_text().strip()
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt}: unreadable {META_HASH} ({_first_line(e)})") from None
        if recorded != _text_digest(raw):
            raise CheckpointError(f"{ckpt}: meta.json does not match its hash in {META_HASH} (edited or damaged)")
    if version != FORMAT_VERSION:
        why = ("it needs pickle to load, which this code refuses: finish the run with the code that wrote it "
               "(git c588d30 or earlier) or start a new --run-dir" if version == 1 else
               "update this code to the version that wrote it")
        raise FormatError(f"{ckpt}: checkpoint format {version}, this code reads format {FORMAT_VERSION}: {why}")
    missing = [k for k in ("step", "config", "tokenizer", "layout", "files") if k not in meta]
    if missing:
        raise CheckpointError(f"{ckpt}: meta.json lacks {missing}")
    problems = _meta_problems(ckpt, meta)
    if problems:
        raise CheckpointError(f"{ckpt}: meta.json is implausible ({'; '.join(problems)})")
    for rel, rec in meta["files"].items():
        path = ckpt / rel
        size = path.stat().st_size if path.is_file() else None
        expected = rec.get("size") if isinstance(rec, dict) and HASH in rec else None
        if expected is None:
            raise CheckpointError(f"{ckpt}: meta.json's record of {rel} is malformed ({rec!r})")
        if size != expected:
            have = "missing" if size is None else f"{size} bytes"
            raise CheckpointError(f"{ckpt}: {rel} is truncated or missing ({have}, expected {expected} bytes)")
    return meta


def _count(value: Any, low: int, high: int | None = None) -> bool:
    return type(value) is int and value >= low and (high is None or value <= high)


def _meta_problems(ckpt: Path, meta: dict) -> list[str]:
    """meta.json's fields checked like a config's: counts are counts, the layout is a layout, every
    file lies inside the checkpoint, the step is the directory's."""
    out = []
    step = meta["step"]
    if not _count(step, 0):
        out.append(f"step={step!r}")
    elif STEP_DIR.fullmatch(ckpt.name) and step != int(ckpt.name[len("step_"):]):
        out.append(f"step={step} in directory {ckpt.name}")
    out += [f"{k}={meta[k]!r}" for k in ("consumed_samples", "bad_in_row", "skipped_total")
            if k in meta and not _count(meta[k], 0)]
    lay = meta["layout"]
    if not isinstance(lay, dict):
        out.append(f"layout={lay!r}")
    else:
        sizes = {k: lay.get(k) for k in ("world_size", "tensor_parallel", "pipeline_parallel")}
        bad = [f"layout.{k}={v!r}" for k, v in sizes.items() if not _count(v, 1, MAX_WORLD)]
        if not bad and Layout.errors(sizes["world_size"], sizes["tensor_parallel"], sizes["pipeline_parallel"]):
            bad.append(f"layout.world_size={sizes['world_size']} is not a multiple of tensor_parallel x "
                       "pipeline_parallel")
        if not _count(lay.get("zero_stage"), 0, 3):
            bad.append(f"layout.zero_stage={lay.get('zero_stage')!r}")
        out += bad
    files = meta["files"]
    if not isinstance(files, dict) or not isinstance(meta["config"], dict) or not isinstance(meta["tokenizer"], dict):
        return out + ["files, config and tokenizer must be mappings"]
    root = ckpt.resolve()
    for rel in files:
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts or not (ckpt / rel).resolve().is_relative_to(root):
            out.append(f"file entry {rel!r} lies outside the checkpoint")
    return out


def verify_files(ckpt: Path, meta: dict, rels: list[str]) -> list[str]:
    """Problems with files `rels` of a checkpoint (sizes and hashes against meta.json), [] if none."""
    problems = []
    for rel in rels:
        rec, path = meta["files"][rel], ckpt / rel
        if not path.is_file() or path.stat().st_size != rec["size"]:
            problems.append(f"{rel} is truncated or missing")
        elif digest(path) != rec[HASH]:
            problems.append(f"{rel} does not match its {HASH} in meta.json (corrupted)")
    return problems


@dataclass
class Found:
    """The checkpoints of a run directory: the usable ones newest first (`latest` first), each as
    (directory, meta.json) with every file present at its size, and the ones skipped, with why."""

    usable: list[tuple[Path, dict]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def scan(run_dir: str | Path) -> Found:
    """Every checkpoint of `run_dir`, checked cheaply (meta.json, format, file sizes), on any rank
    with no process group. Raises CheckpointError for a `latest` that names anything but a
    checkpoint directory of this run, a checkpoint of another format, or when none is complete."""
    root = checkpoints_dir(run_dir)
    found = Found()
    if not root.is_dir():
        return found
    candidates = sorted(root.glob("step_*"), reverse=True)
    latest = root / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if not STEP_DIR.fullmatch(name):
            raise CheckpointError(f"{latest} names {name!r}, not a checkpoint directory of this run (step_NNNNNNNN): "
                                  f"refusing to follow it; write the newest step_* name into it or delete it")
        if (root / name).is_dir():  # else: renamed aside, or deleted by hand; the others are still there
            candidates = [root / name] + [c for c in candidates if c.name != name]
    for ckpt in candidates:
        if ckpt.resolve().parent != root.resolve():
            raise CheckpointError(f"{ckpt} leads outside {root} (a symbolic link?): refusing to read it; "
                                  "copy the checkpoint into the run directory instead")
        try:
            found.usable.append((ckpt, read_meta(ckpt)))
        except FormatError:
            raise
        except CheckpointError as e:
            found.skipped.append((ckpt, str(e)))
    if candidates and not found.usable:
        raise CheckpointError(f"{root} holds checkpoints but none is complete ({found.skipped[0][1]}): "
                              f"move {root} aside to start over")
    return found


def _warn(message: str) -> None:
    log.warning(message)
    print(f"WARNING: {message}", flush=True)


def find_checkpoint(run_dir: str | Path, prefix: str = "") -> tuple[Path, dict] | None:
    """The newest checkpoint whose files under `prefix` (all by default; the tools pass "model/")
    match their hashes, with one warning for each one skipped. None if there is none at all."""
    found = scan(run_dir)
    for ckpt, why in found.skipped:
        _warn(f"skipping checkpoint {ckpt}: {why}; falling back to the previous one")
    for ckpt, meta in found.usable:
        problems = verify_files(ckpt, meta, [r for r in sorted(meta["files"]) if r.startswith(prefix)])
        if not problems:
            return ckpt, meta
        _warn(f"skipping checkpoint {ckpt}: {'; '.join(problems)}; falling back to the previous one")
    if found.usable:
        raise CheckpointError(f"no checkpoint of {checkpoints_dir(run_dir)} passes verification: "
                              "copy the run directory again from where it came")
    return None


def data_fingerprint(manifests: dict[str, dict]) -> dict[str, str]:
    """{source directory: sha256 of its manifest's contents}, recorded in every checkpoint so that
    data regenerated in place (same path and tokenizer, other documents) shows in the resume diff.
    The manifest's `run` record (timings) and `output_dir` are left out: rerunning preprocess on
    the same inputs gives the same fingerprint."""
    out = {}
    for path, manifest in manifests.items():
        kept = {k: v for k, v in manifest.items() if k not in ("run", "output_dir")}
        out[path] = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    return out


def resume(trainer, found: Found | None) -> tuple[Path, dict] | None:
    """Collective: verify and load the newest good checkpoint of `found` (from `scan`, run by
    preflight on every rank) into `trainer` (model, optimizer, RNG); returns (directory, meta),
    or None to start fresh. Each rank hashes a share of a checkpoint's files; if any file of it
    is corrupted every rank falls back to the previous one. Rank 0 prints one warning per
    checkpoint skipped and moves it to corrupt_* (out of keep-last-N's count)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    usable = found.usable if found else []
    first = usable[0][1]["step"] if usable else -1
    step = torch.tensor([first, -first], dtype=torch.int64, device=accelerator_device())
    dist.all_reduce(step, op=dist.ReduceOp.MAX)  # [max step, -min step] over ranks
    if step[0] != -step[1]:
        raise CheckpointError(f"ranks found different checkpoints (steps {-int(step[1])}..{int(step[0])}): "
                              "is another job writing this run directory? Give each run its own --run-dir")
    skipped = list(found.skipped) if found else []
    chosen = None
    for ckpt, meta in usable:
        problems = verify_files(ckpt, meta, sorted(meta["files"])[rank::world])
        shares = [None] * world
        dist.all_gather_object(shares, problems)
        problems = [p for share in shares for p in share]
        if not problems:
            chosen = ckpt, meta
            break
        skipped.append((ckpt, "; ".join(problems)))
    if usable and chosen is None:
        raise CheckpointError(f"no checkpoint of {usable[0][0].parent} passes verification ({skipped[-1][1]}): "
                              "restore the run directory from a copy, or move it aside to start over")
    if rank == 0:
        for ckpt, why in skipped:
            aside = ckpt.with_name(f"corrupt_{ckpt.name}")
            shutil.rmtree(aside, ignore_errors=True)
            ckpt.rename(aside)
            _warn(f"checkpoint {ckpt.name} is unusable ({why}); moved to {aside}, resuming from the previous one")
    dist.barrier()
    if chosen is None:
        return None
    ckpt, meta = chosen
    if reshard.has_optimizer_state(meta):  # any layout: no torch.load at all
        try:
            reshard.load(trainer, ckpt, meta)
        except reshard.ReshardError as e:
            raise CheckpointError(str(e)) from None
        engine = trainer.engine
        engine.global_steps, engine.global_samples = meta["step"], meta.get("consumed_samples", 0)
        engine.skipped_steps = meta.get("skipped_total", 0)
    else:  # written before elastic resume: DeepSpeed's files, on their own layout (preflight checked)
        trainer.engine.checkpoint_engine.load = _safe_torch_load  # DeepSpeed's torch.load(weights_only=False)
        trainer.engine.load_checkpoint(str(ckpt), tag="ds", load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if not layout_change(meta, trainer.cfg, trainer.layout)[0]:
        _set_rng_state(_read_rng(ckpt / "rng" / f"rank{rank:05d}.safetensors"))
    else:  # each rank's streams belong to a rank of the old layout: fresh ones, not step 0's again
        seed_rng(trainer.cfg.train.seed + meta["step"])
    return chosen


# ---------------------------------------------------------------- consolidation (tools)


def load_consolidated(path: str | Path, with_meta: bool = False):
    """(Config of the run, full TP=1/PP=1 GPTModel state dict[, meta.json]) from a RUN_DIR (its newest
    checkpoint whose model files pass verification), a RUN_DIR/checkpoints dir, or one
    checkpoint dir (verified, no fallback). No process group needed: tensor-parallel shards are
    concatenated along the partition dim recorded for each parameter; pipeline stages already
    use global layer numbers. Keys are the parameter names of `build_model(cfg.model)` on one
    process (no `_extra_state` entries). Reads meta.json and safetensors only."""
    path = Path(path)
    if (path / "meta.json").is_file():
        ckpt, meta = path, read_meta(path)
        problems = verify_files(ckpt, meta, [r for r in sorted(meta["files"]) if r.startswith("model/")])
        if problems:
            raise CheckpointError(f"{ckpt}: {'; '.join(problems)}: use another checkpoint of the run")
    else:
        run_dir = path.parent if path.name == "checkpoints" else path
        found = find_checkpoint(run_dir, prefix="model/")
        if found is None:
            raise FileNotFoundError(f"no checkpoint under {path}: expected a run directory, its checkpoints/ "
                                    "directory, or a checkpoint directory holding meta.json")
        ckpt, meta = found
    cfg = from_dict(Config, meta["config"])
    lay = meta["layout"]
    tp, pp = lay["tensor_parallel"], lay["pipeline_parallel"]
    if tp * pp > len(meta["files"]):
        raise CheckpointError(f"{ckpt}: meta.json's layout ({tp} x {pp} model shards) lists more shards than files: "
                              "a damaged checkpoint; use another one")
    expected = {f"model/tp{t:02d}_pp{p:02d}.safetensors" for t in range(tp) for p in range(pp)}
    if not expected <= set(meta["files"]):
        raise CheckpointError(f"{ckpt}: model shards {sorted(expected - set(meta['files']))} are not in meta.json: "
                              "a partial checkpoint; use another one")
    shards: dict[str, dict[int, torch.Tensor]] = {}
    table: dict[str, dict] = {}
    for rel in sorted(expected):
        tp_rank = int(rel[len("model/tp"):][:2])
        tensors, part_table = _read_model_shard(ckpt / rel)
        for name, tensor in tensors.items():
            shards.setdefault(name, {})[tp_rank] = tensor
            table[name] = part_table[name]
    state = {}
    for name, parts in shards.items():
        dim = table[name]["partition_dim"]
        if dim is None:
            state[name] = parts[0]
        else:
            if sorted(parts) != list(range(tp)):
                raise CheckpointError(f"{ckpt}: {name} has TP shards {sorted(parts)}, expected 0..{tp - 1}")
            state[name] = torch.cat([parts[r] for r in range(tp)], dim=dim)
        if list(state[name].shape) != table[name]["shape"]:
            raise CheckpointError(f"{ckpt}: merged {name} has shape {list(state[name].shape)}, "
                                  f"expected {table[name]['shape']}")
    return (cfg, state, meta) if with_meta else (cfg, state)
