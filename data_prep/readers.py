"""Input formats: find input files, open them (decompressed, streamed), and read the documents
of one chunk (a range of uncompressed byte offsets) with bad input classified, not raised.

Formats: `.jsonl` (one JSON object per line, text under `text_key`) and `.txt` (documents
separated by blank lines, the CC-100 layout), each plain or compressed `.gz`, `.xz`, `.zst`.

Chunk ownership: a chunk [start, end) owns every record whose first byte lies in it, so any
set of split points covers each record exactly once. A chunk seeks (plain) or decompresses
and discards (compressed) up to a little before `start`, re-synchronizes on a line boundary
(.txt: also on a blank line, looking back at most LOOKBACK bytes), and reads past `end` only
to finish its last record. Lines are read with a length limit, so memory stays bounded
whatever the size of a line or a document (longer ones are rejected as `too_long`).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import lzma
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import zstandard

KINDS = ("jsonl", "txt")
COMPRESSIONS = {"": None, "gz": "gz", "xz": "xz", "zst": "zst"}
LOOKBACK = 1 << 20  # .txt: bytes looked back to learn whether the chunk starts mid-document
STREAM_ERRORS = (zstandard.ZstdError, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile)

# Reasons a record is rejected (manifest keys).
BAD_JSON, MISSING_TEXT, NON_STRING_TEXT = "malformed_json", "missing_text", "non_string_text"
INVALID_UTF8, EMPTY, TOO_LONG = "invalid_utf8", "empty_document", "too_long"
TRUNCATED, UNREADABLE = "truncated_stream", "unreadable_file"


class InputError(ValueError):
    """A command-line input that cannot be used at all (missing path, unknown format)."""


def detect_format(path: str | Path) -> tuple[str, str | None]:
    """('jsonl'|'txt', None|'gz'|'xz'|'zst') from the file name, e.g. a.jsonl.zst."""
    name = Path(path).name
    parts = name.split(".")
    comp = parts[-1] if parts[-1] in ("gz", "xz", "zst") else ""
    kind = parts[-2] if comp else parts[-1]
    if len(parts) < 2 or kind not in KINDS:
        raise InputError(f"{path}: unknown input format; expected .jsonl or .txt, optionally "
                         f"compressed (.gz, .xz, .zst), e.g. data.jsonl.zst")
    return kind, COMPRESSIONS[comp]


def _supported(path: Path) -> bool:
    try:
        detect_format(path)
        return True
    except InputError:
        return False


def expand_inputs(specs: list[str | Path]) -> list[Path]:
    """Files, directories (recursively: supported files inside) and globs -> absolute paths,
    in argument order, each group sorted, duplicates dropped."""
    out: list[Path] = []
    for spec in specs:
        spec = str(spec)
        if any(c in spec for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True))
            found = [p for p in found if p.is_file() and _supported(p)]
            if not found:
                raise InputError(f"--input {spec}: the pattern matches no .jsonl/.txt file")
        elif os.path.isdir(spec):
            found = sorted(p for p in Path(spec).rglob("*") if p.is_file() and _supported(p))
            if not found:
                raise InputError(f"--input {spec}: the directory holds no .jsonl/.txt file")
        elif os.path.lexists(spec):
            detect_format(spec)
            found = [Path(spec)]
        else:
            raise InputError(f"--input {spec}: no such file or directory")
        for p in found:
            p = Path(os.path.abspath(p))
            if p not in out:
                out.append(p)
    return out


class _ZstdStream(io.RawIOBase):
    """Decompresses concatenated zstd frames and, unlike zstandard's stream_reader, raises
    on a truncated last frame instead of ending silently."""

    def __init__(self, raw):
        self._raw, self._buf, self._obj, self._in_frame = raw, b"", None, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            data = self._raw.read(1 << 18)
            if not data:
                if self._in_frame:
                    raise zstandard.ZstdError("truncated zstd frame: input ended mid-frame")
                return 0
            while data:
                if self._obj is None:
                    self._obj, self._in_frame = zstandard.ZstdDecompressor().decompressobj(), True
                self._buf += self._obj.decompress(data)
                data = b""
                if self._obj.eof:
                    data, self._obj, self._in_frame = self._obj.unused_data, None, False
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_stream(path: str | Path, compression: str | None):
    """A buffered binary stream of the decompressed bytes."""
    if compression is None:
        return open(path, "rb", buffering=1 << 20)
    if compression == "gz":
        return io.BufferedReader(gzip.open(path, "rb"), 1 << 20)
    if compression == "xz":
        return io.BufferedReader(lzma.open(path, "rb"), 1 << 20)
    return io.BufferedReader(_ZstdStream(open(path, "rb")), 1 << 20)


@dataclass
class Record:
    """One document, or one rejected record (`bad` set to its reason)."""

    line: int  # 1-based line number within the chunk's own lines (see ChunkReader.lines)
    offset: int  # uncompressed byte offset of its first byte
    data: bytes | None = None  # UTF-8 text of a good document
    bad: str | None = None
    detail: str = ""


class ChunkReader:
    """Iterate the records a chunk owns. After iteration `lines` is the number of lines that
    start inside [start, end): summed over earlier chunks it turns chunk line numbers into
    file line numbers. `pos` is the uncompressed offset reached (progress, stream errors)."""

    def __init__(self, path, kind, compression, start: int, end: int | None,
                 text_key: str = "text", max_doc_bytes: int = 16 << 20):
        self.path, self.kind, self.compression = Path(path), kind, compression
        self.start, self.end = start, (end if end is not None else float("inf"))
        self.text_key, self.max_doc_bytes = text_key, max_doc_bytes
        self.lines = 0
        self.pos = 0  # uncompressed offset reached (for stream errors and progress)

    def _owned(self, offset: int) -> bool:
        return self.start <= offset < self.end

    def _lines(self, f, pos: int) -> Iterator[tuple[int, bytes, bool]]:
        """(start offset, line, too_long) from `pos`; long lines are consumed, not kept."""
        limit = self.max_doc_bytes + 1
        while True:
            line = f.readline(limit)
            if not line:
                return
            start, too_long = pos, False
            pos += len(line)
            while not line.endswith(b"\n"):
                more = f.readline(limit)
                if not more:
                    break
                too_long, line = True, b"\n"
                pos += len(more)
                if more.endswith(b"\n"):
                    break
            self.pos = pos
            if start >= self.start and start < self.end:
                self.lines += 1
            yield start, line, too_long or len(line) > self.max_doc_bytes

    def __iter__(self) -> Iterator[Record]:
        lookback = 1 if self.kind == "jsonl" else LOOKBACK
        begin = max(0, self.start - lookback)
        try:
            f = open_stream(self.path, self.compression)
        except OSError as e:
            if self.start == 0:
                yield Record(0, 0, bad=UNREADABLE, detail=str(e))
            return
        with f:
            try:
                if self.compression is None:
                    f.seek(begin)
                    self.pos = begin
                else:  # decompress and discard: a compressed stream cannot seek
                    while self.pos < begin:
                        block = f.read(min(1 << 20, begin - self.pos))
                        if not block:
                            return
                        self.pos += len(block)
                lines = self._lines(f, self.pos)
                if begin > 0:  # drop the partial line the lookback landed in
                    next(lines, None)
                if self.kind == "jsonl":
                    yield from self._jsonl(lines)
                else:
                    yield from self._txt(lines, at_doc_start=begin == 0)
            except STREAM_ERRORS as e:
                err_at = self.pos
                if self._owned(err_at):
                    yield Record(self.lines, err_at, bad=TRUNCATED, detail=f"{type(e).__name__}: {e}")
            except OSError as e:
                yield Record(self.lines, self.start, bad=UNREADABLE, detail=str(e))

    def _jsonl(self, lines) -> Iterator[Record]:
        for start, line, too_long in lines:
            if start >= self.end:
                return
            if start < self.start:
                continue
            n = self.lines
            if too_long:
                yield Record(n, start, bad=TOO_LONG, detail=f"line longer than {self.max_doc_bytes} bytes")
                continue
            if not line.strip():
                continue  # blank lines between records are not documents
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield Record(n, start, bad=INVALID_UTF8, detail=str(e))
                continue
            except ValueError as e:
                yield Record(n, start, bad=BAD_JSON, detail=str(e))
                continue
            if not isinstance(obj, dict):
                yield Record(n, start, bad=BAD_JSON, detail=f"a JSON {type(obj).__name__}, not an object")
                continue
            if self.text_key not in obj:
                yield Record(n, start, bad=MISSING_TEXT, detail=f"no {self.text_key!r} key (keys: {sorted(obj)[:5]})")
                continue
            text = obj[self.text_key]
            if not isinstance(text, str):
                yield Record(n, start, bad=NON_STRING_TEXT, detail=f"{self.text_key!r} is a {type(text).__name__}")
                continue
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as e:
                yield Record(n, start, bad=INVALID_UTF8, detail=f"lone surrogate escape: {e}")
                continue
            if not data.strip():
                yield Record(n, start, bad=EMPTY, detail="text is empty or whitespace")
                continue
            yield Record(n, start, data=data)

    def _txt(self, lines, at_doc_start: bool) -> Iterator[Record]:
        """Documents are runs of non-blank lines; `at_doc_start` says whether the previous
        line was blank (or there is none)."""
        prev_blank, doc, doc_start, doc_line, size, too_long = at_doc_start, None, 0, 0, 0, False
        for start, line, long_line in lines:
            blank = not long_line and not line.strip()
            if doc is not None and blank:
                yield self._txt_record(doc, doc_start, doc_line, size, too_long)
                doc = None
            elif doc is None and not blank and prev_blank:
                if start >= self.end:
                    return
                if start >= self.start:
                    doc, doc_start, doc_line, size, too_long = [], start, self.lines, 0, False
            if doc is not None and not blank:
                size += len(line)
                too_long = too_long or long_line or size > self.max_doc_bytes
                if not too_long:
                    doc.append(line)
            prev_blank = blank
        if doc is not None:
            yield self._txt_record(doc, doc_start, doc_line, size, too_long)

    def _txt_record(self, doc, start, line, size, too_long) -> Record:
        if too_long:
            return Record(line, start, bad=TOO_LONG, detail=f"document of {size} bytes > {self.max_doc_bytes}")
        data = b"".join(doc)
        if data.endswith(b"\n"):
            data = data[:-1]
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            return Record(line, start, bad=INVALID_UTF8, detail=str(e))
        return Record(line, start, data=data)
