"""The tools' command lines: --help loads no torch (heavy imports wait until the arguments are
parsed), bad --lengths and same-named models are refused in one line before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def run(script: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, cwd=REPO,
                         env=ENV, timeout=120)
    return out, time.perf_counter() - t0


HEAVY = ("torch", "transformers", "deepspeed", "megatron", "matplotlib", "pyarrow")


@pytest.mark.parametrize("script,args", [
    ("tools/convert_to_hf.py", []), ("tools/eval_extrapolation.py", []), ("tools/compare_runs.py", []),
    ("tools/compare_runs.py", ["runs"]), ("tools/compare_runs.py", ["bench"]), ("pretrain/train.py", []),
    ("tools/main_job.py", []), ("tools/gpu_check.py", []), ("tools/bench/attention.py", []),
    ("tools/bench/train.py", []), ("tools/bench/preprocess.py", []), ("data_prep/preprocess.py", []),
    ("data_prep/train_tokenizer.py", []), ("data_prep/corpus.py", []),
])
def test_help_imports_nothing_heavy(script, args):
    """--help is answered before torch and its kind load (each takes seconds on a busy machine):
    python's own import log of the --help run names none of them."""
    out = subprocess.run([sys.executable, "-X", "importtime", str(REPO / script), *args, "--help"], capture_output=True,
                         text=True, cwd=REPO, env=ENV, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, f"{script} --help imports {heavy[:5]}: import them after parse_args"


EVAL = "tools/eval_extrapolation.py"


@pytest.mark.parametrize("lengths,needle", [
    ("0", "'0' is not a positive integer"), ("-64", "'-64' is not a positive integer"),
    (",", "names no length"), ("512,x", "'x' is not a positive integer"),
])
def test_eval_lengths_are_positive_integers(lengths, needle, tmp_path):
    out, _ = run(EVAL, "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--lengths", lengths,
                 "--output", str(tmp_path / "out"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"eval_extrapolation.py: error: --lengths {lengths!r}") and needle in out.stderr


def test_eval_refuses_two_models_of_one_name(tmp_path):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    out, _ = run(EVAL, "--checkpoint", str(a), str(b), "--data", str(tmp_path), "--lengths", "64",
                 "--output", str(tmp_path / "out"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert f"{a} and {b} would both be named 'run (ours)' in the results: pass --names" in out.stderr


def test_eval_names_a_run_and_its_hf_export_apart(tmp_path):
    from tools.eval_extrapolation import UsageError, model_names

    ours, hf = tmp_path / "runs" / "alibi", tmp_path / "hf" / "alibi"
    ours.mkdir(parents=True)
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps({"model_type": "mpt"}))
    assert model_names([str(ours), str(hf)], None) == ["alibi (ours)", "alibi (HF)"]
    assert model_names([str(ours), str(hf)], "A,B") == ["A", "B"]
    with pytest.raises(UsageError, match="would both be named 'x'"):
        model_names([str(ours), str(hf)], "x,x")
