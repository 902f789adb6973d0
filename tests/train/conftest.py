"""Shared fixtures for the training tests: one tiny tokenized dataset per session, built with
the real data_prep pipeline (corpus -> SentencePiece 4096 -> megatron .bin/.idx shards)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from data_prep.corpus import build_default_corpus
    from data_prep.preprocess import preprocess
    from data_prep.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    files = build_default_corpus(root / "corpus", max_mb=1.5)
    tok = train_tokenizer([files[0]], vocab_size=4096, output_prefix=root / "tok", num_threads=2)
    preprocess([str(files[0])], str(tok), str(root / "pre"), workers=1, quiet=True, valid_fraction=0.1)
    return root / "pre"
