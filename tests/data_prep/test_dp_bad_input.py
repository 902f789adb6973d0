"""Every kind of bad input is counted by reason with file:line, processing continues, and
--strict turns it into an error."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
import zlib

import pytest
import zstandard

from data_prep.preprocess import preprocess
from data_prep.worker import StrictError

from .conftest import reference_tokens
from .test_dp_preprocess import read_split

GOOD = [f"good document number {i} with some words" for i in range(40)]


def make_inputs(d):
    lines = [json.dumps({"text": t}).encode() for t in GOOD]
    bad = {  # line number (1-based) -> (reason, raw line)
        3: ("malformed_json", b'{"text": "unterminated'),
        7: ("missing_text", json.dumps({"body": "x"}).encode()),
        11: ("non_string_text", json.dumps({"text": 42}).encode()),
        15: ("invalid_utf8", b'{"text": "caf\xe9"}'),
        19: ("empty_document", json.dumps({"text": "  \n "}).encode()),
        23: ("too_long", json.dumps({"text": "x" * 5000}).encode()),
        27: ("malformed_json", b"[1, 2]"),
        31: ("invalid_utf8", b'{"text": "\\ud800"}'),
    }
    for n in sorted(bad):
        lines.insert(n - 1, bad[n][1])
    (d / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (d / "mixed.txt").write_bytes(b"fine text\n\nbad \xff\xfe bytes\nsecond line\n\nalso fine\n\n"
                                  + b"y" * 3000 + b"\n" + b"z" * 5000 + b"\n")  # a 8,002-byte document at line 8
    zs = b"".join(zstandard.ZstdCompressor().compress(json.dumps({"text": t}).encode() + b"\n") for t in GOOD[:10])
    (d / "cut.jsonl.zst").write_bytes(zs[:-7])  # last frame truncated
    os.symlink(d / "gone.jsonl", d / "unreadable.jsonl")  # cannot be opened (even by root)
    return [d / "mixed.jsonl", d / "mixed.txt", d / "cut.jsonl.zst", d / "unreadable.jsonl"], bad


def test_bad_records_counted_with_file_and_line(tmp_path, tokenizer_model):
    inputs, bad = make_inputs(tmp_path)
    m = preprocess(inputs, tokenizer_model, tmp_path / "out", workers=1, valid_fraction=0.0,
                   chunk_mb=0.0005, max_doc_mb=0.004, quiet=True)  # 512 B chunks: line numbers cross chunks
    rej = m["rejected"]
    expect = {}
    for n, (reason, _) in bad.items():
        expect.setdefault(reason, []).append(n)
    for reason, lines in expect.items():
        got = [ex["line"] for ex in rej[reason]["examples"] if ex["file"].endswith("mixed.jsonl")]
        assert got == lines, reason
    assert rej["invalid_utf8"]["count"] == 3  # two JSON lines + one .txt document
    # too_long states the real size: the JSON line's, the .txt document's (all its lines)
    assert [(ex["line"], ex["detail"].split(" >")[0]) for ex in rej["too_long"]["examples"]] == \
        [(23, f"line: document of {len(json.dumps({'text': 'x' * 5000})) + 1:,} bytes"), (8, "document of 8,002 bytes")]
    assert any(ex["file"].endswith("mixed.txt") and ex["line"] == 3 for ex in rej["invalid_utf8"]["examples"])
    assert rej["truncated_stream"]["count"] == 1
    assert rej["unreadable_file"]["count"] == 1 and rej["unreadable_file"]["examples"][0]["file"].endswith("unreadable.jsonl")
    docs = read_split(tmp_path / "out", "train")  # the truncated zstd frame's document is dropped
    want = reference_tokens(tokenizer_model, GOOD + ["fine text", "also fine"] + GOOD[:9], 2)
    assert docs == want  # all good ones kept, in order; the truncated frame's doc dropped


def test_strict_makes_bad_input_an_error(tmp_path, tokenizer_model):
    inputs, _ = make_inputs(tmp_path)
    with pytest.raises(StrictError, match="malformed_json"):
        preprocess(inputs[:1], tokenizer_model, tmp_path / "out", workers=1, strict=True, quiet=True)
    cli = [sys.executable, "data_prep/preprocess.py", "--input", str(inputs[1]), "--tokenizer",
           str(tokenizer_model), "--output-dir", str(tmp_path / "out2"), "--valid-fraction", "0", "--quiet"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    r = subprocess.run(cli, capture_output=True, text=True, cwd=repo)
    assert r.returncode == 0 and "invalid_utf8" in r.stdout and "mixed.txt:3" in r.stdout  # summary table
    r = subprocess.run(cli + ["--strict"], capture_output=True, text=True, cwd=repo)  # same dir, now strict
    assert r.returncode == 1 and "invalid_utf8" in r.stderr and "mixed.txt:3" in r.stderr


LINES = [json.dumps({"text": f"line {i}: " + " ".join(f"w{(i * 7919 + j * 104729) % 100003}" for j in range(60))})
         for i in range(540)]  # ~240 kB that compresses only ~3x: several chunks, several bz2/zstd blocks
PACK = {"gz": gzip.compress, "xz": lzma.compress, "zst": zstandard.ZstdCompressor().compress,
        "bz2": lambda b: bz2.compress(b, compresslevel=1)}  # 100 kB bz2 blocks
UNPACK = {"gz": lambda: zlib.decompressobj(wbits=31), "xz": lzma.LZMADecompressor, "bz2": bz2.BZ2Decompressor,
          "zst": lambda: zstandard.ZstdDecompressor().decompressobj()}


@pytest.mark.parametrize("comp", sorted(PACK))
def test_a_truncated_stream_keeps_every_complete_document(comp, tmp_path, tokenizer_model):
    packed = PACK[comp](("\n".join(LINES) + "\n").encode())
    cut = tmp_path / f"cut.jsonl.{comp}"
    cut.write_bytes(packed[: len(packed) * 9 // 10])  # a download that stopped
    # the reference: what the format's own library decompresses from the cut file
    complete = UNPACK[comp]().decompress(cut.read_bytes()).count(b"\n")
    assert 100 < complete < len(LINES)
    m = preprocess([cut], tokenizer_model, tmp_path / "out", workers=1, valid_fraction=0.0, chunk_mb=0.02, quiet=True)
    assert m["inputs"][0]["chunks"] > 2
    want = [json.loads(line)["text"] for line in LINES[:complete]]
    assert read_split(tmp_path / "out", "train") == reference_tokens(tokenizer_model, want, 2)
    t = m["rejected"]["truncated_stream"]
    assert t["count"] == 1 and t["examples"][0]["line"] == complete + 1  # the line the cut is in
