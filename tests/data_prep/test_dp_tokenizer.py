"""Tokenizer training (sampling, settings, JSON) and the Tokenizer wrapper; the default corpus."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import sentencepiece as spm

from data_prep.corpus import build_default_corpus
from data_prep.tokenizer import Tokenizer
from data_prep.train_tokenizer import sample_documents

from .conftest import VOCAB, raw_bytes, reference_docs

REPO = Path(__file__).resolve().parents[2]


def test_tokenizer_wrapper_and_special_ids(tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert tok.vocab_size == VOCAB == len(tok)
    assert (tok.eod, tok.pad, tok.bos) == (sp.piece_to_id("<|endoftext|>"), sp.piece_to_id("<pad>"), 1)
    assert sp.is_control(tok.eod) and tok.eod not in tok.encode("a <|endoftext|> b")  # text cannot inject eod
    text = "def f(x):\n    return 'ünï 𝔘 日本' + str(1234567)\n\n\tend  "
    ids = tok.encode(text)
    assert ids == sp.encode(text) and tok.decode(ids) == text  # exact round trip, whitespace kept
    assert sp.unk_id() not in ids  # byte fallback covers unseen characters
    assert all(sum(ch.isdigit() for ch in sp.id_to_piece(i)) <= 1 for i in range(tok.vocab_size)
               if not sp.is_byte(i))  # digits split
    assert len(tok.encode("1234567")) >= 7
    assert [a.tolist() for a in tok.encode_batch([text, "x"])] == [ids, tok.encode("x")]
    assert pickle.loads(pickle.dumps(tok)).sha256 == tok.sha256
    assert tok.unique_identifiers["sha256"] == tok.sha256


def test_training_json_records_settings_and_sample(tokenizer_model, corpus):
    info = json.loads(Path(tokenizer_model).with_suffix(".json").read_text())
    assert info["settings"]["vocab_size"] == VOCAB and info["settings"]["byte_fallback"]
    assert info["sample"]["documents_seen"] == sum(len(reference_docs(p)) for p in corpus)


def test_sample_is_bounded_uniform_and_order_free(corpus):
    budget = 60_000
    docs, stats = sample_documents(corpus, budget)
    assert stats["bytes_sampled"] <= budget and sum(map(len, docs)) == stats["bytes_sampled"]
    assert 0 < stats["documents_sampled"] < stats["documents_seen"]
    per_file = [sum(d.decode() in set(reference_docs(p)) for d in docs) for p in corpus]
    assert all(n > 0 for n in per_file)  # drawn across all inputs, not the first ones
    assert sample_documents(corpus[::-1], budget)[0] == docs  # the order of inputs does not matter


def test_train_tokenizer_cli(corpus, tmp_path):
    r = subprocess.run([sys.executable, "data_prep/train_tokenizer.py", "--input", str(corpus[0]),
                        "--vocab-size", "384", "--output", str(tmp_path / "t"), "--sample-mb", "0.2"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Tokenizer(tmp_path / "t.model").vocab_size == 384 and (tmp_path / "t.json").is_file()


def test_default_corpus_is_deterministic_real_text(tmp_path, corpus):
    a = build_default_corpus(tmp_path / "a", max_mb=0.3)
    b = build_default_corpus(tmp_path / "b", max_mb=0.3)
    assert [p.name for p in a] == ["default.jsonl", "default.jsonl.zst", "default.txt"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    text = "\n".join(d for p in corpus for d in reference_docs(p))
    assert 0.5e6 < len(text.encode()) < 0.8e6 and text.count(" the ") > 1000  # English prose
    assert raw_bytes(corpus[1]).count(b"\n") == len(reference_docs(corpus[1]))
