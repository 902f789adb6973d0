"""No silent wrong results from the tools (issue 18, the tools' part): evaluation refuses data made
with another tokenizer than the model's (ours and HF exports); convert_to_hf never reports a write
it did not do, never mixes a new export with stale files and never writes into a run directory;
the HF export takes the lengths users try; eval evaluates every --checkpoint given and checks
--output before the compute; compare_runs tells runs of one folder name apart, reads a relative
--data and leaves out a record without a loss. The fast tests need no trained model; the others
use the session's quick main job (tests/tools/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.compare_runs import main as compare_main

from helpers import megatron_logits

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, cwd=REPO,
                          env=ENV, timeout=300)


def one_line_error(out: subprocess.CompletedProcess, script: str) -> str:
    """stderr of a refused command: exactly one line, `script: error: ...` (warnings of the libraries aside)."""
    lines = [x for x in out.stderr.splitlines() if x.startswith(f"{script}: error:")]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


# ------------------------------------------------------------------ eval command line (fast)


def test_eval_evaluates_every_repeated_checkpoint_flag():
    from tools.eval_extrapolation import parse_args

    args = parse_args(["--checkpoint", "A", "--checkpoint", "B", "C", "--data", "D", "--lengths", "64", "--output", "O"])
    assert args.checkpoint == ["A", "B", "C"]  # argparse's default (store) kept only the last flag's


def test_eval_refuses_an_output_file_before_reading_anything(tmp_path):
    from tools.eval_extrapolation import UsageError, main

    (tmp_path / "run").mkdir()
    (tmp_path / "results").write_text("keep me\n")
    with pytest.raises(UsageError, match="--output .*results is a file: give a directory"):
        main(["--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "no_data"), "--lengths", "64",
              "--output", str(tmp_path / "results")])  # no data, no checkpoint: refused before either is read
    assert (tmp_path / "results").read_text() == "keep me\n"


# ------------------------------------------------------------------ compare_runs (fast)


def write_metrics(path: Path, loss_scale: float = 1.0, null_loss_at: int | None = None) -> None:
    path.mkdir(parents=True)
    lines = []
    for step in range(2, 11, 2):
        loss = None if step == null_loss_at else loss_scale * (5.0 - 0.1 * step)
        lines.append({"step": step, "loss": loss, "step_time_s": 36.0, "tokens_per_s": 1000.0,
                      "tokens_per_s_per_gpu": 1000.0, "peak_mem_gb": 1.5})
    lines.append({"step": 10, "kind": "validation", "val/ppl_at_128": 20.0 * loss_scale})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_runs_of_one_folder_name_keep_a_row_and_a_curve_each(tmp_path, monkeypatch):
    import tools.plotting

    write_metrics(tmp_path / "lr1e-3" / "base", loss_scale=1.0)
    write_metrics(tmp_path / "lr1e-4" / "base", loss_scale=1.1)
    curves = {}
    real = tools.plotting.plot_curves
    monkeypatch.setattr(tools.plotting, "plot_curves", lambda c, *a, **k: (curves.update(c), real(c, *a, **k)))
    out = tmp_path / "out"
    compare_main(["runs", str(tmp_path / "lr1e-3" / "base"), str(tmp_path / "lr1e-4" / "base"), "--eval-length", "128",
                  "--output", str(out)])
    rows = json.loads((out / "runs.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["lr1e-3/base", "lr1e-4/base"]
    assert [r["final_loss"] for r in rows] == [pytest.approx(4.0), pytest.approx(4.4)]
    assert sorted(curves) == ["lr1e-3/base", "lr1e-4/base"]  # one curve each (a dict by name had dropped one)
    with pytest.raises(ValueError, match="are the same run: give each run once"):
        compare_main(["runs", str(tmp_path / "lr1e-3" / "base"), str(tmp_path / "lr1e-3" / "base" / "metrics.jsonl"),
                      "--output", str(out)])


def test_a_record_with_a_null_loss_is_left_out_with_a_warning(tmp_path, capsys):
    write_metrics(tmp_path / "a", null_loss_at=10)
    write_metrics(tmp_path / "b")
    out = tmp_path / "out"
    compare_main(["runs", str(tmp_path / "a"), str(tmp_path / "b"), "--eval-length", "128", "--output", str(out)])
    rows = json.loads((out / "runs.json").read_text())["rows"]
    assert (rows[0]["steps"], rows[0]["final_loss"]) == (8, pytest.approx(4.2))  # step 10's record had no loss
    assert "1 training record(s) without a numeric loss" in capsys.readouterr().out


def test_bench_runs_its_trainers_on_the_data_a_relative_path_names(tmp_path, monkeypatch):
    """The trainers run in the repository root: a relative --data must be resolved where the user is."""
    import tools.bench.compare as bench

    from data_prep.manifest import FORMAT_VERSION

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    seen = []

    class Stop(Exception):
        pass

    def fake_run(cmd, cwd=None, **kw):
        seen.append((cmd, cwd))
        raise Stop

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Stop):
        compare_main(["bench", "--config", str(REPO / "configs" / "tiny_alibi.yaml"), "--data", "data",
                      "--output", "out", "--steps", "2"])
    (cmd, cwd), = seen
    data, run_dir = cmd[cmd.index("--data") + 1], cmd[cmd.index("--run-dir") + 1]
    assert (Path(cwd) / data).resolve() == (tmp_path / "data").resolve()
    assert (Path(cwd) / run_dir).resolve() == (tmp_path / "out" / "tiny_alibi@64").resolve()


# ------------------------------------------------------------------ on the quick main job's outputs


@pytest.fixture(scope="module")
def other_data(quick_job, tmp_path_factory) -> Path:
    """The quick job's corpus preprocessed with another (smaller) tokenizer."""
    from data_prep.pipeline import preprocess
    from data_prep.train_tokenizer import train_tokenizer

    out, _ = quick_job
    d = tmp_path_factory.mktemp("other_tokenizer")
    corpus = sorted((out / "corpus").glob("default.*"))
    tok = train_tokenizer(corpus, 600, d / "tok", sample_mb=0.3)
    preprocess(corpus, tok, d / "data", valid_fraction=0.05, quiet=True, eval_length=64)
    return d / "data"


