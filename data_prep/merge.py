"""Merge the per-chunk shards of each split into few large shards (megatron-core's
IndexedDatasetBuilder.add_index: the index is concatenated, the .bin copied).

Why merge: megatron-core's BlendedMegatronDatasetBuilder without weights gives each prefix a weight
equal to its sample count and refuses a prefix too small for one sample; thousands of tiny chunk
shards (e.g. a small valid split) trip that. Groups are consecutive chunk shards up to
`merge_bytes` of tokens, so the result is deterministic; each group is written to a temporary
name and renamed, and a group already present with the recorded size is kept (resume).
`add_shard` is IndexedDatasetBuilder.add_index without its per-call gc.collect(), which costs
~0.8 s with torch loaded (hours over 16k chunk shards); the index and data handling are the same.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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


def merge_shards(out_dir: Path, shards: list[dict], merge_bytes: int, dtype) -> list[dict]:
    """Write merged/<split>_<k>.{bin,idx}; returns their manifest entries. merge_bytes=0: no
    merge (no copy); the entries are then the chunk shards themselves."""
    out_dir = Path(out_dir)
    if merge_bytes <= 0:
        return [dict(s, chunks=[s["chunk"]]) for s in shards if s["documents"] > 0]
    (out_dir / "merged").mkdir(exist_ok=True)
    merged = []
    for split, groups in plan_groups(shards, merge_bytes).items():
        for k, group in enumerate(groups):
            prefix = f"merged/{split}_{k:05d}"
            size = sum(s["bin_bytes"] for s in group)
            final = out_dir / prefix
            if not (final.with_suffix(".idx").exists() and os.path.getsize(f"{final}.bin") == size):
                tmp = f"{final}.tmp{os.getpid()}"
                builder = indexed_dataset().IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
                for s in group:
                    add_shard(builder, str(out_dir / s["prefix"]))
                builder.finalize(f"{tmp}.idx")
                os.replace(f"{tmp}.bin", f"{final}.bin")
                os.replace(f"{tmp}.idx", f"{final}.idx")
            merged.append({"prefix": prefix, "split": split, "documents": sum(s["documents"] for s in group),
                           "tokens": sum(s["tokens"] for s in group), "bin_bytes": size,
                           "chunks": [s["chunk"] for s in group]})
    return merged
