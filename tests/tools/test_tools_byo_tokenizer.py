"""Bring your own tokenizer, end to end: shards made with a GPT-2-style byte-level BPE
tokenizer.json train a tiny model (its vocabulary padded from 1000 to 1024 ids), the checkpoint
records the tokenizer, the HF export carries the same tokenizer.json, so that
`AutoTokenizer.from_pretrained(export)` gives the shards' ids and round-trips the text, and the
exported model generates; evaluation, export and resume refuse another tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.preprocess import preprocess
from data_prep.tokenizer import file_sha256
from pretrain.rundir import RunDir
from tools.jobs import child_env

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_alibi.yaml"
DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "a document quoting <|endoftext|> in its text, emoji 😀 🇫🇷 and runs of spaces     and\ttabs\n\n\n",
    "def f(x):\n    return x + 1  # code\n",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    from data_prep.corpus import build_default_corpus

    return build_default_corpus(tmp_path_factory.mktemp("byo_corpus"), max_mb=1.0)


@pytest.fixture(scope="module")
def bpe_data(corpus, bpe_tokenizer_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe_data")
    preprocess(corpus, bpe_tokenizer_json, out, workers=2, valid_fraction=0.05, quiet=True)
    return out


@pytest.fixture(scope="module")
def run_dir(bpe_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("byo_run") / "run"
    env = child_env(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", WANDB_MODE="offline",
                    OMP_NUM_THREADS="1")  # without an in-process test's rendezvous (its MASTER_PORT is taken)
    r = subprocess.run([sys.executable, "pretrain/train.py", "--config", str(TINY), "--data", str(bpe_data),
                        "--run-dir", str(run), "--steps", "40", "--log-interval", "1", "--save-interval", "40",
                        "model.vocab_size=1024", "train.global_batch_size=8", "train.micro_batch_size=8",
                        "optim.warmup_steps=3", "validation.interval=40", "validation.tokens=2048",
                        "validation.length_multipliers=[1, 2]"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.mark.slow
def test_a_tiny_model_trains_on_bpe_shards_and_records_the_tokenizer(run_dir, bpe_data):
    from pretrain import checkpoint

    losses = [r["loss"] for r in RunDir(run_dir).records() if r.get("kind", "train") == "train"]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    _, meta = checkpoint.find_checkpoint(run_dir)
    manifest = json.loads((bpe_data / "manifest.json").read_text())
    assert meta["tokenizer"] == manifest["tokenizer"] and meta["tokenizer"]["kind"] == "hf"
    assert meta["config"]["model"]["vocab_size"] == 1024 > meta["tokenizer"]["vocab_size"] == 1000


def test_a_model_vocab_smaller_than_the_tokenizers_is_refused_with_the_padded_size(bpe_data):
    from pretrain.config import ConfigError, DataSource, load_config
    from pretrain.data import load_data

    cfg = load_config(TINY, ["model.vocab_size=512"])
    cfg.data.sources = [DataSource(path=str(bpe_data))]
    with pytest.raises(ConfigError, match=r"set model.vocab_size >= 1000 \(a multiple of 128, e.g. 1024\)"):
        load_data(cfg)


@pytest.mark.slow
def test_export_carries_the_tokenizer_json_and_reproduces_the_ids(run_dir, bpe_data, bpe_tokenizer_json, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.data import split_tokens
    from tools.convert_to_hf import convert

    export = convert(run_dir, tmp_path / "hf")
    assert file_sha256(export / "tokenizer.json") == file_sha256(bpe_tokenizer_json)  # the same file
    tok = AutoTokenizer.from_pretrained(export)
    eod = json.loads((bpe_data / "manifest.json").read_text())["tokenizer"]["eod"]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == eod
    # the export's own tokenizer gives the valid split's ids, document by document
    valid = split_tokens(bpe_data, "valid").tolist()
    ends = [i for i, t in enumerate(valid) if t == eod]
    starts = [0] + [e + 1 for e in ends[:-1]]
    docs = [valid[s:e] for s, e in zip(starts, ends)]
    assert len(docs) > 3
    for ids in docs:
        text = tok.decode(ids)
        assert tok.encode(text, add_special_tokens=False) == ids
    for text in DOCS:  # round trip, and the quoted <|endoftext|> stays text
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text and eod not in ids
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.generation_config.eos_token_id == eod
    prompt = tok("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, min_new_tokens=12)
    assert out.shape[1] == prompt.input_ids.shape[1] + 12 and isinstance(tok.decode(out[0]), str)


@pytest.mark.slow
def test_eval_export_and_resume_refuse_another_tokenizer(run_dir, corpus, wordpiece_tokenizer_dir, bpe_tokenizer_json,
                                                         tmp_path):
    from pretrain import checkpoint
    from pretrain.config import Config, from_dict
    from pretrain.layout import Layout
    from pretrain.resume import resume_changes
    from tools.convert_to_hf import convert
    from tools.eval_extrapolation import main as eval_main

    other = tmp_path / "wp_data"
    preprocess(corpus[:1], wordpiece_tokenizer_dir, other, eod_token="[SEP]", workers=1, valid_fraction=0.2,
               quiet=True)
    with pytest.raises(ValueError) as refused:
        eval_main(["--checkpoint", str(run_dir), "--data", str(other), "--lengths", "64", "--output",
                   str(tmp_path / "eval")])
    wp_json = wordpiece_tokenizer_dir.resolve() / "tokenizer.json"
    for named in (str(bpe_tokenizer_json.resolve()), str(wp_json), "sha256"):
        assert named in str(refused.value)  # one line naming both tokenizers
    assert "\n" not in str(refused.value) and not (tmp_path / "eval" / "results.json").exists()
    with pytest.raises(ValueError, match="is not the tokenizer the run was trained with"):
        convert(run_dir, tmp_path / "hf", tokenizer=wordpiece_tokenizer_dir)
    _, meta = checkpoint.find_checkpoint(run_dir)
    wp = json.loads((other / "manifest.json").read_text())["tokenizer"]
    cfg = from_dict(Config, meta["config"])
    changes = resume_changes(meta, cfg, wp, Layout.of(cfg, 1))
    assert any(line.startswith("tokenizer:") and "wordpiece" in line for line in changes.refused)
    assert resume_changes(meta, cfg, meta["tokenizer"], Layout.of(cfg, 1)).refused == []
    other_eod = dict(meta["tokenizer"], eod=meta["tokenizer"]["eod"] + 1)  # the same file, another --eod-token
    assert resume_changes(meta, cfg, other_eod, Layout.of(cfg, 1)).refused[0].startswith("tokenizer:")
