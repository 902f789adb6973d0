"""preprocess(): inputs -> checks -> chunk plan -> tokenize chunks (local or SLURM) -> merge -> manifest.

Every refusal (missing tokenizer, bad settings, unknown input format or Parquet column,
unwritable or busy output directory, output directory holding shards of another tokenizer or
other settings) happens before any chunk is started. The output directory is locked
(data_prep/files.py `FileLock` on `.work/lock`, released by the kernel when the coordinator
ends, kill -9 included), so a second run on it is refused at once. A full disk ends the run with the space
it needs; the same command then resumes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path

from data_prep import encoders, launch
from data_prep.files import TMP, FileLock, LockBusy, LockUnsupported
from data_prep.manifest import OutputDir, build_manifest, read_json, write_json_atomic, write_manifest
from data_prep.merge import merge_one, plan_merge, verified_merges
from data_prep.plan import auto_chunk_bytes, describe_input, edges_sha256, estimated_bytes, plan_chunks
from data_prep.progress import Reporter
from data_prep.readers import CORRUPT_STREAM, ChunkReader, expand_inputs
from data_prep.settings import LAUNCHERS, VALID_MIN_WINDOWS, PrepSettings
from data_prep.tokenizer import Tokenizer, TokenizerError, file_sha256
from data_prep.worker import SMALLEST_KEYS, StrictError, indexed_dataset, load_done, load_tokenizer, token_dtype

__all__ = ["LAUNCHERS", "DiskFullError", "EmptyValidError", "RefusedError", "preprocess"]

log = logging.getLogger("data_prep")


class RefusedError(RuntimeError):
    """The run was refused before any work started; the message says what to do."""


class DiskFullError(RuntimeError):
    """The output file system filled up; the message says how much space the run needs."""


class EmptyValidError(RuntimeError):
    """A valid split was asked for but no document fell into it; the message gives the fix."""


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@contextlib.contextmanager
def _locked(layout: OutputDir):
    """Hold the output directory's lock for the run; refuse at once if another run holds it.
    A symlink in its place is refused (O_NOFOLLOW): the run would truncate the file it points to."""
    lock = FileLock(layout.lock)
    try:
        lock.acquire(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    except LockBusy as e:
        raise RefusedError(f"{layout.root} is in use by another preprocess run ({e.holder or 'another process'}); "
                           f"wait for it to end, or use another --output-dir") from None
    except LockUnsupported as e:
        log.warning(f"cannot lock {layout.lock} ({e.strerror}: the file system has no locks); "
                    f"make sure no other preprocess run writes to {layout.root}")
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RefusedError(f"{layout.lock} is a symlink (to {os.readlink(layout.lock)}); this tool writes it: "
                               f"remove the link and run again") from e
        else:
            raise RefusedError(f"cannot open {layout.lock} ({e.strerror}); pass a writable --output-dir") from e
    try:
        yield
    finally:
        lock.release()


def _prepare_dirs(layout: OutputDir) -> None:
    try:
        for d in layout.state_dirs:
            d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RefusedError(f"cannot write to output directory {layout.root} ({e.strerror}); "
                           f"pass a writable --output-dir") from e


def _check_plan(layout: OutputDir, fingerprint: dict) -> None:
    """Refuse an output directory holding another run; record this run's plan (atomically).
    A plan.json that does not parse (torn) is rewritten: the chunk results and merge marks
    carry the plan's id, so only those of this very plan are kept."""
    old = read_json(layout.plan)
    if old is not None and old != fingerprint:
        if old.get("tokenizer_sha256") != fingerprint["tokenizer_sha256"]:
            raise RefusedError(
                f"{layout.root} holds shards made with another tokenizer ({old.get('tokenizer')}, sha256 "
                f"{str(old.get('tokenizer_sha256'))[:12]}...); use a new --output-dir or delete {layout.root}")
        diff = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
        old_inputs = {i.get("path"): i for i in old.get("inputs", [])}
        if diff == ["inputs"] and list(old_inputs) == [i["path"] for i in fingerprint["inputs"]]:
            changed = [i["path"] for i in fingerprint["inputs"] if old_inputs[i["path"]] != i]
            raise RefusedError(
                f"{layout.root} holds a run of other contents of {', '.join(changed)} (changed since that run "
                f"started: size, mtime or bytes); resuming would mix old and new text: use a new --output-dir, "
                f"or delete {layout.root}")
        raise RefusedError(
            f"{layout.root} holds a run with different {', '.join(diff)}; resuming needs the same "
            f"arguments: rerun with them, or use a new --output-dir")
    if old is None:
        if not layout.plan.exists() and any(layout.shards_dir.iterdir()):
            raise RefusedError(f"{layout.shards_dir} holds files this tool did not plan (no {layout.plan}); "
                               f"use an empty --output-dir")
        write_json_atomic(layout.plan, fingerprint)
        layout.tokenizer_json.unlink(missing_ok=True)  # a new plan may have a new tokenizer
    for d in layout.tmp_dirs:  # partial files of a killed run
        for tmp in d.glob(f"*{TMP}*"):
            tmp.unlink()


