"""tools/bench/attention.py runs (CPU smoke mode) and its variants agree with each other."""

import json
import math

from tools.bench.attention import main


def test_bench_attention_smoke(tmp_path):
    out = tmp_path / "bench.json"
    rows = main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["smoke"] and data["rows"] == rows
    names = {"alibi-flex", "sinusoidal-flex", "sdpa-bias", "sdpa-ref-fp32bias", "sdpa-flash-nobias",
             "t5-flex", "t5-sdpa-ref", "kerple-flex", "kerple-sdpa-ref"}
    assert {(r["variant"], r["L"]) for r in rows} == {(n, L) for n in names for L in (64, 128)}
    for r in rows:
        assert r["ms"] > 0 and math.isfinite(r["tflops"]) and r["tflops"] > 0
        assert r["max_abs_diff_vs_ref"] < 1e-5, r  # fp32 on CPU: every kernel computes the same attention
