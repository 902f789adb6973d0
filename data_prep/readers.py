"""Input formats: find input files, open them (decompressed, streamed), and read the documents
of one chunk with bad input classified, not raised.

Formats: `.jsonl` or `.ndjson` (one JSON object per line, text under `text_key`), `.txt`
(documents separated by blank lines, the CC-100 layout; CRLF and CR-only line ends read as LF),
each plain or compressed `.gz`, `.xz`, `.zst` or `.bz2`; `.json.gz` & co. (JSON lines under
Dolma's name; a plain `.json` is not taken, it is usually one JSON document); `.parquet` (text in
column `text_key`, e.g. FineWeb). Extensions match in any case (`B.JSONL`, `x.jsonl.GZ`); a
UTF-8 byte order mark at the start of a file is dropped. Only regular files are read: a
directory or glob lists every file it does not take, with the reason (`expand_inputs`).

Chunk ownership: a text chunk is a range [start, end) of uncompressed byte offsets and owns
every record whose first byte lies in it, so any set of split points covers each record exactly
once. A chunk seeks (plain) or decompresses and discards (compressed) up to a little before
`start`, re-synchronizes on a line boundary (.txt: also on a blank line, looking back at most
LOOKBACK bytes), and reads past `end` only to finish its last record. Lines are read with a
length limit, so memory stays bounded whatever the size of a line or a document (longer ones
are rejected as `too_long`, with their real size), and one decompression step yields at most
STEP_OUT bytes, so a decompression bomb costs time, never memory. A Parquet chunk is a range of
row groups, read a batch of rows at a time with pyarrow (only the text column, never the whole
file); a row group that does not decode (a damaged page) is one `corrupt_row_group` record, and
the chunk goes on with the next group.

A compressed stream that ends early (a truncated download) gives every document that was
decompressed completely before the cut, then one `truncated_stream` record at the line of the cut.
A stream whose data is damaged gives one `corrupt_stream` record where the decompressor noticed;
the documents decoded before that point are kept, but may be garbled: gzip checks its CRC only at
the end of a member, xz and bz2 at the end of a block (the coordinator warns about such files).
"""

from __future__ import annotations

import bz2
import fnmatch
import glob
import io
import json
import lzma
import os
import re
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import zstandard

KINDS = {"jsonl": "jsonl", "ndjson": "jsonl", "json": "jsonl", "txt": "txt", "parquet": "parquet"}
COMPRESSIONS = ("gz", "xz", "zst", "bz2")
LOOKBACK = 1 << 20  # .txt: bytes looked back to learn whether the chunk starts mid-document
PARQUET_BATCH_ROWS = 256  # rows decoded at a time: memory ~ 256 documents + one page
STEP_OUT = 1 << 20  # bytes one decompression step yields at most (gz, xz, bz2: exactly)
ZSTD_FEED = 512  # zstd has no output limit: feed it this little (its ratio is at most ~32768: 16 MiB)
BOM = b"\xef\xbb\xbf"

# Reasons a record is rejected (manifest keys).
BAD_JSON, MISSING_TEXT, NON_STRING_TEXT = "malformed_json", "missing_text", "non_string_text"
INVALID_UTF8, EMPTY, TOO_LONG = "invalid_utf8", "empty_document", "too_long"
TRUNCATED, UNREADABLE = "truncated_stream", "unreadable_file"
CORRUPT_STREAM, CORRUPT_ROW_GROUP = "corrupt_stream", "corrupt_row_group"


class InputError(ValueError):
    """A command-line input that cannot be used at all (missing path, unknown format, no such column)."""


class StreamError(Exception):
    """A compressed stream that is corrupt (raised after everything before it was read)."""


class TruncatedStream(StreamError):
    """A compressed stream that ends before its end marker."""


def detect_format(path: str | Path) -> tuple[str, str | None]:
    """('jsonl'|'txt'|'parquet', None|'gz'|'xz'|'zst'|'bz2') from the file name, e.g. a.jsonl.zst."""
    parts = Path(path).name.lower().split(".")
    comp = parts[-1] if parts[-1] in COMPRESSIONS else None
    ext = parts[-2] if comp and len(parts) > 2 else parts[-1]
    kind = KINDS.get(ext) if len(parts) >= 2 else None
    if kind is None or (ext == "json" and comp is None) or (kind == "parquet" and comp):
        raise InputError(f"{path}: unknown input format; expected .jsonl, .ndjson, .txt (each optionally "
                         f".gz, .xz, .zst or .bz2), .json.gz (or .xz, .zst, .bz2) or .parquet")
    return kind, comp


