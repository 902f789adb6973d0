"""Session fixtures for the data-prep tests: a small default corpus and a small-vocab tokenizer
(trained once, seconds), plus an independent reference reader of the input formats."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard

from data_prep.corpus import build_default_corpus
from data_prep.train_tokenizer import train_tokenizer

VOCAB = 2048


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> list[Path]:
    return build_default_corpus(tmp_path_factory.mktemp("corpus"), max_mb=0.6)


@pytest.fixture(scope="session")
def tokenizer_model(corpus, tmp_path_factory) -> Path:
    return train_tokenizer(corpus, VOCAB, tmp_path_factory.mktemp("tok") / "tok", sample_mb=2)


def raw_bytes(path: Path) -> bytes:
    """Whole decompressed file, read in one go with the format's own library (reference only)."""
    data = Path(path).read_bytes()
    name = Path(path).name
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".bz2"):
        return bz2.decompress(data)
    if name.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    return data


def reference_docs(path: Path, text_key: str = "text") -> list[str]:
    """Good documents of an input, parsed independently of data_prep.readers."""
    data = raw_bytes(path)
    if ".json" in Path(path).name:
        docs = []
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
                text = obj[text_key]
                if isinstance(text, str) and text.strip():
                    text.encode("utf-8")
                    docs.append(text)
            except (ValueError, KeyError, TypeError, UnicodeError):
                pass
        return docs
    parts = re.split(rb"\n(?:[ \t\r\f\v]*\n)+", b"\n" + data)
    docs = []
    for p in parts:
        p = p.strip(b"\n")
        if p.strip():
            try:
                docs.append(p.decode("utf-8"))
            except UnicodeDecodeError:
                pass
    return docs


def is_valid(text: str, fraction: float) -> bool:
    key = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return key < fraction * 2**64


def reference_tokens(model: Path, docs: list[str], eod: int) -> list[list[int]]:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [sp.encode(d) + [eod] for d in docs]


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    """Every shard file's bytes, by name: the output that must not depend on workers/launcher."""
    return {f"{d}/{p.name}": p.read_bytes() for d in ("shards", "merged")
            for p in sorted((Path(out_dir) / d).iterdir()) if p.suffix in (".bin", ".idx")}
