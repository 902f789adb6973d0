"""Every kind of bad input is counted by reason with file:line, processing continues, and
--strict turns it into an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    (d / "mixed.txt").write_bytes(b"fine text\n\nbad \xff\xfe bytes\nsecond line\n\nalso fine\n")
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
    assert any(ex["file"].endswith("mixed.txt") and ex["line"] == 3 for ex in rej["invalid_utf8"]["examples"])
    assert rej["truncated_stream"]["count"] == 1
    assert rej["unreadable_file"]["count"] == 1 and rej["unreadable_file"]["examples"][0]["file"].endswith("unreadable.jsonl")
    docs = read_split(tmp_path / "out", "train")
    want = reference_tokens(tokenizer_model, GOOD + ["fine text", "also fine"] + GOOD[:9], 2)
    assert docs == want  # all good ones kept, in order; the truncated frame's doc dropped


def test_strict_makes_bad_input_an_error(tmp_path, tokenizer_model):
    inputs, _ = make_inputs(tmp_path)
    with pytest.raises(StrictError, match="malformed_json"):
        preprocess(inputs[:1], tokenizer_model, tmp_path / "out", workers=1, strict=True, quiet=True)
    cli = [sys.executable, "data_prep/preprocess.py", "--input", str(inputs[1]), "--tokenizer",
           str(tokenizer_model), "--output-dir", str(tmp_path / "out2"), "--quiet"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    r = subprocess.run(cli, capture_output=True, text=True, cwd=repo)
    assert r.returncode == 0 and "invalid_utf8" in r.stdout and "mixed.txt:3" in r.stdout  # summary table
    r = subprocess.run(cli + ["--strict"], capture_output=True, text=True, cwd=repo)  # same dir, now strict
    assert r.returncode == 1 and "invalid_utf8" in r.stderr and "mixed.txt:3" in r.stderr
