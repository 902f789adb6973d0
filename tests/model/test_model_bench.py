"""tools/bench/attention.py runs (CPU smoke mode, the model's strided layout) and its variants
agree with each other; the ceiling is the fastest no-bias variant."""

import json
import math

from tools.bench.attention import main


def test_bench_attention_smoke(tmp_path):
    out = tmp_path / "bench.json"
    rows = main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["smoke"] and data["rows"] == rows
    names = {"alibi-flex", "sinusoidal-flex", "sdpa-bias", "sdpa-ref-fp32bias", "sdpa-flash-nobias",
             "sdpa-cudnn-nobias"}  # flex-flash and fa2 need a GPU and their packages
    assert {(r["variant"], r["L"]) for r in rows} == {(n, L) for n in names for L in (64, 128)}
    for r in rows:
        assert r["layout"] == "model" and "error" not in r, r
        assert r["ms"] > 0 and math.isfinite(r["tflops"]) and r["tflops"] > 0
        assert r["max_abs_diff_vs_ref"] < 1e-5, r  # fp32 on CPU: every kernel computes the same attention
    for L in (64, 128):
        timed = [r for r in rows if r["L"] == L and not r["alibi"] and r["mode"] == "fwd+bwd"]
        fastest = min(timed, key=lambda r: r["ms"])
        assert fastest["x_ceiling"] == 1.0 and all(r["x_ceiling"] >= 1.0 for r in timed)
        (flex,) = [r for r in rows if r["L"] == L and r["variant"] == "alibi-flex"]
        (nobias,) = [r for r in rows if r["L"] == L and r["variant"] == "sinusoidal-flex"]
        assert flex["x_family"] == flex["ms"] / nobias["ms"]
