"""preprocess(): inputs -> checks -> chunk plan -> tokenize chunks (local or SLURM) -> manifest.

Every refusal (missing tokenizer, unwritable output directory, output directory holding shards
of another tokenizer or other settings) happens before any chunk is started.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data_prep import launch
from data_prep.manifest import build_manifest, write_manifest
from data_prep.merge import merge_complete, merge_one, plan_merge
from data_prep.plan import auto_chunk_bytes, describe_input, plan_chunks
from data_prep.progress import Reporter
from data_prep.readers import expand_inputs
from data_prep.tokenizer import Tokenizer
from data_prep.worker import StrictError, indexed_dataset, load_done, token_dtype

LAUNCHERS = ("local", "slurm", "submitit-local")


class RefusedError(RuntimeError):
    """The run was refused before any work started; the message says what to do."""


def _check_output_dir(out_dir: Path, fingerprint: dict) -> None:
    try:
        for sub in ("shards", ".work/done"):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".work" / f".probe{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RefusedError(f"cannot write to output directory {out_dir} ({e.strerror}); "
                           f"pass a writable --output-dir") from e
    plan_path = out_dir / ".work" / "plan.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old["tokenizer_sha256"] != fingerprint["tokenizer_sha256"]:
            raise RefusedError(
                f"{out_dir} holds shards made with another tokenizer ({old['tokenizer']}, sha256 "
                f"{old['tokenizer_sha256'][:12]}...); use a new --output-dir or delete {out_dir}")
        if old != fingerprint:
            diff = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
            raise RefusedError(
                f"{out_dir} holds a run with different {', '.join(diff)}; resuming needs the same "
                f"arguments: rerun with them, or use a new --output-dir")
    elif any((out_dir / "shards").iterdir()):
        raise RefusedError(f"{out_dir}/shards holds files this tool did not plan (no .work/plan.json); "
                           f"use an empty --output-dir")
    else:
        plan_path.write_text(json.dumps(fingerprint, indent=1))
    for tmp in (out_dir / "shards").glob("*.tmp*"):  # partial shards of a killed run
        tmp.unlink()
    for tmp in (out_dir / ".work" / "done").glob("*.tmp*"):
        tmp.unlink()


def preprocess(inputs, tokenizer_path, output_dir, *, workers: int | None = None,
               launcher: str = "local", text_key: str = "text", valid_fraction: float = 0.001,
               strict: bool = False, chunk_mb: float | None = None, max_compressed_chunks: int = 16,
               max_doc_mb: float = 16.0, batch_kb: int = 1024, tasks: int = 1, merge_mb: float = 8192.0,
               slurm: dict | None = None, quiet: bool = False) -> dict:
    """Tokenize `inputs` into megatron-core shards in `output_dir`; returns the manifest.

    workers: processes per node (local) or cores per array task (slurm); default all cores.
    tasks: SLURM array tasks (nodes) for launcher 'slurm'/'submitit-local'.
    chunk_mb: uncompressed MiB per chunk (task); None: from the total input size (plan.py).
    merge_mb: per-chunk shards are merged into shards of about this many MiB per split.
    slurm: partition, time_min, account, ... passed to submitit as slurm_<key>.
    """
    t0 = time.time()
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    workers = workers or len(os.sched_getaffinity(0))
    try:
        tok = Tokenizer(tokenizer_path)
    except FileNotFoundError as e:
        raise RefusedError(str(e)) from e
    except (OSError, RuntimeError, ValueError) as e:  # not a SentencePiece model, or no eos id
        raise RefusedError(f"cannot load tokenizer {tokenizer_path}: {e}; pass the .model file "
                           f"written by data_prep/train_tokenizer.py") from e
    paths = expand_inputs(list(inputs) if not isinstance(inputs, (str, Path)) else [inputs])
    described = [describe_input(p) for p in paths]
    settings = {"text_key": text_key, "valid_fraction": valid_fraction,
                "chunk_bytes": int(chunk_mb * (1 << 20)) if chunk_mb else auto_chunk_bytes(described),
                "max_compressed_chunks": max_compressed_chunks,
                "max_doc_bytes": int(max_doc_mb * (1 << 20)), "merge_bytes": int(merge_mb * (1 << 20)),
                "dtype": token_dtype(tok.vocab_size).__name__, "eod_after_every_document": True,
                "split_rule": "valid iff blake2b-64(UTF-8 text) < valid_fraction * 2^64"}
    tokenizer = {"path": str(tok.model_path), "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                 "eod": tok.eod, "pad": tok.pad}
    fingerprint = {"tokenizer": str(tok.model_path), "tokenizer_sha256": tok.sha256, "settings": settings,
                   "inputs": [{k: d[k] for k in ("path", "size", "mtime_ns")} for d in described]}
    out_dir = Path(output_dir).resolve()
    _check_output_dir(out_dir, fingerprint)

    chunks = [c.to_dict() for c in plan_chunks(described, settings["chunk_bytes"], max_compressed_chunks)]
    unreadable = {i: f"cannot open: {d['error']}" for i, d in enumerate(described) if not d["readable"]}
    done = {c["id"]: r for c in chunks if (r := load_done(out_dir, c["id"])) is not None}
    todo = [c for c in chunks if c["id"] not in done]
    cfg = {"out_dir": str(out_dir), "tokenizer": str(tok.model_path), "text_key": text_key,
           "valid_fraction": valid_fraction, "max_doc_bytes": settings["max_doc_bytes"],
           "batch_bytes": batch_kb * 1024, "strict": strict}
    if strict and unreadable:
        i = next(iter(unreadable))
        raise RefusedError(f"--strict: input {described[i]['path']} {unreadable[i]}")
    if todo and launcher == "local":
        indexed_dataset()  # import once here, before forking: workers share it
    total = sum(c["est_bytes"] for c in chunks)
    progress = Reporter(total, sum(c["est_bytes"] for c in chunks if c["id"] in done), quiet=quiet)
    try:
        if launcher == "local":
            new = launch.run_local(todo, cfg, workers, progress)
        else:
            new = launch.run_submitit(
                todo, cfg, cluster="slurm" if launcher == "slurm" else "local", workers=workers,
                tasks=tasks, folder=out_dir / ".work" / "submitit", progress=progress, slurm=slurm)
    finally:
        progress.close()
    results = {**done, **new}
    manifest = build_manifest(out_dir, described, chunks, results, settings, tokenizer, unreadable)
    if strict and manifest["rejected"]:  # chunks completed by an earlier non-strict run
        reason, r = next(iter(manifest["rejected"].items()))
        ex = r["examples"][0]
        raise StrictError(f"{ex['file']}:{ex['line']}: {reason}: {ex['detail']} ({r['count']} such records)")
    for tmp in (out_dir / "merged").glob("*.tmp*") if (out_dir / "merged").is_dir() else []:
        tmp.unlink()
    merged = plan_merge(manifest["shards"], settings["merge_bytes"])
    launch.map_tasks(merge_one, [(str(out_dir), e, settings["dtype"]) for e in merged
                                 if not merge_complete(out_dir, e)],
                     launcher=launcher, workers=workers, folder=out_dir / ".work" / "submitit", slurm=slurm)
    manifest["merged"] = [{k: v for k, v in e.items() if k != "parts"} for e in merged]
    elapsed = time.time() - t0
    nbytes = sum(r["bytes"] for cid, r in new.items())
    ntokens = sum(s["tokens"] for r in new.values() for s in r["splits"].values())
    manifest["output_dir"] = str(out_dir)
    manifest["run"] = {"elapsed_s": round(elapsed, 3), "workers": workers, "launcher": launcher,
                       "tasks": tasks if launcher != "local" else 1, "bytes": nbytes,
                       "tokens": ntokens, "mb_per_s": round(nbytes / elapsed / 1e6, 3),
                       "tokens_per_s": round(ntokens / elapsed, 1), "chunks": len(chunks),
                       "chunks_resumed": len(done),
                       "worker_busy_s": round(sum(r["elapsed_s"] for r in new.values()), 3)}
    write_manifest(out_dir, manifest)
    return manifest
