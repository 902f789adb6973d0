"""Merge the per-chunk shards of each split into few large shards (megatron-core's
IndexedDatasetBuilder.add_index: the index is concatenated, the .bin copied).

Why merge: megatron-core's BlendedMegatronDatasetBuilder without weights gives each prefix a weight
equal to its sample count and refuses a prefix too small for one sample; thousands of tiny chunk
shards (e.g. a small valid split) trip that. Groups are consecutive chunk shards up to
`merge_bytes` of tokens, so the result is deterministic; each group is written to a temporary
name and renamed, and a group already present with the recorded size is kept (resume). Groups
are independent: they run as tasks of the same launcher as the chunks (parallel copies).
`add_shard` is IndexedDatasetBuilder.add_index without its per-call gc.collect(), which costs
~0.8 s with torch loaded (hours over 16k chunk shards); the index and data handling are the same.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from data_prep.worker import SPLITS, indexed_dataset


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
    return [{"prefix": f"merged/{split}_{k:05d}", "split": split,
             "documents": sum(s["documents"] for s in group), "tokens": sum(s["tokens"] for s in group),
             "bin_bytes": sum(s["bin_bytes"] for s in group), "chunks": [s["chunk"] for s in group],
             "parts": [s["prefix"] for s in group]}
            for split, groups in plan_groups(shards, merge_bytes).items() for k, group in enumerate(groups)]


def merge_complete(out_dir: Path, entry: dict) -> bool:
    final = Path(out_dir) / entry["prefix"]
    if "parts" not in entry:
        return True
    return final.with_suffix(".idx").exists() and os.path.getsize(f"{final}.bin") == entry["bin_bytes"]


def merge_one(out_dir: str, entry: dict, dtype_name: str) -> str:
    """Write one merged shard (temporary name, then rename); a task of the worker pool/array."""
    out_dir = Path(out_dir)
    final = out_dir / entry["prefix"]
    if merge_complete(out_dir, entry):
        return entry["prefix"]
    final.parent.mkdir(exist_ok=True)
    tmp = f"{final}.tmp{os.getpid()}"
    builder = indexed_dataset().IndexedDatasetBuilder(f"{tmp}.bin", dtype=getattr(np, dtype_name))
    for part in entry["parts"]:
        add_shard(builder, str(out_dir / part))
    builder.finalize(f"{tmp}.idx")
    os.replace(f"{tmp}.bin", f"{final}.bin")
    os.replace(f"{tmp}.idx", f"{final}.idx")
    return entry["prefix"]
