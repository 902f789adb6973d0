"""The tokenize worker: one chunk in, one train and one valid shard out, written by
megatron-core's IndexedDatasetBuilder. No central writer: every worker writes its own shards.

Crash safety: shards are written under temporary names and renamed into place, then the chunk's
result JSON is renamed into `.work/done/`; only a chunk whose result JSON exists and whose shard
sizes match it counts as complete, so a run killed at any moment (kill -9 included) resumes by
redoing only the chunks that were not complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import warnings

import numpy as np

from data_prep.readers import ChunkReader
from data_prep.tokenizer import Tokenizer

SPLITS = ("train", "valid")
MAX_EXAMPLES = 5


class StrictError(RuntimeError):
    """--strict and a bad record."""


_TOKENIZERS: dict[str, Tokenizer] = {}


def indexed_dataset():
    """megatron-core's indexed_dataset module, imported on first use (~5 s: it pulls in torch),
    so that refusals and --help stay instant; the coordinator calls it before forking workers."""
    with warnings.catch_warnings():  # megatron-core warns that Apex/TE are absent: irrelevant here
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset as module
    return module


def _tokenizer(path: str) -> Tokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = Tokenizer(path)
    return _TOKENIZERS[path]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def shard_stem(out_dir: Path, chunk_id: str, split: str) -> Path:
    return Path(out_dir) / "shards" / f"{chunk_id}_{split}"


def done_path(out_dir: Path, chunk_id: str) -> Path:
    return Path(out_dir) / ".work" / "done" / f"{chunk_id}.json"


def load_done(out_dir: Path, chunk_id: str) -> dict | None:
    """The result of a completed chunk, or None when it must be (re)done."""
    try:
        result = json.loads(done_path(out_dir, chunk_id).read_text())
    except (OSError, ValueError):
        return None
    for split, s in result["splits"].items():
        stem = shard_stem(out_dir, chunk_id, split)
        for ext, size in (("bin", s["bin_bytes"]), ("idx", s["idx_bytes"])):
            try:
                if os.path.getsize(f"{stem}.{ext}") != size:
                    return None
            except OSError:
                return None
    return result


def _hash_raw(path: str, start: int, end: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(1 << 20, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def run_chunk(chunk: dict, cfg: dict, progress=None) -> dict:
    """Tokenize one chunk into its shards (skipped when already complete); returns its result.

    cfg: out_dir, tokenizer, text_key, valid_fraction, max_doc_bytes, batch_bytes, strict.
    progress: optional callable(bytes, tokens) for the live progress bar.
    """
    out_dir = Path(cfg["out_dir"])
    done = load_done(out_dir, chunk["id"])
    if done is not None:
        done["resumed"] = True
        return done
    t0 = time.time()
    tok = _tokenizer(cfg["tokenizer"])
    dtype = token_dtype(tok.vocab_size)
    threshold = int(cfg["valid_fraction"] * 2**64)
    tmp_tag = f".tmp{os.getpid()}"
    stems = {s: shard_stem(out_dir, chunk["id"], s) for s in SPLITS}
    builder_cls = indexed_dataset().IndexedDatasetBuilder
    builders = {s: builder_cls(f"{stems[s]}{tmp_tag}.bin", dtype=dtype) for s in SPLITS}
    stats = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    rejected: dict[str, dict] = {}
    reader = ChunkReader(chunk["path"], chunk["kind"], chunk["compression"], chunk["start"],
                         chunk["end"], cfg["text_key"], cfg["max_doc_bytes"])
    batch: list[bytes] = []
    batch_size = 0
    last_pos = chunk["start"]

    def flush():
        nonlocal batch, batch_size, last_pos
        if not batch:
            return
        tokens = 0
        # [n_docs] int32 arrays, encoded in sentencepiece's C++ loop (no Python int per token)
        for data, ids in zip(batch, tok.encode_batch(batch)):
            key = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
            split = "valid" if key < threshold else "train"
            doc = np.empty(len(ids) + 1, dtype=dtype)  # [len + 1]: the doc, then eod
            doc[:-1] = ids
            doc[-1] = tok.eod
            builders[split].add_document(doc, [len(doc)])
            stats[split]["documents"] += 1
            stats[split]["tokens"] += len(doc)
            tokens += len(doc)
        if progress is not None:
            progress(max(0, reader.pos - last_pos), tokens)
            last_pos = reader.pos
        batch, batch_size = [], 0

    for rec in reader:
        if rec.bad is not None:
            if cfg["strict"]:
                raise StrictError(f"{chunk['path']}: chunk {chunk['id']} line {rec.line} of the chunk "
                                  f"(byte {rec.offset}): {rec.bad}: {rec.detail}")
            r = rejected.setdefault(rec.bad, {"count": 0, "examples": []})
            r["count"] += 1
            if len(r["examples"]) < MAX_EXAMPLES:
                r["examples"].append({"chunk_line": rec.line, "offset": rec.offset, "detail": rec.detail[:200]})
            continue
        batch.append(rec.data)
        batch_size += len(rec.data)
        if batch_size >= cfg["batch_bytes"]:
            flush()
    flush()

    result = {"id": chunk["id"], "splits": {}, "rejected": rejected, "lines": reader.lines,
              "bytes": max(0, min(reader.pos, chunk["end"] or reader.pos) - chunk["start"]),
              "raw_sha256": _hash_raw(chunk["path"], chunk["raw_start"], chunk["raw_end"]),
              "elapsed_s": 0.0, "resumed": False}
    for s in SPLITS:
        builders[s].finalize(f"{stems[s]}{tmp_tag}.idx")
        for ext in ("bin", "idx"):
            os.replace(f"{stems[s]}{tmp_tag}.{ext}", f"{stems[s]}.{ext}")
        result["splits"][s] = dict(stats[s], bin_bytes=os.path.getsize(f"{stems[s]}.bin"),
                                   idx_bytes=os.path.getsize(f"{stems[s]}.idx"))
    result["elapsed_s"] = round(time.time() - t0, 3)
    path = done_path(out_dir, chunk["id"])
    tmp = path.with_name(path.name + tmp_tag)
    with open(tmp, "w") as f:
        json.dump(result, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return result