def _sample(described: list[dict], s: PrepSettings) -> tuple[list[str], float]:
    """Documents from the start of up to SAMPLE_FILES inputs spread over the list, about
    SAMPLE_BYTES of text in all (a longer document is cut); deterministic: the same inputs give
    the same sample. -> (texts, document bytes per input byte read, to scale token counts)."""
    readable = [d for d in described if d["readable"]]
    picked = readable[::max(1, math.ceil(len(readable) / encoders.SAMPLE_FILES))]
    budget = encoders.SAMPLE_BYTES // max(len(picked), 1)
    texts, text_bytes, consumed = [], 0, 0
    for d in picked:
        reader = ChunkReader(d["path"], d["format"], d["compression"], 0, None, s.text_key, s.max_doc_bytes)
        got = 0
        for rec in reader:
            if rec.text is not None:
                texts.append(rec.text[:budget])
                got += len(rec.data)
            if got >= budget:
                break
        text_bytes, consumed = text_bytes + got, consumed + reader.consumed
    return texts, text_bytes / max(consumed, 1)


def _choose_encoder(s: PrepSettings, tok: Tokenizer, layout: OutputDir, sample: list[str],
                    sample_ids: list[list[int]]) -> dict:
    """The encoder this run uses, and why (the manifest's `encoder`)."""
    info = {"requested": s.encoder, "used": tok.encoders[0], "version": None, "fallback": None, "checked": None}
    if s.encoder == tok.encoders[0] or encoders.FAST not in tok.encoders:  # the reference encoder: nothing to check
        return info
    reason = encoders.fast_unsupported(tok.model_path)
    if reason is None:
        try:
            _fresh_tokenizer_json(layout, tok)
            fast = load_tokenizer(s, encoders.FAST)  # loaded before the workers fork: they share it
        except Exception as e:  # noqa: BLE001 - a conversion or load failure means: not this encoder
            reason = f"fastokens cannot load the converted tokenizer: {type(e).__name__}: {e}"
        else:
            if diff := encoders.check(tok.sp, fast, tok.model_path, sample, sample_ids):
                reason = f"it gave other ids than SentencePiece: {diff}"
    if reason:
        log.warning(f"encoder: using sentencepiece, not fastokens: {reason} (the output is the same, only slower)")
        return dict(info, fallback=reason)
    checked = {"edge_cases": len(encoders.edge_cases(tok.model_path)), "documents": len(sample),
               "bytes": sum(len(t.encode()) for t in sample)}
    log.info(f"encoder: fastokens {encoders.fast_version()}, the same ids as SentencePiece on "
             f"{checked['edge_cases']} edge cases and {checked['documents']} documents of the input")
    return dict(info, used=encoders.FAST, version=encoders.fast_version(), checked=checked)


def _fresh_tokenizer_json(layout: OutputDir, tok: Tokenizer) -> None:
    """Put the model's tokenizer.json in .work/, unless the one there is known to be it: its
    record (`tokenizer.json.sha256`) names this model's sha256 and the file's own. A stale copy
    (another model's, or edited) is replaced before the start-up check, not left to it."""
    record = layout.tokenizer_json_record
    want = read_json(record)
    if want and want.get("model_sha256") == tok.sha256 and layout.tokenizer_json.is_file() and \
            file_sha256(layout.tokenizer_json) == want.get("sha256"):
        return
    if layout.tokenizer_json.exists():
        log.warning(f"{layout.tokenizer_json} is not the one converted from {tok.model_path}: converted again")
    encoders.prepare_tokenizer_json(tok.model_path, tok.sha256, layout.tokenizer_json)
    write_json_atomic(record, {"model_sha256": tok.sha256, "sha256": file_sha256(layout.tokenizer_json)})


