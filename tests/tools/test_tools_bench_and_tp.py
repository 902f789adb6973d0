"""compare_runs.py benchmark mode on CPU (tiny configs, ALiBi, T5 and KERPLE at L and sinusoidal at
2L with equal tokens per step), and the HF export of checkpoints trained with tensor or pipeline
parallelism (ALiBi at TP=2 or PP=2, rotary at TP=2; two gloo processes): HF logits equal our
model's, and HF perplexity equals what the parallel model itself logged for validation."""

import json
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_consolidated
from pretrain.data import split_tokens
from pretrain.model import build_model
from pretrain.perplexity import perplexity
from pretrain.rundir import RunDir
from pretrain.parallel import init_model_parallel
from tools.compare_runs import main as compare_main
from tools.hf_export import megatron_to_hf

from helpers import assert_hf_generates_like, launch, megatron_logits, wait_all

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_benchmark_mode_table_json_and_chart(quick_job, tmp_path):
    out, _ = quick_job
    compare_main(["bench", "--config", "configs/tiny_alibi.yaml", "configs/tiny_t5.yaml", "configs/tiny_kerple.yaml",
                  "configs/tiny_sinusoidal.yaml", "--seq-lengths", "64,64,64,128", "--tokens-per-batch", "512",
                  "--steps", "3", "--warmup", "1", "--data", str(out / "data"), "--output", str(tmp_path)])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["attention_kernel"] == "sdpa"  # CPU: the same family for every run, stated
    alibi, t5, kerple, sinus = report["rows"]
    for row, position in ((alibi, "alibi"), (t5, "t5"), (kerple, "kerple")):
        assert (row["position"], row["seq_length"], row["micro_batch"]) == (position, 64, 8)
    assert (sinus["position"], sinus["seq_length"], sinus["micro_batch"]) == ("sinusoidal", 128, 4)
    assert {r["steps_timed"] for r in report["rows"]} == {2}
    for row in report["rows"]:
        assert row["tokens_per_s"] > 0 and row["peak_mem_gb"] > 0 and 0 < row["mfu"] < 1
    ratio = report["ratios"]["tiny_alibi@64 / tiny_sinusoidal@128"]
    assert ratio["tokens_per_s"] == pytest.approx(alibi["tokens_per_s"] / sinus["tokens_per_s"])
    md = (tmp_path / "benchmark.md").read_text()
    assert "attention kernel for all runs: sdpa" in md and "| tiny_alibi@64 / tiny_sinusoidal@128 |" in md
    assert (tmp_path / "benchmark.png").stat().st_size > 10_000
    assert not list(tmp_path.rglob("checkpoints"))  # benchmark runs write none


@pytest.mark.parametrize("layout,position", [("--tp", "alibi"), ("--pp", "alibi"), ("--tp", "rope")])
def test_tp2_or_pp2_trained_checkpoint_exports_exactly(quick_job, tmp_path, layout, position):
    out, _ = quick_job
    run = tmp_path / "run"
    argv = [str(ROOT / "pretrain" / "train.py"), "--config", str(ROOT / "configs" / f"tiny_{position}.yaml"),
            layout, "2", "--run-dir", str(run), "--data", str(out / "data"), "--steps", "3", "--log-interval", "1",
            "train.global_batch_size=4", "train.micro_batch_size=4", "optim.lr=3e-3", "optim.warmup_steps=1",
            "validation.interval=3", "validation.length_multipliers=[1,4]", "validation.tokens=2048",
            "wandb.enabled=false"]
    assert wait_all(launch(argv, 2), timeout=300) == [0, 0]

    cfg, sd = load_consolidated(run)
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel) == ((2, 1) if layout == "--tp" else (1, 2))
    hf = megatron_to_hf(cfg, sd, max_positions=4 * 64).eval()
    init_model_parallel(tp=1)
    ours = build_model(cfg.model).eval()
    ours.load_state_dict(sd, strict=False)
    torch.manual_seed(0)
    for n in (64, 256):
        x = torch.randint(0, cfg.model.vocab_size, (2, n))
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, megatron_logits(ours, x), rtol=0, atol=1e-4)
    assert_hf_generates_like(hf, ours, torch.randint(0, cfg.model.vocab_size, (1, 8)))

    logged = RunDir(run).records()
    (val,) = [r for r in logged if r.get("kind") == "validation"]
    tokens = split_tokens(cfg.data.sources[0].path, "valid", cfg.validation.tokens)
    for n in (64, 256):
        res = perplexity(lambda t: hf(t).logits, tokens, n, batch_size=4)
        assert res.ppl == pytest.approx(val[f"val/ppl_at_{n}"], rel=1e-5)
