"""Every input format gives the same documents; any split points cover each record once."""

from __future__ import annotations

import gzip
import json
import lzma
import random

import pytest
import zstandard

from data_prep.preprocess import preprocess
from data_prep.readers import ChunkReader, InputError, detect_format, expand_inputs

from .conftest import raw_bytes, reference_docs, reference_tokens
from .test_dp_preprocess import IndexedDataset, read_split

DOCS = [f"Document {i}: " + " ".join(f"word{i * 7 + j}" for j in range(i % 23 + 1)) +
        ("\nsecond line with ünïcödé 日本語" if i % 3 == 0 else "") for i in range(300)]
COMPRESS = {"": lambda b: b, ".gz": gzip.compress, ".xz": lzma.compress,
            # several zstd frames, cut mid-line: frames are not record-aligned
            ".zst": lambda b: b"".join(zstandard.ZstdCompressor().compress(b[i:i + 5000])
                                       for i in range(0, len(b), 5000))}


def write_all(d):
    jsonl = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(DOCS)).encode()
    txt = "".join(t + "\n\n" + (" \t\n" if i % 5 == 0 else "") for i, t in enumerate(DOCS)).encode()
    paths = []
    for ext, f in COMPRESS.items():
        for kind, data in (("jsonl", jsonl), ("txt", txt)):
            p = d / f"docs.{kind}{ext}"
            p.write_bytes(f(data))
            paths.append(p)
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("formats"))


def test_reference_reader_sees_the_docs(inputs):
    for p in inputs:
        assert reference_docs(p) == DOCS, p.name


@pytest.mark.parametrize("seed", range(3))
def test_any_split_points_cover_each_record_once(inputs, seed):
    rng = random.Random(seed)
    for p in inputs:
        kind, comp = detect_format(p)
        whole = [r.data for r in ChunkReader(p, kind, comp, 0, None)]
        size = len(b"".join(whole)) + 3000
        cuts = sorted(rng.sample(range(1, size), 12))
        bounds = list(zip([0] + cuts, cuts + [None]))
        parts = [r.data for s, e in bounds for r in ChunkReader(p, kind, comp, s, e)]
        assert parts == whole == [d.encode() for d in DOCS], p.name
        lines = [ChunkReader(p, kind, comp, s, e) for s, e in bounds]
        for r in lines:
            list(r)
        assert sum(r.lines for r in lines) == raw_bytes(p).count(b"\n"), p.name  # each line once


def test_every_format_tokenizes_identically(inputs, tokenizer_model, tmp_path):
    """One run over all formats; each input's own chunk shards hold exactly its documents."""
    want = reference_tokens(tokenizer_model, DOCS, 2)
    m = preprocess(inputs, tokenizer_model, tmp_path, workers=1, valid_fraction=0.0, chunk_mb=0.004,
                   merge_mb=0, quiet=True)  # merge_mb=0: the chunk shards are the output
    assert m["rejected"] == {} and not (tmp_path / "merged").exists()
    for i, p in enumerate(inputs):
        assert m["inputs"][i]["chunks"] > 1 and m["inputs"][i]["documents"] == len(DOCS), p.name
        got = []
        for s in m["shards"]:
            if s["split"] == "train" and s["chunk"].startswith(f"{i:05d}-"):
                ds = IndexedDataset(str(tmp_path / s["prefix"]))
                got += [ds[j].tolist() for j in range(len(ds))]
        assert got == want, p.name
    assert read_split(tmp_path, "train") == want * len(inputs)


def test_directories_and_globs(inputs, tmp_path):
    d = inputs[0].parent
    assert expand_inputs([d]) == sorted(inputs)
    assert expand_inputs([str(d / "*.txt*")]) == sorted(p for p in inputs if ".txt" in p.name)
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([tmp_path / "missing.jsonl"])
    with pytest.raises(InputError, match="matches no"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    with pytest.raises(InputError, match="unknown input format"):
        detect_format("data.csv")
