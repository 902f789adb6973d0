"""The main job's code path end to end (--quick), and the tools on its real outputs:
our checkpoint and its HF export give the same perplexity; sliding(stride=L) == nonoverlapping;
the exported tokenizer matches SentencePiece on corpus text; eval_extrapolation's files."""

import csv
import json
import random

import pytest
import sentencepiece as spm
from transformers import AutoModelForCausalLM, AutoTokenizer

from pretrain.rundir import RunDir
from tools.eval_extrapolation import main as eval_main

from helpers import assert_hf_generates_like, megatron_logits

pytestmark = pytest.mark.slow
# the record tools/eval_extrapolation.py's docstring promises (the tool's own FIELDS would pass whatever it wrote)
FIELDS = ["model", "train_length", "length", "method", "stride", "tokens", "ppl"]


def test_main_job_writes_figure_table_and_equal_hf_perplexity(quick_job):
    out, summary = quick_job
    records = json.loads((out / "eval" / "results.json").read_text())
    assert all(list(r) == FIELDS for r in records)
    assert {r["model"] for r in records} == {"sinusoidal", "rope", "t5", "alibi", "alibi (HF export)"}
    assert sorted({r["length"] for r in records}) == [64, 128, 512]  # L .. 8L
    ours = {r["length"]: r for r in records if r["model"] == "alibi"}
    hf = {r["length"]: r for r in records if r["model"] == "alibi (HF export)"}
    for n, r in ours.items():
        assert hf[n]["tokens"] == r["tokens"] > 0
        assert hf[n]["ppl"] == pytest.approx(r["ppl"], rel=1e-5)
    assert (out / "eval" / "extrapolation.png").stat().st_size > 10_000
    table = (out / "comparison.md").read_text()
    assert "| alibi (HF export) | 64 |" in table and "ppl@512" in table
    for name in ("sinusoidal", "rope", "t5", "alibi"):  # the quick runs still learn
        losses = [r["loss"] for r in RunDir(out / "runs" / name).records()]
        assert losses[-1] < losses[0] - 0.5


def test_hf_export_is_loadable_and_its_tokenizer_matches_sentencepiece(quick_job):
    out, summary = quick_job
    hf_dir = out / "hf" / "alibi"
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(model).__name__ == "MptForCausalLM" and model.config.train_seq_length == 64
    tok = AutoTokenizer.from_pretrained(hf_dir)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer" / "tok.model"))
    docs = [json.loads(x)["text"] for x in (out / "corpus" / "default.jsonl").read_text().splitlines()]
    for text in random.Random(0).sample(docs, 30) + ["  tabs\tand   spaces 12345 café 東京 😀"]:
        assert tok.encode(text) == sp.encode(text)
    assert tok.eos_token_id == sp.eos_id() == model.generation_config.eos_token_id


def test_eval_cli_sliding_stride_L_equals_nonoverlapping(quick_job, tmp_path):
    out, _ = quick_job
    args = ["--checkpoint", str(out / "runs" / "sinusoidal"), str(out / "hf" / "alibi"), "--data", str(out / "data"),
            "--lengths", "64,128", "--batch-size", "3"]
    eval_main(args + ["--output", str(tmp_path / "n")])
    eval_main(args + ["--method", "sliding", "--stride", "128", "--output", str(tmp_path / "s128"), "--lengths", "128"])
    eval_main(args + ["--method", "sliding", "--stride", "32", "--output", str(tmp_path / "s32"), "--lengths", "128"])
    non = json.loads((tmp_path / "n" / "results.json").read_text())
    s128 = {(r["model"], r["length"]): r for r in json.loads((tmp_path / "s128" / "results.json").read_text())}
    s32 = {(r["model"], r["length"]): r for r in json.loads((tmp_path / "s32" / "results.json").read_text())}
    for r in non:
        if r["length"] == 128:
            same = s128[(r["model"], 128)]
            assert (same["method"], same["stride"], same["tokens"]) == ("sliding", 128, r["tokens"])
            assert same["ppl"] == pytest.approx(r["ppl"], rel=1e-6)
            assert s32[(r["model"], 128)]["tokens"] > r["tokens"]  # more windows, only the last 32 scored
    with open(tmp_path / "n" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == FIELDS and len(rows) == 4
    assert (tmp_path / "n" / "extrapolation.png").is_file()


@pytest.mark.parametrize("name", ["alibi", "sinusoidal", "rope"])
def test_trained_tp1_checkpoints_export_exactly(quick_job, name):
    import torch

    from pretrain.checkpoint import load_consolidated
    from pretrain.model import build_model
    from pretrain.parallel import init_model_parallel
    from tools.hf_export import megatron_to_hf

    out, _ = quick_job
    cfg, sd = load_consolidated(out / "runs" / name)
    hf = megatron_to_hf(cfg, sd, max_positions=4 * cfg.model.seq_length)
    init_model_parallel(tp=1)
    ours = build_model(cfg.model).eval()
    ours.load_state_dict(sd, strict=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for n in (cfg.model.seq_length, 4 * cfg.model.seq_length):
            x = torch.randint(0, cfg.model.vocab_size, (2, n))
            torch.testing.assert_close(hf(x).logits, megatron_logits(ours, x), rtol=0, atol=1e-4)
    assert_hf_generates_like(hf, ours, torch.randint(0, cfg.model.vocab_size, (1, 8)))