def _file_type(mode: int) -> str:
    return next((name for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                                         (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                                         (stat.S_ISBLK, "a block device")) if test(mode)), "not a regular file")


def skip_reason(path: str) -> str | None:
    """Why a file found in a directory or by a glob is not read (None: it is an input). A FIFO
    or device is never opened: reading one would block, or never end."""
    try:
        detect_format(path)
    except InputError:
        return "not an input format (.jsonl, .ndjson, .txt, each optionally .gz/.xz/.zst/.bz2, " \
               ".json.gz & co., .parquet)"
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    return None if stat.S_ISREG(mode) else f"{_file_type(mode)}, not a regular file"


def _file_key(path: str) -> tuple:
    """Identity of the file a path resolves to: (device, inode), or the path if it cannot be stat'ed."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return ("unresolved", os.path.abspath(path))


def _walk(top: str) -> Iterator[str]:
    """Files under `top` in sorted order. Directory symlinks are followed, but never into a
    directory already walked: a symlink loop ends, and a directory linked twice is read once."""
    seen: set[tuple] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        key = _file_key(dirpath)
        if key in seen:
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames.sort()
        yield from (os.path.join(dirpath, f) for f in sorted(filenames))


def _match(segments: list[str], patterns: list[str]) -> bool:
    """Glob match of path segments, `**` matching any number of directories; like glob, a
    `*` does not match a hidden name."""
    if not patterns:
        return not segments
    if patterns[0] == "**":
        return any(_match(segments[i:], patterns[1:]) for i in range(len(segments) + 1)
                   if not any(s.startswith(".") for s in segments[:i]))
    return bool(segments) and fnmatch.fnmatchcase(segments[0], patterns[0]) and \
        (not segments[0].startswith(".") or patterns[0].startswith(".")) and _match(segments[1:], patterns[1:])


def _glob(spec: str) -> list[str]:
    """glob.glob(spec, recursive=True), but a `**` walks with _walk (the glob module follows
    directory symlinks without end: a loop under `**` made it return one file 41 times)."""
    if "**" not in spec:
        return sorted(glob.glob(spec))  # one directory level per pattern segment: no recursion
    parts = spec.split(os.sep)
    k = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
    root = os.sep.join(parts[:k]) or (os.sep if spec.startswith(os.sep) else os.curdir)
    return [p for p in _walk(root) if _match(os.path.relpath(p, root).split(os.sep), parts[k:])]


def _found(paths: list[str], skipped: list[dict]) -> list[str]:
    """The inputs among files found by a directory walk or a glob; the rest go to `skipped`."""
    out = []
    for p in paths:
        if (reason := skip_reason(p)) is None:
            out.append(p)
        else:
            skipped.append({"file": os.path.abspath(p), "reason": reason})
    return out


def expand_inputs(specs: list[str | Path], skipped: list[dict] | None = None) -> list[Path]:
    """Files, directories (recursively: supported files inside) and globs -> absolute paths,
    in argument order, each group sorted. A file reached twice (a symlink, a hard link, a
    directory given twice) is kept once, under the first path that reached it. Files a
    directory or glob holds but that are not read are appended to `skipped` as
    {"file", "reason"}; a named file that is not a regular file is refused."""
    out: list[Path] = []
    seen: set[tuple] = set()
    skipped = [] if skipped is None else skipped
    for spec in map(str, specs):
        if any(c in spec for c in "*?["):
            found = _found(_glob(spec), skipped)
            if not found:
                raise InputError(f"--input {spec}: the pattern matches no input file (.jsonl, .txt, .parquet, ...)")
        elif os.path.isdir(spec):
            found = _found(list(_walk(spec)), skipped)
            if not found:
                raise InputError(f"--input {spec}: the directory holds no input file (.jsonl, .txt, .parquet, ...)")
        elif os.path.lexists(spec):
            detect_format(spec)
            if os.path.exists(spec) and not stat.S_ISREG(mode := os.stat(spec).st_mode):
                raise InputError(f"--input {spec} is {_file_type(mode)}, not a regular file: pass a file")
            found = [spec]
        else:
            raise InputError(f"--input {spec}: no such file or directory")
        for p in found:
            key = _file_key(p)
            if key not in seen:
                seen.add(key)
                out.append(Path(os.path.abspath(p)))
    return out


def parquet_row_groups(path: str | Path, text_key: str) -> list[tuple[int, int]]:
    """(rows, uncompressed bytes of the text column) of each row group, from the file footer.
    A missing or non-text column is refused here, before any work starts."""
    import pyarrow as pa  # here: --help and the other formats never load pyarrow
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    schema = meta.schema.to_arrow_schema()
    if text_key not in schema.names:
        raise InputError(f"{path}: no column {text_key!r}; its columns are {', '.join(schema.names)}: "
                         f"pass the one holding the text with --text-key")
    typ = schema.field(text_key).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise InputError(f"{path}: column {text_key!r} holds {typ}, not text; pass the text column "
                         f"with --text-key (columns: {', '.join(schema.names)})")
    col = schema.names.index(text_key)
    return [(meta.row_group(g).num_rows, meta.row_group(g).column(col).total_uncompressed_size)
            for g in range(meta.num_row_groups)]


class _Decompressed(io.RawIOBase):
    """The decompressed bytes of concatenated gz members / xz streams / zstd frames / bz2 streams.

    Unlike gzip.open and co. behind a buffered reader (which drop up to a buffer of good data
    when the input ends mid-stream), every byte decompressed before a cut is returned first;
    only then does a truncated or corrupt stream raise StreamError. One step yields at most
    STEP_OUT bytes (zstd, which has no output limit: ZSTD_FEED input bytes), so memory stays
    bounded whatever the compression ratio (a decompression bomb)."""

    _NEW = {"gz": lambda: zlib.decompressobj(wbits=31), "xz": lzma.LZMADecompressor,
            "bz2": bz2.BZ2Decompressor, "zst": lambda: zstandard.ZstdDecompressor().decompressobj()}

    def __init__(self, raw, compression: str):
        self._raw, self._new, self._comp = raw, self._NEW[compression], compression
        self._buf, self._at = b"", 0  # the last step's output, and how much of it was returned
        self._input = b""  # raw bytes read but not yet given to a decompressor
        self._dec = None  # the decompressor of the member being read, if any
        self._held = False  # the decompressor may hold output: the next step feeds it nothing
        self._error: StreamError | None = None  # raised once the bytes before it are returned

    def readable(self) -> bool:
        return True

    def _step(self) -> bytes | None:
        """The next decompressed bytes (at most STEP_OUT, maybe none); None at the end of the input."""
        if self._held:
            data = b""
        else:
            if not self._input:
                self._input = self._raw.read(1 << 16)
                if not self._input:
                    if self._dec is not None:
                        raise TruncatedStream(f"the {self._comp} stream ends before its end marker (truncated file?)")
                    return None
            feed = ZSTD_FEED if self._comp == "zst" else len(self._input)
            data, self._input = self._input[:feed], self._input[feed:]
        self._dec = self._dec or self._new()
        try:
            out = self._dec.decompress(data) if self._comp == "zst" else self._dec.decompress(data, STEP_OUT)
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as e:
            raise StreamError(f"corrupt {self._comp} data: {e}") from e
        if self._comp == "gz":  # zlib hands back the input it did not use
            self._input = self._dec.unconsumed_tail + self._input
            self._held = len(out) == STEP_OUT
        elif self._comp != "zst":
            self._held = not self._dec.needs_input and not self._dec.eof
        if self._dec.eof:  # member/frame complete: the rest of the input starts the next one
            self._input, self._dec, self._held = self._dec.unused_data + self._input, None, False
        return out

    def readinto(self, b) -> int:
        """Fill `b` from as many steps as it takes (zstd's are small); an error is raised only
        once everything decompressed before it was returned."""
        n = 0
        while n < len(b) and self._error is None:
            if self._at == len(self._buf):
                try:
                    out = self._step()
                except StreamError as e:
                    self._error = e
                    break
                if out is None:
                    break
                self._buf, self._at = out, 0
            k = min(len(b) - n, len(self._buf) - self._at)
            b[n:n + k] = memoryview(self._buf)[self._at:self._at + k]
            n, self._at = n + k, self._at + k
        if n == 0 and self._error is not None:
            raise self._error
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class _CrToLf(io.RawIOBase):
    """A byte stream with every CR not followed by LF read as LF (.txt: CR-only line ends, as
    classic Mac OS wrote them). Same length, so byte offsets are those of the file."""

    def __init__(self, src):
        self._src, self._next = src, b""  # _next: the byte read ahead to classify a final CR

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._src.seekable()

    def tell(self) -> int:
        return self._src.tell() - len(self._next)

    def seek(self, pos: int, whence: int = 0) -> int:
        pos = pos + self.tell() if whence == io.SEEK_CUR else pos
        self._src.seek(pos, whence if whence == io.SEEK_END else io.SEEK_SET)
        self._next = b""
        return self.tell()

    def readinto(self, b) -> int:
        data = self._next + self._src.read(max(len(b) - len(self._next), 1))
        self._next = self._src.read(1) if data.endswith(b"\r") else b""
        crlf = self._next == b"\n"
        out = _LONE_CR.sub(b"\n", data[:-1] if crlf else data) + (b"\r" if crlf else b"")
        b[:len(out)] = out
        return len(out)

    def close(self) -> None:
        self._src.close()
        super().close()


_LONE_CR = re.compile(rb"\r(?!\n)")


def open_stream(path: str | Path, compression: str | None, kind: str = "jsonl"):
    """A buffered binary stream of the decompressed bytes (.txt: lone CRs read as LF)."""
    raw = open(path, "rb", buffering=1 << 20)
    if compression is not None:
        raw = io.BufferedReader(_Decompressed(raw, compression), 1 << 20)
    return io.BufferedReader(_CrToLf(raw), 1 << 20) if kind == "txt" else raw


@dataclass
class Record:
    """One document, or one rejected record (`bad` set to its reason)."""

    line: int  # 1-based line (Parquet: row) number within the chunk's own lines (see ChunkReader.lines)
    offset: int  # uncompressed byte offset of its first byte (Parquet: row number in the chunk)
    data: bytes | None = None  # UTF-8 text of a good document
    text: str | None = None  # the same text, decoded
    bad: str | None = None
    detail: str = ""


class ChunkReader:
    """Iterate the records a chunk owns. After iteration `lines` is the number of lines (rows)
    that start inside the chunk: summed over earlier chunks it turns chunk line numbers into
    file line numbers. `consumed` is the part of the chunk read so far, in bytes (progress)."""

    def __init__(self, path, kind, compression, start: int, end: int | None,
                 text_key: str = "text", max_doc_bytes: int = 16 << 20):
        self.path, self.kind, self.compression = Path(path), kind, compression
        self.start, self.end = start, (end if end is not None else float("inf"))
        self.text_key, self.max_doc_bytes = text_key, max_doc_bytes
        self.lines = 0
        self.pos = 0  # uncompressed offset reached (text formats)
        self._text_bytes = 0  # text bytes read (Parquet)

    @property
    def consumed(self) -> int:
        if self.kind == "parquet":
            return self._text_bytes
        return int(max(0, min(self.pos, self.end) - self.start))

    def _too_long(self, size: int) -> str:
        return f"document of {size:,} bytes > the limit of {self.max_doc_bytes:,} (--max-doc-mb)"

    def _lines(self, f, pos: int) -> Iterator[tuple[int, bytes, int]]:
        """(start offset, line, real size) from `pos`; a line longer than max_doc_bytes is
        consumed, not kept (its `line` is then b"")."""
        limit = self.max_doc_bytes + 1
        while True:
            line = f.readline(limit)
            if not line:
                return
            start, size = pos, len(line)
            if size == limit and not line.endswith(b"\n"):
                line = b""
                while more := f.readline(limit):
                    size += len(more)
                    if more.endswith(b"\n"):
                        break
            pos = self.pos = start + size
            if start == 0 and line.startswith(BOM):  # a byte order mark is not text
                line = line[len(BOM):]
            if self.start <= start < self.end:
                self.lines += 1
            yield start, line, size

    def __iter__(self) -> Iterator[Record]:
        if self.kind == "parquet":
            yield from self._parquet()
            return
        lookback = 1 if self.kind == "jsonl" else LOOKBACK
        begin = max(0, self.start - lookback)
        try:
            f = open_stream(self.path, self.compression, self.kind)
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
            except StreamError as e:
                # self.pos: the first byte not in a complete line; the chunk owning it reports
                if self.start <= self.pos < self.end and isinstance(e, TruncatedStream):
                    yield Record(self.lines + 1, self.pos, bad=TRUNCATED,
                                 detail=f"{e}; the documents before this line were kept")
                elif self.start <= self.pos < self.end:
                    yield Record(self.lines + 1, self.pos, bad=CORRUPT_STREAM,
                                 detail=f"{e}; the documents decoded before this line were kept but may be "
                                        f"damaged ({self.compression} checks its checksum only at the end of a "
                                        f"member or block): test the file and download it again")
            except OSError as e:
                yield Record(self.lines, self.start, bad=UNREADABLE, detail=str(e))

    def _document(self, n: int, offset: int, data: bytes) -> Record:
        """A record from the UTF-8 bytes of one document (any format)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return Record(n, offset, bad=INVALID_UTF8, detail=str(e))
        if not data.strip():
            return Record(n, offset, bad=EMPTY, detail="text is empty or whitespace")
        return Record(n, offset, data=data, text=text)

    def _jsonl(self, lines) -> Iterator[Record]:
        for start, line, size in lines:
            if start >= self.end:
                return
            if start < self.start:
                continue
            n = self.lines
            if size > self.max_doc_bytes:
                yield Record(n, start, bad=TOO_LONG, detail=f"line: {self._too_long(size)}")
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
            yield Record(n, start, data=data, text=text)

    def _txt(self, lines, at_doc_start: bool) -> Iterator[Record]:
        """Documents are runs of non-blank lines; `at_doc_start` says whether the previous
        line was blank (or there is none)."""
        prev_blank, doc, doc_start, doc_line, size = at_doc_start, None, 0, 0, 0
        for start, line, line_size in lines:
            blank = line_size <= self.max_doc_bytes and not line.strip()
            if doc is not None and blank:
                yield self._txt_record(doc, doc_start, doc_line, size)
                doc = None
            elif doc is None and not blank and prev_blank:
                if start >= self.end:
                    return
                if start >= self.start:
                    doc, doc_start, doc_line, size = [], start, self.lines, 0
            if doc is not None and not blank:
                size += line_size
                if size <= self.max_doc_bytes:  # past the limit: counted, not kept
                    doc.append(line[:-2] + b"\n" if line.endswith(b"\r\n") else line)
            prev_blank = blank
        if doc is not None:
            yield self._txt_record(doc, doc_start, doc_line, size)

    def _txt_record(self, doc, start, line, size) -> Record:
        if size > self.max_doc_bytes:
            return Record(line, start, bad=TOO_LONG, detail=self._too_long(size))
        data = b"".join(doc)
        return self._document(line, start, data[:-1] if data.endswith(b"\n") else data)

    def _parquet(self) -> Iterator[Record]:
        """Rows of row groups [start, end), PARQUET_BATCH_ROWS at a time, text column only."""
        import pyarrow as pa  # here: --help and the other formats never load pyarrow
        import pyarrow.parquet as pq

        try:  # page checksums, where the writer stored them, are verified
            pf = pq.ParquetFile(self.path, buffer_size=1 << 20, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as e:
            yield Record(self.lines + 1, self.lines + 1, bad=UNREADABLE, detail=f"{type(e).__name__}: {e}")
            return
        for g in range(int(self.start), int(min(self.end, pf.num_row_groups))):
            first, rows = self.lines, pf.metadata.row_group(g).num_rows
            try:
                yield from self._row_group(pf, g)
            except (OSError, pa.ArrowException) as e:  # a damaged page: skip the rest of this group
                yield Record(self.lines + 1, self.lines + 1, bad=CORRUPT_ROW_GROUP,
                             detail=f"row group {g} (rows {first + 1}-{first + rows} of the chunk; those before "
                                    f"this one were kept): {type(e).__name__}: {e}")
                self.lines = first + rows

    def _row_group(self, pf, g: int) -> Iterator[Record]:
        import pyarrow as pa

        for batch in pf.iter_batches(PARQUET_BATCH_ROWS, row_groups=[g], columns=[self.text_key], use_threads=False):
            # large_binary: the raw UTF-8 bytes (zero-copy), decoded and checked per row below
            for data in batch.column(0).cast(pa.large_binary()).to_pylist():
                self.lines += 1
                n = self.lines
                if data is None:
                    yield Record(n, n, bad=MISSING_TEXT, detail=f"{self.text_key!r} is null")
                    continue
                self._text_bytes += len(data)
                if len(data) > self.max_doc_bytes:
                    yield Record(n, n, bad=TOO_LONG, detail=self._too_long(len(data)))
                    continue
                yield self._document(n, n, data)
