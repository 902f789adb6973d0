"""tools/gpu_check.py --smoke: every stage of the GPU check runs on the CPU with tiny configs
(the gpu tests' CPU counterparts, both training benchmarks at equal tokens per step, the
attention benchmark), the summary is printed last and the JSON holds each stage's numbers."""

import json
import math
import re

import pytest

from tools.gpu_check import STAGES, main

pytestmark = pytest.mark.slow


def test_gpu_check_smoke(tmp_path, capsys, monkeypatch):
    # run from inside a process group or a SLURM step: every stage is still a process of its own
    for name, value in dict(RANK="1", WORLD_SIZE="2", MASTER_PORT="1", SLURM_PROCID="3", SLURM_NTASKS="8").items():
        monkeypatch.setenv(name, value)
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert report["smoke"] and list(stages) == list(STAGES)
    assert all(s["status"] == "ok" for s in stages.values()), {n: s.get("log_tail") for n, s in stages.items()}
    assert re.fullmatch(r"\d+ passed, \d+ deselected.*", stages["tests"]["result"]["summary"])

    (alibi,), (sinus,) = (stages[n]["result"]["results"] for n in ("train_alibi", "train_sinusoidal"))
    assert (alibi["position"], alibi["seq_length"]) == ("alibi", 64)
    assert (sinus["position"], sinus["seq_length"]) == ("sinusoidal", 128)
    assert alibi["tokens_per_step"] == sinus["tokens_per_step"] == 512
    for r in (alibi, sinus):
        assert r["world_size"] == 1 and r["precision"] == "fp32" and math.isfinite(r["loss"])
        assert r["tokens_per_s"] == pytest.approx(512 / r["step_time_s"]) and r["peak_mem_gb"] > 0
    comparison = report["alibi_vs_sinusoidal"]
    assert comparison["speed_ratio"] == pytest.approx(alibi["tokens_per_s"] / sinus["tokens_per_s"])
    assert comparison["memory_ratio"] == pytest.approx(alibi["peak_mem_gb"] / sinus["peak_mem_gb"])

    # the attention benchmark: the model's strided layout, every variant computes the same attention
    rows = stages["attention"]["result"]["rows"]
    names = {"alibi-flex", "sinusoidal-flex", "sdpa-bias", "sdpa-ref-fp32bias", "sdpa-flash-nobias",
             "sdpa-cudnn-nobias", "t5-flex", "t5-sdpa-ref", "kerple-flex", "kerple-sdpa-ref"}  # flex-flash
    # and fa2 need a GPU and their packages
    assert {(r["variant"], r["L"]) for r in rows} == {(n, L) for n in names for L in (64, 128)}
    for r in rows:
        assert r["layout"] == "model" and "error" not in r, r
        assert r["ms"] > 0 and math.isfinite(r["tflops"]) and r["tflops"] > 0
        assert r["max_abs_diff_vs_ref"] < 1e-5, r  # fp32 on CPU
    for L in (64, 128):  # the ceiling is the fastest no-bias variant; x fam is ALiBi over its no-bias twin
        timed = [r for r in rows if r["L"] == L and not r["alibi"] and r["mode"] == "fwd+bwd"]
        assert min(r["x_ceiling"] for r in timed) == 1.0 and all(r["x_ceiling"] >= 1.0 for r in timed)
        flex, nobias = (next(r for r in rows if r["L"] == L and r["variant"] == v)
                        for v in ("alibi-flex", "sinusoidal-flex"))
        assert flex["x_family"] == flex["ms"] / nobias["ms"]

    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("wrote ") and "ALiBi L vs sinusoidal 2L at 512 tokens/step" in out[-2]
    assert out[-7].startswith("summary") and [line.split()[0] for line in out[-6:-2]] == list(STAGES)  # last