def _resolve(s: PrepSettings, described: list[dict], tokens_per_byte: float) -> PrepSettings:
    """Settings with chunk_mb and (for valid_tokens) valid_fraction fixed from the input."""
    chunk_mb = s.chunk_mb or auto_chunk_bytes(described) / (1 << 20)
    if s.valid_tokens is None:
        return replace(s, chunk_mb=chunk_mb)
    total = sum(estimated_bytes(d) for d in described if d["readable"]) * tokens_per_byte
    fraction = s.valid_tokens / max(total, 1.0)
    if fraction > 0.5:
        raise RefusedError(f"--valid-tokens {s.valid_tokens:,} is more than half of the ~{total:,.0f} tokens "
                           f"estimated for this input; ask for fewer")
    return replace(s, chunk_mb=chunk_mb, valid_fraction=fraction)


def _disk_full(layout: OutputDir, total: int, written: int, merge_room: int) -> DiskFullError:
    free = shutil.disk_usage(layout.root).free
    need = max(total - written, 0) + merge_room
    return DiskFullError(
        f"no space left on device for {layout.root} ({_size(free)} free): this run writes ~{_size(total)} of token "
        f"shards ({_size(written)} so far) and merging needs up to ~{_size(merge_room)} more before chunk shards are "
        f"removed, so about {_size(need)} must be free there. Free space (or move the directory), then run the "
        f"same command again: completed chunks are kept")


def preprocess(inputs, tokenizer_path, output_dir, **settings) -> dict:
    """Tokenize `inputs` into megatron-core shards in `output_dir`; returns the manifest.

    settings: the fields of data_prep.settings.PrepSettings (workers, launcher, text_key,
    valid_fraction or valid_tokens, chunk_mb, merge_mb, encoder, keep_chunk_shards, strict, ...).
    """
    t0 = time.time()
    s = PrepSettings(out_dir=str(Path(output_dir).resolve()), tokenizer=str(tokenizer_path), **settings)
    try:
        tok = Tokenizer(tokenizer_path, eod_token=s.eod_token)
    except (FileNotFoundError, TokenizerError) as e:  # missing, not a tokenizer, or no end-of-text token
        raise RefusedError(str(e)) from e
    if s.encoder not in ("auto", *tok.encoders):
        raise RefusedError(f"--encoder {s.encoder} cannot encode with {tok.kind} tokenizer {tok.model_path}: "
                           f"use --encoder auto (or {' or '.join(tok.encoders)})")
    s = replace(s, tokenizer=str(tok.model_path), workers=s.workers or len(os.sched_getaffinity(0)))
    skipped: list[dict] = []
    paths = expand_inputs(list(inputs) if not isinstance(inputs, (str, Path)) else [inputs], skipped)
    for x in skipped:
        log.warning(f"skipped {x['file']}: {x['reason']}")
    described = [describe_input(p, s.text_key) for p in paths]
    layout = OutputDir(s.out_dir)
    _prepare_dirs(layout)
    with _locked(layout):
        try:
            return _run(s, tok, described, layout, t0, skipped)
        except OSError as e:  # a state file (plan.json, the manifest, a merge mark) on a full disk
            if e.errno != errno.ENOSPC:
                raise
            raise DiskFullError(
                f"no space left on device for {layout.root} ({_size(shutil.disk_usage(layout.root).free)} free) "
                f"writing {e.filename or 'a state file'}: free space (or move the directory), then run the same "
                f"command again: completed chunks are kept") from e


