"""Every input format gives the same documents; any split points cover each record once."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep.preprocess import preprocess
from data_prep.readers import ChunkReader, InputError, detect_format, expand_inputs

from .conftest import raw_bytes, reference_docs, reference_tokens
from .test_dp_preprocess import IndexedDataset, read_split

REPO = Path(__file__).resolve().parents[2]

DOCS = [f"Document {i}: " + " ".join(f"word{i * 7 + j}" for j in range(i % 23 + 1)) +
        ("\nsecond line with ünïcödé 日本語" if i % 3 == 0 else "") for i in range(300)]
COMPRESS = {"": lambda b: b, ".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress,
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
    (d / "dolma.json.gz").write_bytes(gzip.compress(jsonl))  # Dolma's name for JSON lines
    return paths + [d / "dolma.json.gz"]


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


def test_crlf_txt_gives_the_lf_documents(tmp_path):
    lf = "".join(t + "\n\n" for t in DOCS).encode()
    (tmp_path / "crlf.txt").write_bytes(lf.replace(b"\n", b"\r\n"))
    for bounds in ([(0, None)], [(0, 3000), (3000, 9000), (9000, None)]):
        readers = [ChunkReader(tmp_path / "crlf.txt", "txt", None, s, e) for s, e in bounds]
        assert [r.data for reader in readers for r in reader] == [d.encode() for d in DOCS]
        assert sum(r.lines for r in readers) == lf.count(b"\n")


def write_parquet(path, docs, row_group_size):
    """A FineWeb-style file: the text plus metadata columns."""
    n = len(docs)
    table = pa.table({"text": docs, "id": [f"<urn:uuid:{path.stem}-{i}>" for i in range(n)],
                      "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.org/{i}" for i in range(n)],
                      "date": ["2024-02-21T00:00:00Z"] * n, "language": ["en"] * n,
                      "language_score": [0.9] * n, "token_count": [len(d or "") // 4 for d in docs]})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_row_groups_several_files_and_a_wrong_column(tmp_path, tokenizer_model):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_parquet(a, DOCS[:150] + [None, ""] + DOCS[150:200], row_group_size=16)  # 13 row groups
    write_parquet(b, DOCS[200:], row_group_size=40)
    assert pq.ParquetFile(a).metadata.num_row_groups == 13
    # the reference: pyarrow's own reading of the whole column; null and empty texts are rejected
    docs = [t for p in (a, b) for t in pq.read_table(p).column("text").to_pylist() if t]
    m = preprocess([a, b], tokenizer_model, tmp_path / "out", workers=2, valid_fraction=0.0, chunk_mb=0.004,
                   quiet=True)
    assert m["inputs"][0]["chunks"] > 3 and m["inputs"][1]["chunks"] > 1  # a file is not one serial task
    assert read_split(tmp_path / "out", "train") == reference_tokens(tokenizer_model, docs, 2)
    rej = m["rejected"]
    assert [(r, rej[r]["count"], rej[r]["examples"][0]["line"]) for r in sorted(rej)] == \
        [("empty_document", 1, 152), ("missing_text", 1, 151)]  # file:row, 1-based
    with pytest.raises(InputError, match=r"no column 'content'; its columns are text, id, dump, url"):
        preprocess([a], tokenizer_model, tmp_path / "out2", text_key="content", quiet=True)
    assert not (tmp_path / "out2").exists()  # refused before any work
    r = subprocess.run([sys.executable, "data_prep/preprocess.py", "--input", str(a), "--tokenizer",
                        str(tokenizer_model), "--output-dir", str(tmp_path / "out3"), "--text-key", "id_"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--text-key" in r.stderr and "Traceback" not in r.stderr


def test_each_file_is_read_once_through_symlinks_and_loops(tmp_path, tokenizer_model):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:20]))
    (d / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[20:40]))
    os.symlink(d, d / "sub" / "loop")  # a directory symlink loop
    os.symlink(d / "sub", tmp_path / "sub_link")  # a symlinked directory, also given as an input
    os.symlink(d / "a.jsonl", d / "a_link.jsonl")  # a symlinked duplicate file
    os.link(d / "sub" / "b.jsonl", d / "b_hard.jsonl")  # and a hard link
    files = {os.stat(d / "a.jsonl").st_ino, os.stat(d / "sub" / "b.jsonl").st_ino}
    for specs in ([d], [d / "**" / "*.jsonl"], [d, tmp_path / "sub_link"], [tmp_path / "sub_link", d / "**"]):
        got = expand_inputs(specs)
        assert len(got) == 2 and {os.stat(p).st_ino for p in got} == files, specs
    m = preprocess([d / "**" / "*.jsonl", tmp_path / "sub_link"], tokenizer_model, tmp_path / "out", workers=1,
                   valid_fraction=0.0, quiet=True)
    got = read_split(tmp_path / "out", "train")
    assert sorted(got) == sorted(reference_tokens(tokenizer_model, DOCS[:40], 2)) and len(m["inputs"]) == 2
