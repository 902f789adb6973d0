"""tools/gpu_check.py: every stage of the GPU check runs on the CPU with tiny configs (--smoke), in
order of value under one deadline; a stage that times out costs only itself (the others' numbers
and the summary stay, every row of the attention benchmark is on disk the moment it is
measured); at most 8 files come back; --plan runs nothing; and the offline install of the GPU
image (wheels into a --target directory, no index, no dependencies) runs the check."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools import gpu_check
from tools.bench.attention import add_ratios
from tools.gpu_check import STAGES, main
from tools.jobs import ROOT

ALIBI_ROWS = {"sdpa-ref-fp32bias", "alibi-flex", "alibi-flex-flash", "alibi-fa2", "sdpa-bias"}


def out_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_gpu_check_smoke_keeps_every_number_when_one_stage_times_out(tmp_path, capsys, monkeypatch):
    # run from inside a process group or a SLURM step: every stage is still a process of its own
    for name, value in dict(RANK="1", WORLD_SIZE="2", MASTER_PORT="1", SLURM_PROCID="3", SLURM_NTASKS="8").items():
        monkeypatch.setenv(name, value)
    assert main(["--smoke", "--out", str(tmp_path), "--limit", "tests=0.5"]) == 1  # the forced time-out
    files = out_files(tmp_path)
    assert len(files) <= 8 and all(p.parent == tmp_path for p in files), files  # what a GPU slot returns
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert report["smoke"] and list(stages) == list(STAGES) == ["train_alibi", "train_sinusoidal", "tests", "attention"]
    assert stages["tests"]["status"] == "timeout (0.5 s)"
    assert stages["tests"]["result"]["summary"] == "no pytest result"
    assert all(stages[n]["status"] == "ok" for n in STAGES if n != "tests"), {n: s.get("log_tail") for n, s in stages.items()}
    assert report["versions"]["torch"] and report["deadline_s"] == 540

    (alibi,), (sinus,) = (stages[n]["result"]["results"] for n in ("train_alibi", "train_sinusoidal"))
    assert (alibi["position"], alibi["seq_length"]) == ("alibi", 64)
    assert (sinus["position"], sinus["seq_length"]) == ("sinusoidal", 128)
    assert alibi["tokens_per_step"] == sinus["tokens_per_step"] == 512
    for r in (alibi, sinus):
        assert r["world_size"] == 1 and r["precision"] == "fp32" and math.isfinite(r["loss"])
        assert r["tokens_per_s"] == pytest.approx(512 / r["step_time_s"]) and r["peak_mem_gb"] > 0
    comparison = report["alibi_vs_sinusoidal"]  # its arithmetic: test_paper_comparison_is_alibi_over_sinusoidal
    assert comparison["tokens_per_step"] == [512, 512] and min(comparison["speed_ratio"], comparison["memory_ratio"]) > 0

    # the attention benchmark: the model's strided layout, every variant computes the same attention;
    # flex-flash and fa2 cannot run on a CPU: listed with the reason, the other kernels measured
    rows = stages["attention"]["result"]["rows"]
    measured = {"alibi-flex", "sinusoidal-flex", "sdpa-bias", "sdpa-ref-fp32bias", "sdpa-flash-nobias",
                "sdpa-cudnn-nobias", "t5-flex", "t5-sdpa-ref", "kerple-flex", "kerple-sdpa-ref"}
    skipped = {"alibi-flex-flash", "sinusoidal-flex-flash", "alibi-fa2", "sinusoidal-fa2"}
    assert {(r["variant"], r["L"]) for r in rows} == {(n, L) for n in measured | skipped for L in (64, 128)}
    for r in rows:
        assert r["alibi"] == (r["variant"] in ALIBI_ROWS), r  # T5 and KERPLE rows are no ALiBi
        if r["variant"] in skipped:
            assert r["skipped"].startswith("needs a CUDA GPU") and "ms" not in r, r
            continue
        assert r["layout"] == "model" and "error" not in r, r
        assert r["ms"] > 0 and math.isfinite(r["tflops"]) and r["tflops"] > 0
        assert r["max_abs_diff_vs_ref"] < 1e-5, r  # fp32 on CPU
    for L in (64, 128):  # the ceiling is the fastest no-bias variant (the ratios: test_summary_names_only_...)
        timed = [r for r in rows if r["L"] == L and r["method"] == "none" and r["mode"] == "fwd+bwd" and "ms" in r]
        assert min(r["x_ceiling"] for r in timed) == 1.0 and all(r["x_ceiling"] >= 1.0 for r in timed)

    out = capsys.readouterr().out.rstrip().splitlines()
    summary = (tmp_path / "summary.txt").read_text().rstrip().splitlines()
    assert out[-1].startswith("wrote ") and out[-len(summary) - 1:-1] == summary  # the summary is printed last
    assert summary[0].startswith("summary") and [line.split()[0] for line in summary[1:5]] == list(STAGES)
    assert "ALiBi L vs sinusoidal 2L at 512 tokens/step" in summary[5]
    assert "not run here: fa2, flex-flash" in summary[4]
    log = (tmp_path / "gpu_check.log").read_text()
    assert all(f"===== {n} (limit" in log for n in STAGES)  # every stage's output, in one file


@pytest.mark.slow
def test_attention_rows_are_on_disk_the_moment_they_are_measured(tmp_path):
    """Kill the attention benchmark after a few rows: its JSON holds exactly those rows, numbers included."""
    out = tmp_path / "attention.json"
    proc = subprocess.Popen([sys.executable, "-m", "tools.bench.attention", "--smoke", "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    rows = []
    try:
        while len(rows) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if out.exists():
                rows = json.loads(out.read_text())["rows"]  # written by rename: never half a file
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(rows) >= 3, "the benchmark wrote fewer than 3 rows before it ended"
    kept = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in kept[:3]] == ["sdpa-ref-fp32bias", "sdpa-flash-nobias", "alibi-flex"]
    assert all(r["ms"] > 0 for r in kept[:3]) and kept[2]["max_abs_diff_vs_ref"] < 1e-5


def test_plan_prints_stages_limits_and_total_and_runs_nothing(tmp_path, capsys):
    assert main(["--plan", "--out", str(tmp_path / "never"), "--limit", "tests=300"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines[1:5]] == [
        ["train_alibi", "200", "110"], ["train_sinusoidal", "160", "90"], ["tests", "300", "150"],
        ["attention", "160", "120"]]
    assert lines[5].startswith("expected total 470 s; every limit reached: 820 s; global deadline 540 s")
    assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit):
        main(["--plan", "--limit", "test=300"])
    assert "--limit 'test=300': want STAGE=SECONDS with STAGE one of train_alibi" in capsys.readouterr().err


def test_one_deadline_cuts_the_stage_that_reaches_it_and_skips_the_rest(tmp_path, monkeypatch, capsys):
    """Each stage here uses its whole limit (cold compiles): the third is cut to what is left of
    540 s less the summary's 15 s, the fourth never starts; the summary is still written. A
    missing module is said first."""
    clock = [0.0]
    given = {}

    def run_stage(name, argv, limit_s, out, env):  # a stage that takes its whole time limit
        given[name] = limit_s
        clock[0] += limit_s
        return {"stage": name, "status": f"timeout ({limit_s:.3g} s)", "seconds": limit_s}

    monkeypatch.setattr(gpu_check, "run_stage", run_stage)
    monkeypatch.setitem(gpu_check.NEEDS, "no_such_module_here", "deepspeed")  # as einops on a bare image
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(monotonic=lambda: clock[0], strftime=time.strftime))
    assert main(["--smoke", "--out", str(tmp_path)]) == 1
    assert given == {"train_alibi": 200, "train_sinusoidal": 160, "tests": 540 - 15 - 360}
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["missing"] == {"no_such_module_here": "deepspeed"}
    assert "not installed: no_such_module_here (for deepspeed)" in capsys.readouterr().out
    stages = report["stages"]
    assert stages["attention"]["status"] == "skipped (deadline)"
    assert (tmp_path / "summary.txt").read_text().splitlines()[4].split()[:3] == ["attention", "skipped", "(deadline)"]


def test_summary_names_only_an_alibi_kernel_the_fastest_alibi():
    # t5-flex is fastest here; "fastest ALiBi" must still name an ALiBi kernel
    def row(variant, method, ms):
        return dict(variant=variant, L=1024, method=method, alibi=method == "alibi", mode="fwd+bwd", ms=ms)

    rows = [row("sdpa-flash-nobias", "none", 1.0), row("sinusoidal-flex", "none", 1.1), row("alibi-flex", "alibi", 1.3),
            row("t5-flex", "t5", 1.2), row("kerple-flex", "kerple", 1.25), row("sdpa-bias", "alibi", 3.0),
            dict(variant="alibi-flex-flash", L=1024, method="alibi", alibi=True, skipped="needs torch >= 2.13")]
    add_ratios(rows)
    ratios = {r["variant"]: (r.get("x_ceiling"), r.get("x_family")) for r in rows}
    assert ratios == {  # time over the fastest no-bias time (1.0 ms); over the same kernel's no-bias twin
        "sdpa-flash-nobias": (1.0, None), "sinusoidal-flex": (pytest.approx(1.1), None),
        "alibi-flex": (pytest.approx(1.3), pytest.approx(1.3 / 1.1)),
        "t5-flex": (pytest.approx(1.2), pytest.approx(1.2 / 1.1)),
        "kerple-flex": (pytest.approx(1.25), pytest.approx(1.25 / 1.1)), "sdpa-bias": (3.0, None),
        "alibi-flex-flash": (None, None)}
    line = gpu_check.describe({"stage": "attention", "result": {"rows": rows}})
    assert line == ("7 rows; L=1024: fastest ALiBi alibi-flex 1.30x the ceiling, 1.18x its no-bias twin; "
                    "not run here: flex-flash (reasons in attention.json)")


def test_paper_comparison_is_alibi_over_sinusoidal():
    def record(position, tokens_per_s, peak):
        result = dict(position=position, tokens_per_step=512, tokens_per_s=tokens_per_s, peak_mem_gb=peak,
                      attention_kernel="sdpa")
        return {"stage": f"train_{position}", "status": "ok", "seconds": 1.0, "result": {"results": [result]}}

    records = {"train_alibi": record("alibi", 1100.0, 8.9), "train_sinusoidal": record("sinusoidal", 1000.0, 10.0)}
    assert gpu_check.paper_comparison(records) == {"tokens_per_step": [512, 512], "speed_ratio": pytest.approx(1.1),
                                                   "memory_ratio": pytest.approx(0.89), "kernels": ["sdpa", "sdpa"]}
    assert gpu_check.paper_comparison({"train_alibi": records["train_alibi"]}) is None  # one side missing


@pytest.mark.slow
def test_offline_install_into_a_target_dir_runs_the_check(tmp_path):
    """The GPU image's install path, rehearsed: a folder of wheels installed with --no-index
    --no-deps --target (nothing from an index, the image's torch untouched), then gpu_check --smoke
    from it. The wheel here is this project's own (its dependencies are installed on this machine);
    the checkout beside it has no Python package but tools/, so pretrain comes from the target dir."""
    wheels, target, checkout = tmp_path / "wheels", tmp_path / "site", tmp_path / "checkout"
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    for name in ("pretrain", "data_prep", "tools"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(source)],
                   check=True, cwd=tmp_path, timeout=600)
    subprocess.run([*pip, "install", "--no-index", "--no-deps", "--no-compile", "--target", str(target),
                    *map(str, wheels.glob("*.whl"))], check=True, timeout=600)
    assert (target / "pretrain" / "engine.py").exists() and not (target / "torch").exists()
    # the checkout: configs, tests and the tools (the tool finds the configs next to itself), no pretrain/
    checkout.mkdir()
    shutil.copytree(ROOT / "tools", checkout / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("configs", "tests"):
        (checkout / name).symlink_to(ROOT / name)
    shutil.copy(ROOT / "pyproject.toml", checkout)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import pretrain.engine; print(pretrain.engine.__file__)"],
                           cwd=checkout, env=env, capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(target), where
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--smoke", "--stages", "train_alibi",
                           "--out", str(out)], cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())["stages"]["train_alibi"]
    assert record["status"] == "ok" and record["result"]["results"][0]["tokens_per_s"] > 0


def test_a_cut_tests_stage_still_counts_the_tests_it_ran():
    # pytest -v lines as the tests stage writes them into the live log (from a smoke run)
    log = ("tests/model/test_model_flex.py::test_flex_score_mod_matches_naive_cpu[alibi-causal] PASSED [  6%]\n"
           "tests/model/test_model_flex.py::test_kernel_matches_references_gpu_bf16_fwd_bwd[flex-causal] FAILED [ 13%]\n"
           "tests/model/test_model_flex.py::test_flex_trains_captured_tensors_on_this_gpu PASSED [ 20%]\n")
    assert gpu_check.pytest_outcome(log) == "2 passed, 1 failed before it stopped"
    done = log + "=============== 2 passed, 1 failed, 19 deselected, 15 warnings in 24.66s ================\n"
    assert gpu_check.pytest_outcome(done) == "2 passed, 1 failed, 19 deselected, 15 warnings in 24.66s"
    assert gpu_check.pytest_outcome("ImportError: no module named torch\n") == "no pytest result"


def test_the_log_is_cut_to_its_tail_under_the_return_limit(tmp_path):
    log = tmp_path / "gpu_check.log"
    log.write_bytes(b"".join(b"line %05d\n" % i for i in range(1000)))  # 11,000 bytes
    gpu_check.cap_log(log, cap=1100)
    lines = log.read_bytes().splitlines()
    assert lines[0].startswith(b"[... earlier output cut") and lines[-100:] == [b"line %05d" % i for i in range(900, 1000)]
    assert log.stat().st_size < 1100 + 100
