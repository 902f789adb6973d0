"""Chunk planning: inputs -> chunks. The plan depends only on the inputs and the settings,
never on the worker count or launcher, which is what makes the output bytes independent of them.

Plain files are cut into `chunk_bytes` byte ranges. A compressed stream cannot be entered in the
middle, so its chunks are ranges of *uncompressed* offsets (size estimated from the compressed
size; the last chunk is open-ended, so a wrong estimate costs balance, never data) and each chunk
decompresses and discards the bytes before its start. That skip is cheap next to tokenizing
(zstd/gzip decompress at 0.3-1+ GB/s, the tokenizer at ~5 MB/s per core), but it grows with the
position, so a compressed file gets at most `max_compressed_chunks` chunks. For the largest
inputs prefer plain text or several compressed files (e.g. `split -C 2G`) to one huge stream.
A Parquet file is cut at row-group boundaries into chunks of about `chunk_bytes` of (uncompressed)
text, so one big file is not one serial task; sizes come from the file footer.
Each chunk also hashes its own slice of the raw file, so input checksums cost no serial pass.
The plan records, per input, its size, mtime and a hash of the first and last EDGE_BYTES of every
chunk's raw range (`edges_sha256`, a few reads per chunk): a resume refuses an input changed at
any of those places even with its size and mtime restored. A change elsewhere inside a chunk
with size and mtime restored is not seen on resume (the manifest's checksums, made from the
bytes each chunk read, still describe what was tokenized).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep.readers import InputError, detect_format, parquet_row_groups

RATIO = {None: 1.0, "gz": 3.0, "xz": 4.0, "zst": 4.0, "bz2": 4.0}  # assumed uncompressed/compressed size
TARGET_CHUNKS = 16384  # enough for ~1000 workers to end together (tail loss ~ workers/chunks/2)
MIN_CHUNK, MAX_CHUNK = 4 << 20, 256 << 20
EDGE_BYTES = 4096  # bytes hashed at each end of every chunk's raw range (the plan's input fingerprint)


def auto_chunk_bytes(inputs: list[dict]) -> int:
    """Chunk size from the total input size only (never the worker count, so output bytes do
    not depend on it): ~TARGET_CHUNKS chunks, clamped to [4 MiB, 256 MiB]; 461 GB -> ~28 MB."""
    total = sum(estimated_bytes(i) for i in inputs)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, total // TARGET_CHUNKS)))


def estimated_bytes(inp: dict) -> int:
    """Uncompressed size of a described input (text column size for Parquet)."""
    if inp["format"] == "parquet":
        return sum(b for _, b in inp.get("row_groups", []))
    return int(inp["size"] * RATIO[inp["compression"]])


@dataclass(frozen=True)
class Chunk:
    id: str  # "<input index>-<chunk index>", also the shard name stem
    input_index: int
    index: int  # chunk number within its input
    path: str
    kind: str
    compression: str | None
    start: int  # uncompressed byte offsets owned: [start, end) (Parquet: row groups)
    end: int | None  # None: to the end of the stream
    raw_start: int  # raw (on-disk) byte range this chunk hashes
    raw_end: int
    est_bytes: int  # uncompressed bytes expected (progress/ETA only)

    def to_dict(self) -> dict:
        return asdict(self)


def describe_input(path: Path, text_key: str) -> dict:
    """Name, size, format, and whether it can be opened (a real open: root passes os.access);
    for Parquet also the row groups, read from the footer (a wrong --text-key is refused here)."""
    kind, comp = detect_format(path)
    info = {"path": str(path), "size": 0, "mtime_ns": 0, "format": kind, "compression": comp,
            "readable": True, "error": None}
    try:
        st = os.stat(path)
        info.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # never blocks (a FIFO put in its place)
        if kind == "parquet":
            info["row_groups"] = parquet_row_groups(path, text_key)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, or pyarrow's error for a damaged footer
        info.update(readable=False, error=f"{getattr(e, 'strerror', None) or e}")
    return info


def _parquet_chunks(i: int, inp: dict, chunk_bytes: int) -> list[Chunk]:
    """Consecutive row groups up to ~chunk_bytes of text per chunk (at least one group each)."""
    groups, out, first, size = inp["row_groups"], [], 0, 0
    for g, (_, nbytes) in enumerate(groups):
        size += nbytes
        if size >= chunk_bytes or g == len(groups) - 1:
            out.append((first, g + 1, size))
            first, size = g + 1, 0
    n, total = len(out), inp["size"]
    return [Chunk(f"{i:05d}-{k:05d}", i, k, inp["path"], "parquet", None, a, b,
                  k * total // n, (k + 1) * total // n, est) for k, (a, b, est) in enumerate(out)]


def plan_chunks(inputs: list[dict], chunk_bytes: int, max_compressed_chunks: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    for i, inp in enumerate(inputs):
        if not inp["readable"]:
            continue  # reported as unreadable_file by the coordinator; no chunk can read it
        if inp["format"] == "parquet":
            chunks += _parquet_chunks(i, inp, chunk_bytes)
            continue
        size, comp = inp["size"], inp["compression"]
        est = estimated_bytes(inp)
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


def edges_sha256(chunks: list[Chunk]) -> dict[str, str]:
    """Per input path: sha256 of the first and last EDGE_BYTES of each of its chunks' raw ranges."""
    out: dict[str, str] = {}
    by_path: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_path.setdefault(c.path, []).append(c)
    for path, cs in by_path.items():
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for c in cs:
                    for at in sorted({c.raw_start, max(c.raw_start, c.raw_end - EDGE_BYTES)}):
                        f.seek(at)
                        h.update(f.read(min(EDGE_BYTES, c.raw_end - at)))
        except OSError:  # gone since it was described: its chunks report it as unreadable
            continue
        out[path] = h.hexdigest()
    return out
