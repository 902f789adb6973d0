"""The preprocess benchmark runs end to end (tiny input) and reports what docs/benchmarks.md uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_preprocess_smoke(corpus, tokenizer_model, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "tools/bench/preprocess.py", "--input", str(corpus[0]), "--tokenizer",
                        str(tokenizer_model), "--workers", "1", "--work-dir", str(tmp_path / "w"), "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["results"][0]
    p, c = res["preprocess"], res["ceiling"]
    assert p["bytes"] == corpus[0].stat().st_size and p["tokens"] > 0 and p["peak_rss_mb"] > 0
    assert c["mb_per_s"] > 0 and 0 < p["pct_of_ceiling"] and 0 <= p["coordinator_cpu_share"] <= 1
    assert "% ceil" in r.stdout
