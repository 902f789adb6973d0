"""The preprocess benchmark runs end to end (tiny input, the three encoders) and reports what
docs/benchmarks.md uses."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import reference_docs

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_preprocess_smoke(corpus, tokenizer_model, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = reference_docs(corpus[0])[:12]
    for i, d in enumerate(docs):  # a text set: one document per file, .gz decompressed, binaries skipped
        if i % 2:
            (src / f"d{i:02d}.txt.gz").write_bytes(gzip.compress(d.encode()))
        else:
            (src / f"d{i:02d}.txt").write_text(d)
    (src / "blob.bin").write_bytes(b"\x00\x01binary")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "tools/bench/preprocess.py", "--text-dir", f"docs={src}", "--text-mb", "1",
                        "--tokenizer", str(tokenizer_model), "--workers", "1", "--work-dir", str(tmp_path / "w"),
                        "--json", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bench = json.loads(out.read_text())
    assert [json.loads(line)["text"] for line in (tmp_path / "w" / "docs.jsonl").read_text().splitlines()] == docs
    size = bench["sets"]["docs"]["input_bytes"]
    sp, fast, hf = bench["results"]
    assert [r["preprocess"]["encoder"] for r in (sp, fast, hf)] == ["sentencepiece", "fastokens", "tokenizers"]
    assert fast["identical_to_sentencepiece"] is True and fast["raw"]["encoder"] == "fastokens"
    assert hf["identical_to_sentencepiece"] is True and hf["raw"]["encoder"] == "tokenizers"
    for res in (sp, fast, hf):
        p, c = res["preprocess"], res["ceiling"]
        assert p["bytes"] == size and p["tokens"] > 0 and p["peak_rss_mb"] > 0 and p["coordinator_maxrss_mb"] > 0
        assert c["mb_per_s"] > 0 and p["x_ceiling"] > 0 and 0 <= p["coordinator_cpu_share"] <= 1
    assert "x ceiling" in r.stdout
