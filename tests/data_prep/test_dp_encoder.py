"""The fast encoder writes the shards SentencePiece writes; where it differs, or cannot be trusted
for the model, the run falls back to SentencePiece and the output is still the same."""

from __future__ import annotations

import io
import json

import pytest
import sentencepiece as spm

from data_prep import encoders, worker
from data_prep.encoders import FastEncoder
from data_prep.preprocess import preprocess

from .conftest import reference_docs, reference_tokens, shard_bytes
from .test_dp_preprocess import read_split

EDGE_DOCS = [
    "<s> and </s> and <|endoftext|> and <pad> and <unk> are text here",
    "a literal \u2581 (U+2581) \u2581\u2581 next to x\u2581y",
    "tab\tseparated\t\tcolumns\t",
    "runs of     spaces\n\n\n\nand newlines\n\n",
    "日本語の文章。中文的句子。한국어 문장.",
    "emoji 😀 🚀 👩\u200d💻 🇫🇷 and math 𝔘𝔫𝔦",
    "rare characters that need byte fallback: \U0001F9EA \u2603 \U00010348 \u0007 ǅ",
    "    def f(x):\n\t\treturn {'a': [1, 2, 3]}  # code\n",
    "numbers 1234567890 and 3.14159e-10",
]


@pytest.fixture(scope="module")
def inputs(corpus, tmp_path_factory):
    edge = tmp_path_factory.mktemp("edge") / "edge.jsonl"
    edge.write_text("".join(json.dumps({"text": t}) + "\n" for t in EDGE_DOCS))
    return [*corpus, edge]


@pytest.fixture(scope="module")
def want(inputs, tokenizer_model):
    """SentencePiece's ids of every good document plus eod, in input order (all in train)."""
    return reference_tokens(tokenizer_model, [d for p in inputs for d in reference_docs(p)], 2)


@pytest.fixture(scope="module")
def sp_out(inputs, tokenizer_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    m = preprocess(inputs, tokenizer_model, out, workers=1, valid_fraction=0.0, encoder="sentencepiece", quiet=True)
    return out, m


def test_every_encoder_writes_sentencepiece_shards(inputs, tokenizer_model, want, sp_out, tmp_path):
    out, m = sp_out
    assert m["encoder"]["used"] == "sentencepiece" and read_split(out, "train") == want
    for requested in ("fastokens", "auto"):
        m = preprocess(inputs, tokenizer_model, tmp_path / requested, workers=2, valid_fraction=0.0,
                       encoder=requested, quiet=True)
        assert m["encoder"]["used"] == "fastokens" and m["encoder"]["fallback"] is None
        assert m["encoder"]["chunks"] == {"sentencepiece": 0, "fastokens": m["run"]["chunks"]}
        assert m["encoder"]["checked"]["documents"] > len(EDGE_DOCS)
        assert read_split(tmp_path / requested, "train") == want
        assert shard_bytes(tmp_path / requested) == shard_bytes(out)
    # the encoder is not part of the plan: a run may resume with another one
    m = preprocess(inputs, tokenizer_model, out, workers=1, valid_fraction=0.0, encoder="fastokens", quiet=True)
    assert m["run"]["chunks_resumed"] == m["run"]["chunks"]


def _plant(monkeypatch, marker: str):
    """The fast encoder gives a wrong first id for any text containing `marker`."""
    real = FastEncoder.encode_batch

    def planted(self, texts):
        return [ids + (marker in t) for t, ids in zip(texts, real(self, texts))]
    monkeypatch.setattr(FastEncoder, "encode_batch", planted)


def test_a_difference_at_start_up_falls_back_to_sentencepiece(inputs, tokenizer_model, sp_out, tmp_path,
                                                              monkeypatch, caplog):
    _plant(monkeypatch, "日本語")
    m = preprocess(inputs, tokenizer_model, tmp_path, workers=2, valid_fraction=0.0, encoder="auto", quiet=True)
    assert m["encoder"]["used"] == "sentencepiece" and "日本語" in m["encoder"]["fallback"]
    assert "using sentencepiece, not fastokens" in caplog.text
    assert shard_bytes(tmp_path) == shard_bytes(sp_out[0])


def test_a_difference_inside_a_chunk_redoes_that_chunk(inputs, tokenizer_model, sp_out, tmp_path, monkeypatch):
    """A difference the start-up sample missed: the chunk's spot check (here: every document)
    catches it and that chunk is redone with SentencePiece."""
    _plant(monkeypatch, "日本語")
    monkeypatch.setattr(encoders, "check", lambda *args: None)  # the start-up check sees nothing
    monkeypatch.setattr(worker, "SPOT_CHECK", 1)
    m = preprocess(inputs, tokenizer_model, tmp_path, workers=1, valid_fraction=0.0, encoder="fastokens", quiet=True)
    assert m["encoder"]["used"] == "fastokens"
    assert m["encoder"]["chunks"] == {"sentencepiece": 1, "fastokens": m["run"]["chunks"] - 1}
    assert shard_bytes(tmp_path) == shard_bytes(sp_out[0])


def test_a_model_the_fast_path_is_not_known_exact_for_uses_sentencepiece(corpus, tmp_path):
    """A BPE model with SentencePiece's default normalization (NFKC character map, whitespace collapsing)."""
    model = io.BytesIO()
    lines = (line for line in reference_docs(corpus[0])[:300] for line in line.split("\n") if line.strip())
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=400,
                                   minloglevel=2)
    (tmp_path / "nfkc.model").write_bytes(model.getvalue())
    m = preprocess(corpus[:1], tmp_path / "nfkc.model", tmp_path / "out", workers=1, valid_fraction=0.0,
                   encoder="fastokens", quiet=True)
    assert m["encoder"]["used"] == "sentencepiece" and "character map" in m["encoder"]["fallback"]
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert read_split(tmp_path / "out", "train") == reference_tokens(tmp_path / "nfkc.model", reference_docs(corpus[0]),
                                                                     sp.eos_id())
