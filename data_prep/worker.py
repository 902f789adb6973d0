"""The tokenize worker: one chunk in, its train and valid shards out, written by megatron-core's
IndexedDatasetBuilder. No central writer: every worker writes its own shards.

Crash safety: shards are written under temporary names and renamed into place, then the chunk's
result JSON is written atomically into `.work/done/`; a chunk counts as complete only when its
result exists, belongs to this run's plan and its shards have the recorded sizes (or were
merged, see merge.py), so a run killed at any moment (kill -9 included) resumes by redoing only
the chunks that were not complete. A split with no document gets no file: megatron-core cannot
open an empty .bin. On any error (a full disk included) the chunk's temporary files are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from data_prep.encoders import SPOT_CHECK, first_difference
from data_prep.files import fresh_tmp, tmp_name
from data_prep.manifest import MAX_EXAMPLES, SPLITS, OutputDir, read_json, write_json_atomic
from data_prep.plan import Chunk
from data_prep.readers import ChunkReader
from data_prep.settings import PrepSettings
from data_prep.tokenizer import Tokenizer

__all__ = ["SPLITS", "StrictError", "indexed_dataset", "load_done", "load_tokenizer", "run_chunk", "token_dtype"]

log = logging.getLogger("data_prep")


SMALLEST_KEYS = 4  # split keys kept per chunk: an empty valid split's fix puts this many documents in valid


class StrictError(RuntimeError):
    """--strict and a bad record."""


class EncoderMismatch(RuntimeError):
    """The fast encoder gave other ids than SentencePiece on a spot-checked document."""


_TOKENIZERS: dict[tuple, Tokenizer] = {}


def indexed_dataset():
    """megatron-core's indexed_dataset module, imported on first use (~5 s: it pulls in torch),
    so that refusals and --help stay instant; the coordinator calls it before forking workers."""
    with warnings.catch_warnings():  # megatron-core warns that Apex/TE are absent: irrelevant here
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset as module
    return module


def load_tokenizer(s: PrepSettings, encoder: str) -> Tokenizer:
    """The tokenizer with `encoder`, loaded once per process (forked workers inherit it)."""
    key = (s.tokenizer, encoder)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer(s.tokenizer, encoder, OutputDir(s.out_dir).tokenizer_json, s.eod_token)
    return _TOKENIZERS[key]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def load_done(layout: OutputDir, chunk_id: str, plan_id: str, merged: set | frozenset = frozenset()) -> dict | None:
    """The result of a completed chunk, or None when it must be (re)done. `merged`: the
    (chunk, split) pairs inside a verified merged shard, whose chunk shards may be gone."""
    result = read_json(layout.done(chunk_id))
    if result is None or result.get("plan") != plan_id:
        return None
    for split, s in result["splits"].items():
        if s["documents"] == 0 or (chunk_id, split) in merged:
            continue
        stem = layout.path(layout.chunk_prefix(chunk_id, split))
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


def run_chunk(chunk: Chunk, s: PrepSettings, plan_id: str, progress=None) -> dict:
    """Tokenize one chunk into its shards (skipped when already complete); returns its result.
    A spot-check difference of the fast encoder redoes the chunk with SentencePiece.

    plan_id: the run's plan fingerprint, recorded in the result (a result of another plan is stale).
    progress: optional callable(bytes, tokens) for the live progress bar.
    """
    layout = OutputDir(s.out_dir)
    done = load_done(layout, chunk.id, plan_id)
    if done is not None:
        done["resumed"] = True
        return done
    try:
        return _tokenize(chunk, s, plan_id, s.encoder, progress)
    except EncoderMismatch as e:
        log.warning(f"chunk {chunk.id}: {e}; redoing the chunk with sentencepiece (same output, slower)")
        return _tokenize(chunk, s, plan_id, "sentencepiece", progress)


def _tokenize(chunk: Chunk, s: PrepSettings, plan_id: str, encoder: str, progress) -> dict:
    t0 = time.time()
    layout = OutputDir(s.out_dir)
    tok = load_tokenizer(s, encoder)
    dtype = token_dtype(tok.vocab_size)
    threshold = int(s.valid_fraction * 2**64)
    stems = {split: layout.path(layout.chunk_prefix(chunk.id, split)) for split in SPLITS}
    builders: dict = {}  # split -> IndexedDatasetBuilder, opened at the split's first document
    stats = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
    rejected: dict[str, dict] = {}
    reader = ChunkReader(chunk.path, chunk.kind, chunk.compression, chunk.start, chunk.end,
                         s.text_key, s.max_doc_bytes)
    batch, batch_size, last = [], 0, 0
    smallest: list[int] = []  # the chunk's SMALLEST_KEYS smallest split keys (a valid split that came out empty)

    def add(split: str, doc: np.ndarray) -> None:
        if split not in builders:
            builders[split] = indexed_dataset().IndexedDatasetBuilder(fresh_tmp(f"{stems[split]}.bin"), dtype=dtype)
        builders[split].add_document(doc, [len(doc)])
        stats[split]["documents"] += 1
        stats[split]["tokens"] += len(doc)

    def flush():
        nonlocal batch, batch_size, last
        if not batch:
            return
        tokens = 0
        for rec, ids in zip(batch, tok.encode_batch([r.text for r in batch])):
            key = int.from_bytes(hashlib.blake2b(rec.data, digest_size=8).digest(), "little")
            if tok.encoder != tok.encoders[0] and key % SPOT_CHECK == 0 and \
                    (diff := first_difference([rec.text], [tok.encode(rec.text)], [ids])):
                raise EncoderMismatch(f"{tok.encoder} differs from SentencePiece at {chunk.path} line {rec.line} "
                                      f"of the chunk: {diff}")
            doc = np.empty(len(ids) + 1, dtype=dtype)  # [len + 1]: the document, then eod
            doc[:-1] = ids
            doc[-1] = tok.eod
            add("valid" if key < threshold else "train", doc)
            tokens += len(doc)
            smallest.append(key)
        smallest[:] = sorted(smallest)[:SMALLEST_KEYS]
        if progress is not None:
            progress(reader.consumed - last, tokens)
            last = reader.consumed
        batch, batch_size = [], 0

    try:
        for rec in reader:
            if rec.bad is not None:
                if s.strict:
                    raise StrictError(f"{chunk.path}: chunk {chunk.id} line {rec.line} of the chunk "
                                      f"(byte {rec.offset}): {rec.bad}: {rec.detail}")
                r = rejected.setdefault(rec.bad, {"count": 0, "examples": []})
                r["count"] += 1
                if len(r["examples"]) < MAX_EXAMPLES:
                    r["examples"].append({"chunk_line": rec.line, "offset": rec.offset, "detail": rec.detail[:200]})
                continue
            batch.append(rec)
            batch_size += len(rec.data)
            if batch_size >= s.batch_bytes:
                flush()
        flush()
        for split, b in builders.items():
            b.finalize(fresh_tmp(f"{stems[split]}.idx"))
            for ext in ("bin", "idx"):
                os.replace(tmp_name(f"{stems[split]}.{ext}"), f"{stems[split]}.{ext}")
    except BaseException:
        for split, b in builders.items():  # free the space now (a full disk), not at the next run
            with contextlib.suppress(OSError):
                b.data_file.close()
            for ext in ("bin", "idx"):
                Path(tmp_name(f"{stems[split]}.{ext}")).unlink(missing_ok=True)
        raise
    for split in SPLITS:  # a split without documents has no file (e.g. left by a run of another plan)
        if split not in builders:
            for ext in ("bin", "idx"):
                Path(f"{stems[split]}.{ext}").unlink(missing_ok=True)
    result = {"id": chunk.id, "plan": plan_id, "encoder": tok.encoder, "splits": {},
              "rejected": rejected, "lines": reader.lines, "bytes": reader.consumed, "smallest_keys": smallest,
              "raw_sha256": _hash_raw(chunk.path, chunk.raw_start, chunk.raw_end),
              "elapsed_s": round(time.time() - t0, 3), "resumed": False}
    for split in SPLITS:
        has = split in builders
        result["splits"][split] = dict(stats[split], bin_bytes=os.path.getsize(f"{stems[split]}.bin") if has else 0,
                                       idx_bytes=os.path.getsize(f"{stems[split]}.idx") if has else 0)
    write_json_atomic(layout.done(chunk.id), result)
    return result