def _start(s: PrepSettings, tok: Tokenizer, described: list[dict], layout: OutputDir):
    """Everything decided before a chunk starts: the resolved settings, the plan (refusing another
    run's directory), the encoder. -> (settings, plan id, fingerprint, encoder info, tokens per input byte)."""
    sample, text_per_input_byte = _sample(described, s)
    sample_ids = tok.reference_encode(sample)  # the fast encoder check's reference, and the token estimate
    tokens_per_byte = text_per_input_byte * (sum(map(len, sample_ids)) + len(sample)) / \
        max(sum(len(t.encode()) for t in sample), 1)  # per input byte, one eod per document
    s = _resolve(s, described, tokens_per_byte)
    edges = edges_sha256(plan_chunks(described, s.chunk_bytes, s.max_compressed_chunks))
    fingerprint = {**tok.fingerprint, "settings": s.output_settings(token_dtype(tok.vocab_size).__name__),
                   "inputs": [dict({k: d[k] for k in ("path", "size", "mtime_ns")}, edges_sha256=edges.get(d["path"]))
                              for d in described]}
    plan_id = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    _check_plan(layout, fingerprint)
    if s.strict and (bad := next((d for d in described if not d["readable"]), None)):
        raise RefusedError(f"--strict: input {bad['path']} cannot be opened: {bad['error']}")
    encoder = _choose_encoder(s, tok, layout, sample, sample_ids)
    return replace(s, encoder=encoder["used"]), plan_id, fingerprint, encoder, tokens_per_byte


def _run(s: PrepSettings, tok: Tokenizer, described: list[dict], layout: OutputDir, t0: float,
         skipped: list[dict]) -> dict:
    s, plan_id, fingerprint, encoder, tokens_per_byte = _start(s, tok, described, layout)
    dtype = token_dtype(tok.vocab_size)
    chunks = plan_chunks(described, s.chunk_bytes, s.max_compressed_chunks)
    merged_held = verified_merges(layout, plan_id, s.workers)
    done = {c.id: r for c in chunks if (r := load_done(layout, c.id, plan_id, merged_held)) is not None}
    todo = [c for c in chunks if c.id not in done]
    # token bytes of the whole run from the sample's tokens per byte (disk-space messages only), and
    # the room the merge needs: up to `workers` merged shards written before their parts are removed
    total_out = int(sum(estimated_bytes(d) for d in described if d["readable"]) * tokens_per_byte * dtype().itemsize)
    merge_room = min(s.workers, math.ceil(total_out / max(s.merge_bytes, 1))) * min(s.merge_bytes, total_out)
    need = total_out - sum(x["bin_bytes"] for r in done.values() for x in r["splits"].values()) + merge_room
    if todo and (free := shutil.disk_usage(layout.root).free) < need:
        log.warning(f"{layout.root} has {_size(free)} free; this run needs about {_size(need)} (estimated): "
                    f"it may fill the disk")
    if todo and s.launcher == "local":
        indexed_dataset()  # import once here, before forking: workers share it
    t_chunks, cpu_chunks = time.time(), time.process_time()
    try:
        with Reporter(sum(c.est_bytes for c in chunks), sum(c.est_bytes for c in chunks if c.id in done),
                      quiet=s.quiet) as progress:
            if s.launcher == "local":
                new = launch.run_local(todo, s, plan_id, s.workers, progress)
            else:
                new = launch.run_submitit(todo, s, plan_id, progress)
        results = {**done, **new}
        unreadable = {i: f"cannot open: {d['error']}" for i, d in enumerate(described) if not d["readable"]}
        manifest = build_manifest(described, chunks, results, fingerprint["settings"], tok.record, unreadable)
        if s.strict and manifest["rejected"]:  # chunks completed by an earlier non-strict run
            reason, r = next(iter(manifest["rejected"].items()))
            ex = r["examples"][0]
            raise StrictError(f"{ex['file']}:{ex['line']}: {reason}: {ex['detail']} ({r['count']} such records)")
        merged = plan_merge(manifest["shards"], s.merge_bytes)
        t_merge, cpu_merge = time.time(), time.process_time()
        if s.merge_bytes > 0:
            hashes = launch.map_tasks(merge_one, [(s.out_dir, e, dtype.__name__, plan_id, s.keep_chunk_shards)
                                                  for e in merged], s)
            for e, h in zip(merged, hashes):
                e["sha256"] = h
    except (OSError, launch.TaskFailedError) as e:  # a SLURM task's error arrives as its text
        if getattr(e, "errno", None) == errno.ENOSPC or f"[Errno {errno.ENOSPC}]" in str(e):
            written = sum(p.stat().st_size for d in (layout.shards_dir, layout.merged_dir) for p in d.glob("*.bin"))
            raise _disk_full(layout, total_out, written, merge_room) from e
        raise
    manifest["merged"] = [{k: v for k, v in e.items() if k != "parts"} for e in merged]
    manifest["skipped_inputs"] = skipped
    manifest["chunk_shards_removed"] = any(not Path(f"{layout.path(x['prefix'])}.bin").exists()
                                           for x in manifest["shards"] if x["documents"])
    used = [r.get("encoder", "sentencepiece") for r in results.values()]
    manifest["encoder"] = dict(encoder, chunks={e: used.count(e) for e in tok.encoders})
    if (s.valid_fraction > 0 or s.valid_tokens) and manifest["splits"]["valid"]["documents"] == 0:
        raise EmptyValidError(_empty_valid(manifest["splits"]["train"], s, results))
    manifest["warnings"] = _warnings(manifest, s)
    for w in manifest["warnings"]:
        log.warning(w)
    t_end = time.time()
    elapsed = t_end - t0
    nbytes = sum(r["bytes"] for r in new.values())
    ntokens = sum(x["tokens"] for r in new.values() for x in r["splits"].values())
    manifest["output_dir"] = str(layout.root)
    manifest["run"] = {"elapsed_s": round(elapsed, 3), "workers": s.workers, "launcher": s.launcher,
                       "tasks": s.tasks if s.launcher != "local" else 1, "bytes": nbytes,
                       "tokens": ntokens, "mb_per_s": round(nbytes / elapsed / 1e6, 3),
                       "tokens_per_s": round(ntokens / elapsed, 1), "chunks": len(chunks),
                       "chunks_resumed": len(done),
                       "worker_busy_s": round(sum(r["elapsed_s"] for r in new.values()), 3),
                       "phases_s": {"start": round(t_chunks - t0, 3), "tokenize": round(t_merge - t_chunks, 3),
                                    "merge": round(t_end - t_merge, 3)},
                       # this process's CPU while the workers tokenize: what limits the worker count
                       "coordinator_tokenize_cpu_s": round(cpu_merge - cpu_chunks, 3)}
    write_manifest(layout.root, manifest)
    return manifest


