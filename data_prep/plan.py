"""Chunk planning: inputs -> chunks. The plan depends only on the inputs and the settings,
never on the worker count or launcher, which is what makes the output bytes independent of them.

Plain files are cut into `chunk_bytes` byte ranges. A compressed stream cannot be entered in the
middle, so its chunks are ranges of *uncompressed* offsets (size estimated from the compressed
size; the last chunk is open-ended, so a wrong estimate costs balance, never data) and each chunk
decompresses and discards the bytes before its start. That skip is cheap next to tokenizing
(zstd/gzip decompress at 0.3-1+ GB/s, the tokenizer at ~5 MB/s per core), but it grows with the
position, so a compressed file gets at most `max_compressed_chunks` chunks. For the largest
inputs prefer plain text or several compressed files (e.g. `split -C 2G`) to one huge stream.
Each chunk also hashes its own slice of the raw file, so input checksums cost no serial pass.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep.readers import detect_format

RATIO = {None: 1.0, "gz": 3.0, "xz": 4.0, "zst": 4.0}  # assumed uncompressed/compressed size
TARGET_CHUNKS = 16384  # enough for ~1000 workers to end together (tail loss ~ workers/chunks/2)
MIN_CHUNK, MAX_CHUNK = 4 << 20, 256 << 20


def auto_chunk_bytes(inputs: list[dict]) -> int:
    """Chunk size from the total input size only (never the worker count, so output bytes do
    not depend on it): ~TARGET_CHUNKS chunks, clamped to [4 MiB, 256 MiB]; 461 GB -> ~28 MB."""
    total = sum(int(i["size"] * RATIO[i["compression"]]) for i in inputs)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, total // TARGET_CHUNKS)))


@dataclass(frozen=True)
class Chunk:
    id: str  # "<input index>-<chunk index>", also the shard name stem
    input_index: int
    index: int  # chunk number within its input
    path: str
    kind: str
    compression: str | None
    start: int  # uncompressed byte offsets owned: [start, end)
    end: int | None  # None: to the end of the stream
    raw_start: int  # raw (on-disk) byte range this chunk hashes
    raw_end: int
    est_bytes: int  # uncompressed bytes expected (progress/ETA only)

    def to_dict(self) -> dict:
        return asdict(self)


def describe_input(path: Path) -> dict:
    """Name, size, format, and whether it can be opened (a real open: root passes os.access)."""
    kind, comp = detect_format(path)
    info = {"path": str(path), "size": 0, "mtime_ns": 0, "format": kind, "compression": comp,
            "readable": True, "error": None}
    try:
        st = os.stat(path)
        info.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        with open(path, "rb"):
            pass
    except OSError as e:
        info.update(readable=False, error=f"{e.strerror or e}")
    return info


def plan_chunks(inputs: list[dict], chunk_bytes: int, max_compressed_chunks: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    for i, inp in enumerate(inputs):
        if not inp["readable"]:
            continue  # reported as unreadable_file by the coordinator; no chunk can read it
        size, comp = inp["size"], inp["compression"]
        est = int(size * RATIO[comp])
        n = max(1, math.ceil(est / chunk_bytes))
        if comp is not None:
            n = min(n, max_compressed_chunks)
        stride = chunk_bytes if comp is None else math.ceil(est / n)
        for k in range(n):
            start = k * stride
            end = None if k == n - 1 else (k + 1) * stride
            raw = (start, min(size, end if end is not None else size)) if comp is None else \
                (k * size // n, (k + 1) * size // n)
            est_k = (end if end is not None else max(est, start)) - start
            chunks.append(Chunk(f"{i:05d}-{k:05d}", i, k, inp["path"], inp["format"], comp,
                                start, end, raw[0], raw[1], max(est_k, 0)))
    return chunks