@pytest.mark.slow
def test_eval_refuses_data_made_with_another_tokenizer(quick_job, other_data, tmp_path):
    from data_prep.manifest import load_manifest

    out, _ = quick_job
    ours, hf = out / "runs" / "alibi", out / "hf" / "alibi"
    mine, other = load_manifest(out / "data")["tokenizer"], load_manifest(other_data)["tokenizer"]
    assert mine["sha256"] != other["sha256"] and other["vocab_size"] <= mine["vocab_size"]  # ids in range: no crash
    for model in (ours, ours / "checkpoints" / "step_00000016", hf):
        res = cli("tools/eval_extrapolation.py", "--checkpoint", str(model), "--data", str(other_data),
                  "--lengths", "64", "--output", str(tmp_path / "eval"))
        line = one_line_error(res, "eval_extrapolation.py")
        assert f"was tokenized with {other['path']} (sha256 {other['sha256'][:12]}) but {model} was trained " \
               f"with {mine['path']} (sha256 {mine['sha256'][:12]})" in line
        assert "ppl=" not in res.stdout
    assert not (tmp_path / "eval" / "results.json").exists()
    from tools.eval_extrapolation import UsageError, check_tokenizers

    check_tokenizers([ours, hf], out / "data", load_manifest(out / "data"))  # the right data passes
    unrecorded = tmp_path / "hf_unrecorded"  # an HF model that does not say its tokenizer
    shutil.copytree(hf, unrecorded)
    cfg = json.loads((unrecorded / "config.json").read_text())
    del cfg["tokenizer_sha256"]
    (unrecorded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=f'records no tokenizer_sha256.*add "tokenizer_sha256": "{other["sha256"]}"'):
        check_tokenizers([unrecorded], other_data, load_manifest(other_data))


@pytest.mark.slow
def test_convert_refuses_a_file_a_run_directory_and_an_export_without_overwrite(quick_job, tmp_path):
    from tools.convert_to_hf import convert

    out, _ = quick_job
    run = out / "runs" / "alibi"
    target = tmp_path / "model.bin"
    target.write_text("not an export\n")
    res = cli("tools/convert_to_hf.py", "--checkpoint", str(run), "--output", str(target))
    assert "--output" in one_line_error(res, "convert_to_hf.py") and "is a file" in res.stderr
    assert "wrote" not in res.stdout and target.read_text() == "not an export\n"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is a directory with files in it and not a Hugging Face export"):
            convert(run, run, overwrite=overwrite)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    res = cli("tools/convert_to_hf.py", "--checkpoint", str(run), "--output", str(tmp_path / "x"),
              "--max-positions", "-5")
    assert res.returncode == 2 and "--max-positions: '-5' is not a positive integer" in res.stderr
    with pytest.raises(ValueError, match="--max-positions 32 is below the training length 64"):
        convert(run, tmp_path / "x", max_positions=32)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_convert_into_an_existing_export_replaces_it_whole(quick_job, tmp_path):
    from tools.convert_to_hf import convert

    out, _ = quick_job
    run = out / "runs" / "alibi"
    fresh = convert(run, tmp_path / "fresh", max_positions=128)
    hf = convert(run, tmp_path / "hf", max_positions=128)
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of a bigger model")
    (hf / "model.safetensors.index.json").write_text('{"weight_map": {}}')  # would be loaded before model.safetensors
    with pytest.raises(ValueError, match="holds an export already: pass --overwrite"):
        convert(run, hf, max_positions=128)
    convert(run, hf, overwrite=True)
    assert sorted(p.name for p in hf.iterdir()) == sorted(p.name for p in fresh.iterdir())
    assert json.loads((hf / "config.json").read_text())["max_seq_len"] == 64 * 64  # the default for ALiBi
    assert json.loads((hf / "tokenizer_config.json").read_text())["model_max_length"] == 64 * 64  # HF warns past it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    assert oct((hf).stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.slow
def test_default_alibi_export_takes_32x_the_training_length(quick_job):
    """ALiBi has no position table: the default export must take the long inputs users try
    (here 32 x L), with logits equal to our model's there."""
    import torch

    from pretrain.checkpoint import load_consolidated
    from pretrain.model import build_model
    from pretrain.parallel import init_model_parallel
    from tools.hf_export import megatron_to_hf

    out, _ = quick_job
    cfg, sd = load_consolidated(out / "runs" / "alibi")
    hf = megatron_to_hf(cfg, sd)
    init_model_parallel(tp=1)
    ours = build_model(cfg.model).eval()
    ours.load_state_dict(sd, strict=False)
    n = 32 * cfg.model.seq_length
    x = torch.randint(0, cfg.model.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, megatron_logits(ours, x), rtol=0, atol=1e-4)
