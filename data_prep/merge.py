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
atomically, and only then are the parts deleted (unless --keep-chunk-shards): the output takes
~1x the token bytes, and at any moment every document is in a verified merged shard or in its
chunk shard. A mark whose shard is missing or damaged is dropped, so its chunks are redone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from data_prep.manifest import SPLITS, OutputDir, read_json, tmp_name, write_json_atomic
from data_prep.worker import indexed_dataset


def add_shard(builder, prefix: str) -> None:
    """Append the shard at `prefix` (its index, then its tokens) to an IndexedDatasetBuilder."""
    index = indexed_dataset()._IndexReader(f"{prefix}.idx", multimodal=False)
    assert index.dtype == builder.dtype, (prefix, index.dtype, builder.dtype)
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(index.sequence_lengths.tolist())
    builder.document_indices.extend((offset + index.document_indices[1:]).tolist())
    del index
    with open(f"{prefix}.bin", "rb") as f:
        shutil.copyfileobj(f, builder.data_file, 1 << 22)


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


def _mark_valid(layout: OutputDir, mark: dict | None, plan_id: str) -> bool:
    """A mark of this plan whose merged shard is in place with the recorded sizes."""
    if mark is None or mark.get("plan") != plan_id:
        return False
    stem = layout.path(mark["prefix"])
    try:
        return os.path.getsize(f"{stem}.bin") == mark["bin_bytes"] and \
            os.path.getsize(f"{stem}.idx") == mark["idx_bytes"]
    except OSError:
        return False


def verified_merges(layout: OutputDir, plan_id: str) -> set[tuple[str, str]]:
    """(chunk, split) pairs held by a verified merged shard; marks that no longer hold are removed."""
    held = set()
    for path in sorted(layout.merged_marks.glob("*.json")):
        mark = read_json(path)
        if _mark_valid(layout, mark, plan_id):
            held.update((c, mark["split"]) for c in mark["chunks"])
        else:
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
        builder = indexed_dataset().IndexedDatasetBuilder(f"{tmp}.bin", dtype=getattr(np, dtype_name))
        try:
            for part in entry["parts"]:
                add_shard(builder, str(layout.path(part)))
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
            "documents": entry["documents"], "tokens": entry["tokens"]})
    if not keep_parts:
        for part in entry["parts"]:
            for ext in ("bin", "idx"):
                Path(f"{layout.path(part)}.{ext}").unlink(missing_ok=True)
    return entry["prefix"]
