"""Merge the per-chunk shards of each split into few large shards (megatron-core's
IndexedDatasetBuilder.add_index: the index is concatenated, the .bin copied), verify each, then
remove the chunk shards it holds.

Why merge: megatron-core's BlendedMegatronDatasetBuilder without weights gives each prefix a weight
equal to its sample count and refuses a prefix too small for one sample; thousands of tiny chunk
shards (e.g. a small valid split) trip that. Groups are consecutive chunk shards up to
`merge_bytes` of tokens, so the result is deterministic; each group is written to a temporary
name and renamed. Groups are independent: they run as tasks of the same launcher as the chunks
(parallel copies). `add_shard` is IndexedDatasetBuilder.add_index without its per-call
gc.collect(), which costs ~0.8 s with torch loaded (hours over 16k chunk shards).

Removal: once a merged shard is renamed into place, its .bin size and its index (documents,
tokens) are checked against the sum of its parts, a mark `.work/merged/<name>.json` is written
atomically with the sha256 of its .bin (hashed while copying) and .idx, and only then are the
parts deleted (unless --keep-chunk-shards): the output takes ~1x the token bytes, and at any
moment every document is in a verified merged shard or in its chunk shard. A rerun hashes every
merged shard again: a mark whose shard is missing or was changed (even at the same size) is
dropped, so its chunks are redone. The manifest lists each merged shard's sha256.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data_prep.files import tmp_name
from data_prep.manifest import SPLITS, OutputDir, read_json, safe_prefix, write_json_atomic
from data_prep.tokenizer import file_sha256
from data_prep.worker import indexed_dataset

log = logging.getLogger("data_prep")


def add_shard(builder, prefix: str, digest=None) -> None:
    """Append the shard at `prefix` (its index, then its tokens) to an IndexedDatasetBuilder;
    `digest` (a hashlib object), if given, is updated with the tokens copied."""
    index = indexed_dataset()._IndexReader(f"{prefix}.idx", multimodal=False)
    assert index.dtype == builder.dtype, (prefix, index.dtype, builder.dtype)
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(index.sequence_lengths.tolist())
    builder.document_indices.extend((offset + index.document_indices[1:]).tolist())
    del index
    with open(f"{prefix}.bin", "rb") as f:
        while block := f.read(1 << 22):
            builder.data_file.write(block)
            if digest is not None:
                digest.update(block)


def plan_groups(shards: list[dict], merge_bytes: int) -> dict[str, list[list[dict]]]:
    groups: dict[str, list[list[dict]]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        cur, size = [], 0
        for s in shards:
            if s["split"] != split or s["documents"] == 0:
                continue
            if cur and size + s["bin_bytes"] > merge_bytes:
                groups[split].append(cur)
                cur, size = [], 0
            cur.append(s)
            size += s["bin_bytes"]
        if cur:
            groups[split].append(cur)
    return groups


def plan_merge(shards: list[dict], merge_bytes: int) -> list[dict]:
    """Manifest entries of the merged shards (deterministic: depends on the chunk shards only).
    merge_bytes=0: no merge; the entries are then the chunk shards themselves."""
    if merge_bytes <= 0:
        return [dict(s, chunks=[s["chunk"]]) for s in shards if s["documents"] > 0]
    return [{"prefix": OutputDir.merged_prefix(split, k), "split": split,
             "documents": sum(s["documents"] for s in group), "tokens": sum(s["tokens"] for s in group),
             "bin_bytes": sum(s["bin_bytes"] for s in group), "chunks": [s["chunk"] for s in group],
             "parts": [s["prefix"] for s in group]}
            for split, groups in plan_groups(shards, merge_bytes).items() for k, group in enumerate(groups)]


def _mark_valid(layout: OutputDir, mark: dict | None, plan_id: str, check_hash: bool = False) -> bool:
    """A mark of this plan whose merged shard is in place with the recorded sizes (and, with
    `check_hash`, the recorded sha256 of its .bin and .idx: a same-size change is caught too)."""
    if mark is None or mark.get("plan") != plan_id or not safe_prefix(mark.get("prefix")) or "sha256" not in mark:
        return False
    stem = layout.path(mark["prefix"])
    try:
        return os.path.getsize(f"{stem}.bin") == mark["bin_bytes"] and \
            os.path.getsize(f"{stem}.idx") == mark["idx_bytes"] and \
            (not check_hash or (file_sha256(f"{stem}.bin"), file_sha256(f"{stem}.idx")) ==
             (mark["sha256"], mark["idx_sha256"]))
    except OSError:
        return False


def verified_merges(layout: OutputDir, plan_id: str, threads: int = 1) -> set[tuple[str, str]]:
    """(chunk, split) pairs held by a verified merged shard: its sizes and sha256 as its mark
    records (hashed on `threads` threads: hashlib releases the GIL). A mark that no longer holds
    is removed, and logged when its shard was changed in place, so its chunks are redone."""
    paths = sorted(layout.merged_marks.glob("*.json"))
    marks = [read_json(p) for p in paths]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        ok = list(pool.map(lambda m: _mark_valid(layout, m, plan_id, check_hash=True), marks))
    held = set()
    for path, mark, good in zip(paths, marks, ok):
        if good:
            held.update((c, mark["split"]) for c in mark["chunks"])
            continue
        if _mark_valid(layout, mark, plan_id):  # right sizes, other bytes
            log.warning(f"merged shard {layout.path(mark['prefix'])} does not match the sha256 recorded when it "
                        f"was written (changed in place?): its chunks are redone")
        path.unlink()
    return held


def _verify(stem: Path, entry: dict) -> None:
    index = indexed_dataset()._IndexReader(f"{stem}.idx", multimodal=False)
    got = (os.path.getsize(f"{stem}.bin"), len(index.sequence_lengths), int(index.sequence_lengths.sum()))
    want = (entry["bin_bytes"], entry["documents"], entry["tokens"])
    if got != want:
        raise RuntimeError(f"merged shard {stem} has (bin bytes, documents, tokens) {got}, expected {want}; "
                           f"delete it and rerun")


def merge_one(out_dir: str, entry: dict, dtype_name: str, plan_id: str, keep_parts: bool) -> str:
    """Write, verify and mark one merged shard, then remove its parts; a task of the pool/array."""
    layout = OutputDir(out_dir)
    final = layout.path(entry["prefix"])
    if not _mark_valid(layout, read_json(layout.merged_mark(entry["prefix"])), plan_id):
        final.parent.mkdir(exist_ok=True)
        tmp = tmp_name(final)
        for ext in ("bin", "idx"):  # a leftover or a planted symlink: never written through
            Path(f"{tmp}.{ext}").unlink(missing_ok=True)
        builder = indexed_dataset().IndexedDatasetBuilder(f"{tmp}.bin", dtype=getattr(np, dtype_name))
        digest = hashlib.sha256()
        try:
            for part in entry["parts"]:
                add_shard(builder, str(layout.path(part)), digest)
            builder.finalize(f"{tmp}.idx")
        except BaseException:
            builder.data_file.close()
            for ext in ("bin", "idx"):
                Path(f"{tmp}.{ext}").unlink(missing_ok=True)
            raise
        os.replace(f"{tmp}.bin", f"{final}.bin")
        os.replace(f"{tmp}.idx", f"{final}.idx")
        _verify(final, entry)
        write_json_atomic(layout.merged_mark(entry["prefix"]), {
            "prefix": entry["prefix"], "split": entry["split"], "chunks": entry["chunks"], "plan": plan_id,
            "bin_bytes": entry["bin_bytes"], "idx_bytes": os.path.getsize(f"{final}.idx"),
            "sha256": digest.hexdigest(), "idx_sha256": file_sha256(f"{final}.idx"),
            "documents": entry["documents"], "tokens": entry["tokens"]})
    if not keep_parts:
        for part in entry["parts"]:
            for ext in ("bin", "idx"):
                Path(f"{layout.path(part)}.{ext}").unlink(missing_ok=True)
    return read_json(layout.merged_mark(entry["prefix"]))["sha256"]