def _empty_valid(train: dict, s: PrepSettings, results: dict) -> str:
    """The message for a valid split without documents, with a fix that applies to this corpus:
    the fraction (3 significant digits, rounded up) that takes in the documents of the smallest
    split keys, which every chunk records."""
    docs = train["documents"]
    keys = sorted(k for r in results.values() for k in r.get("smallest_keys", []))[:SMALLEST_KEYS]
    if keys:
        f = (keys[-1] + 1) / 2**64
        scale = 10 ** (2 - math.floor(math.log10(f)))
        fix = f"--valid-fraction {min(0.999, math.ceil(f * scale) / scale):.3g} (puts at least {len(keys)} of its " \
              f"documents there)"
    else:  # results of an older version: the expected count only
        fix = f"--valid-fraction {min(0.5, SMALLEST_KEYS / max(docs, 1)):.3g} (about {SMALLEST_KEYS} of its documents)"
    return (f"the valid split is empty: none of the {docs:,} documents falls under --valid-fraction "
            f"{s.valid_fraction:.3g}, so there is nothing to validate on (no manifest was written). Rerun into a "
            f"new --output-dir with {fix}, or with --valid-fraction 0 for no valid split")


def _warnings(manifest: dict, s: PrepSettings) -> list[str]:
    """Problems the run finished with, each with the flag that fixes it."""
    out = []
    if corrupt := manifest["rejected"].get(CORRUPT_STREAM):
        files = sorted({ex["file"] for ex in corrupt["examples"]})
        out.append(f"{corrupt['count']} compressed input(s) hold damaged data ({', '.join(files)}): the documents "
                   f"decoded before the damage were kept and may be garbled; download them again and rerun into a "
                   f"new --output-dir")
    valid, need = manifest["splits"]["valid"]["tokens"], VALID_MIN_WINDOWS * s.eval_length
    if (s.valid_fraction > 0 or s.valid_tokens) and valid < need:
        out.append(f"the valid split has {valid:,} tokens, fewer than {VALID_MIN_WINDOWS} windows of "
                   f"--eval-length {s.eval_length:,} ({need:,} tokens): perplexity at that length would be noisy "
                   f"or impossible. Rerun into a new --output-dir with --valid-tokens {2 * need} (or a larger "
                   f"--valid-fraction), or pass the --eval-length you will really use")
    return out
