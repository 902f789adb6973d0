"""Fault study (issue 18, data prep): damaged, odd and hostile input and output directories give
a counted bad record, a listed skip or a one-line refusal, never silently wrong output."""

from __future__ import annotations

import bz2
import errno
import gzip
import json
import lzma
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep import pipeline
from data_prep.manifest import load_manifest, shard_prefixes
from data_prep.pipeline import DiskFullError, EmptyValidError, RefusedError
from data_prep.preprocess import preprocess
from data_prep.readers import ChunkReader

from .conftest import reference_tokens, shard_bytes
from .test_dp_preprocess import read_split

REPO = Path(__file__).resolve().parents[2]
DOCS = [f"document {i}: " + " ".join(f"w{(i * 31 + j) % 997}" for j in range(12)) for i in range(2700)]
EOD = 2


def jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()


def run(inputs, tok, out, **kw):
    return preprocess(inputs, tok, out, **dict(dict(workers=1, valid_fraction=0.0, quiet=True), **kw))


def test_a_corrupt_parquet_page_loses_only_its_row_group(tmp_path, tokenizer_model):
    path = tmp_path / "fw.parquet"
    pq.write_table(pa.table({"text": DOCS}), path, row_group_size=300, use_dictionary=False,
                   compression="zstd", write_page_checksum=True)
    col = pq.ParquetFile(path).metadata.row_group(2).column(0)  # 9 groups of 300 rows
    raw = bytearray(path.read_bytes())
    mid = col.data_page_offset + col.total_compressed_size // 2
    raw[mid:mid + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    m = run([path], tokenizer_model, tmp_path / "out")
    kept = DOCS[:600] + DOCS[900:]
    assert read_split(tmp_path / "out", "train") == reference_tokens(tokenizer_model, kept, EOD)
    bad = m["rejected"]["corrupt_row_group"]
    assert bad["count"] == 1 and bad["examples"][0]["line"] == 601 and "row group 2" in bad["examples"][0]["detail"]


def test_a_directory_matches_extensions_in_any_case_and_lists_what_it_skips(tmp_path, tokenizer_model, caplog):
    d = tmp_path / "in"
    d.mkdir()
    (d / "B.JSONL").write_bytes(jsonl(DOCS[:10]))
    (d / "x.jsonl.GZ").write_bytes(gzip.compress(jsonl(DOCS[10:20])))
    (d / "d.ndjson").write_bytes(jsonl(DOCS[20:30]))
    (d / "notes.md").write_text("not data")
    os.mkfifo(d / "pipe.jsonl")  # reading it would block forever
    m = run([d], tokenizer_model, tmp_path / "out")
    want = DOCS[:10] + DOCS[20:30] + DOCS[10:20]  # B.JSONL, d.ndjson, x.jsonl.GZ: sorted names
    assert read_split(tmp_path / "out", "train") == reference_tokens(tokenizer_model, want, EOD)
    skipped = {Path(x["file"]).name: x["reason"] for x in m["skipped_inputs"]}
    assert skipped.keys() == {"notes.md", "pipe.jsonl"}
    assert "not an input format" in skipped["notes.md"] and "a FIFO, not a regular file" in skipped["pipe.jsonl"]
    for name in skipped:
        assert f"skipped {d / name}: {skipped[name]}" in caplog.text
    assert load_manifest(tmp_path / "out")["skipped_inputs"] == m["skipped_inputs"]


def test_a_fifo_named_as_an_input_is_refused_not_waited_on(tmp_path, tokenizer_model):
    os.mkfifo(tmp_path / "x.jsonl")
    r = subprocess.run([sys.executable, "data_prep/preprocess.py", "--input", str(tmp_path / "x.jsonl"),
                        "--tokenizer", str(tokenizer_model), "--output-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"preprocess: refused: --input {tmp_path / 'x.jsonl'} is a FIFO, not a regular " \
                               f"file: pass a file"


def test_bom_and_cr_only_line_ends(tmp_path, tokenizer_model):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(DOCS[:3]))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "\n\n".join(DOCS[3:5]).encode() + b"\n")
    (tmp_path / "mac.txt").write_bytes(b"first line\rsecond line\r\rnext document\r\r\rlast one\r")
    (tmp_path / "mac.txt.gz").write_bytes(gzip.compress(b"zipped one\r\rzipped two\r"))
    m = run([tmp_path / n for n in ("bom.jsonl", "bom.txt", "mac.txt", "mac.txt.gz")], tokenizer_model,
            tmp_path / "out")
    want = DOCS[:5] + ["first line\nsecond line", "next document", "last one", "zipped one", "zipped two"]
    assert m["rejected"] == {}
    assert read_split(tmp_path / "out", "train") == reference_tokens(tokenizer_model, want, EOD)


def test_a_damaged_gzip_member_is_reported_as_possibly_garbled(tmp_path, tokenizer_model, caplog):
    data = bytearray(gzip.compress(jsonl(DOCS[:50]), compresslevel=0))  # stored blocks: a flip decodes
    data[len(data) // 2] ^= 0x04  # one bit of one document's text; the CRC at the end fails
    (tmp_path / "flip.jsonl.gz").write_bytes(bytes(data))
    m = run([tmp_path / "flip.jsonl.gz"], tokenizer_model, tmp_path / "out")
    bad = m["rejected"]["corrupt_stream"]
    assert bad["count"] == 1 and "may be damaged" in bad["examples"][0]["detail"]
    assert "truncated_stream" not in m["rejected"]
    assert len(m["warnings"]) == 1 and "flip.jsonl.gz" in m["warnings"][0] and "garbled" in m["warnings"][0]
    assert m["warnings"][0] in caplog.text


BOMB_MB = 48
PACK = {"bz2": bz2.compress, "gz": gzip.compress, "xz": lzma.compress, "zst": zstandard.ZstdCompressor().compress}


@pytest.mark.parametrize("comp", sorted(PACK))
def test_a_decompression_bomb_stays_under_a_memory_cap(comp, tmp_path):
    """48 MiB of one line from a few KB (multi-member, like a bomb built by concatenation):
    rejected as too_long, the document after it kept; Python memory peaks under 24 MiB."""
    member = PACK[comp](b"x" * (16 << 20))
    path = tmp_path / f"bomb.jsonl.{comp}"
    path.write_bytes(member * (BOMB_MB // 16) + PACK[comp](b"\n" + jsonl(["after the bomb"])))
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    try:
        recs = list(ChunkReader(path, "jsonl", comp, 0, None, max_doc_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(r.bad, r.text) for r in recs] == [("too_long", None), (None, "after the bomb")]
    assert f"document of {(BOMB_MB << 20) + 1:,} bytes" in recs[0].detail
    assert peak < 24 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_planted_symlinks_in_the_output_are_never_written_through(tmp_path, tokenizer_model, corpus):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    (out / ".work").mkdir(parents=True)
    os.symlink(victim, out / ".work" / "lock")
    with pytest.raises(RefusedError, match=r"lock is a symlink .*remove the link"):
        run(corpus[:1], tokenizer_model, out)
    assert victim.read_text() == "precious\n"
    (out / ".work" / "lock").unlink()
    os.symlink(victim, out / f"manifest.json.tmp{os.getpid()}")  # the manifest's temporary name (this pid)
    run(corpus[:1], tokenizer_model, out)
    assert victim.read_text() == "precious\n" and load_manifest(out)["splits"]["train"]["documents"] > 0


def test_a_manifest_prefix_outside_the_directory_is_refused(tmp_path, tokenizer_model, corpus):
    out = tmp_path / "out"
    run(corpus[:1], tokenizer_model, out)
    m = json.loads((out / "manifest.json").read_text())
    m["merged"][0]["prefix"] = "../../x"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"shard prefix '../../x' is not a file of merged/ or shards/"):
        shard_prefixes(out, "train")


def test_enospc_at_plan_or_manifest_gives_the_full_disk_message(tmp_path, tokenizer_model, corpus, monkeypatch):
    real = pipeline.write_json_atomic

    def full(name):
        def write(path, obj):
            if Path(path).name == name:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, obj)
        return write

    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "write_json_atomic", full("plan.json"))
    with pytest.raises(DiskFullError, match=rf"no space left on device for {out} .* writing {out}/.work/plan.json"):
        run(corpus[:1], tokenizer_model, out)
    monkeypatch.setattr(pipeline, "write_json_atomic", real)
    monkeypatch.setattr("data_prep.manifest.write_json_atomic", full("manifest.json"))
    with pytest.raises(DiskFullError, match="run the same command again"):
        run(corpus[:1], tokenizer_model, out)
    monkeypatch.undo()
    assert run(corpus[:1], tokenizer_model, out)["run"]["chunks_resumed"] > 0


def test_an_empty_valid_split_fails_with_a_fix_that_works(tmp_path, tokenizer_model, corpus):
    import re

    (tmp_path / "few.jsonl").write_bytes(jsonl(DOCS[:20]))
    for inputs, n in (([tmp_path / "few.jsonl"], 20), (corpus, 100)):
        with pytest.raises(EmptyValidError, match=rf"the valid split is empty: none of the {n} documents .* new "
                                                  r"--output-dir with --valid-fraction \S+ \(puts at least 4") as e:
            run(inputs, tokenizer_model, tmp_path / f"out{n}", valid_fraction=1e-9)
        assert not (tmp_path / f"out{n}" / "manifest.json").exists()
        fraction = float(re.search(r"--valid-fraction (\S+) \(", str(e.value))[1])
        m = run(inputs, tokenizer_model, tmp_path / f"fixed{n}", valid_fraction=fraction)  # the advice applies
        assert m["splits"]["valid"]["documents"] >= 4


def test_a_merged_shard_changed_at_the_same_size_is_redone(tmp_path, tokenizer_model, corpus):
    ref = run(corpus, tokenizer_model, tmp_path / "ref", valid_fraction=0.05, chunk_mb=0.05)
    out = tmp_path / "out"
    m = run(corpus, tokenizer_model, out, valid_fraction=0.05, chunk_mb=0.05)
    assert all(len(e["sha256"]) == 64 for e in m["merged"]) and m["merged"] == ref["merged"]
    binf = out / f"{m['merged'][0]['prefix']}.bin"
    tokens = np.fromfile(binf, np.uint16)
    tokens[1000] = 2047 if tokens[1000] != 2047 else 2046  # a valid-looking id: same size, wrong data
    tokens.tofile(binf)
    m2 = run(corpus, tokenizer_model, out, valid_fraction=0.05, chunk_mb=0.05)
    assert 0 < m2["run"]["chunks_resumed"] < m2["run"]["chunks"]  # the damaged shard's chunks were redone
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")


def test_an_input_edited_in_place_with_size_and_mtime_restored_is_refused(tmp_path, tokenizer_model):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(DOCS))
    run([path], tokenizer_model, tmp_path / "out", chunk_mb=0.05)
    st = path.stat()
    data = bytearray(path.read_bytes())
    at = data.index(b"document 1:")  # the first bytes of the first chunk
    data[at:at + 8] = b"DOCUMENT"
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(RefusedError, match=r"holds a run of other contents of .*in\.jsonl"):
        run([path], tokenizer_model, tmp_path / "out", chunk_mb=0.05)


@pytest.fixture(scope="module")
def no_byte_fallback(corpus, tmp_path_factory) -> Path:
    """A BPE model like train_tokenizer.py's but without byte fallback, trained on text without
    `<`, `>`, `|`: the characters of `<s>` written as text are unknown to it."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("nobf")
    text = "\n".join(json.loads(line)["text"] for line in corpus[0].read_text().splitlines())
    (d / "c.txt").write_text(text.translate({ord(c): None for c in "<>|"}))
    spm.SentencePieceTrainer.train(
        input=str(d / "c.txt"), model_prefix=str(d / "nobf"), model_type="bpe", vocab_size=1024, byte_fallback=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        eos_piece="<|endoftext|>", pad_piece="<pad>", minloglevel=2)
    return d / "nobf.model"


def test_control_pieces_written_as_whole_documents_keep_sentencepiece_ids(no_byte_fallback, tmp_path):
    import sentencepiece as spm

    from data_prep import encoders
    from data_prep.hf_tokenizer import write_tokenizer_json

    sp = spm.SentencePieceProcessor(model_file=str(no_byte_fallback))
    write_tokenizer_json(no_byte_fallback, tmp_path / "t.json")
    fast = encoders.FastEncoder(tmp_path / "t.json")
    literals = ["<s>", "<unk>", "<pad>", "<|endoftext|>"]
    assert [fast.encode_batch([t])[0].tolist() for t in literals] != [sp.encode(t) for t in literals]  # the hazard
    cases = encoders.edge_cases(no_byte_fallback)
    assert set(literals) <= set(cases)
    assert encoders.first_difference(cases, [sp.encode(c) for c in cases], fast.encode_batch(cases)) is not None
    (tmp_path / "lit.jsonl").write_bytes(jsonl(literals + ["plain text"]))
    m = run([tmp_path / "lit.jsonl"], no_byte_fallback, tmp_path / "out", encoder="auto")
    assert m["encoder"]["used"] == "sentencepiece" and "no byte fallback" in m["encoder"]["fallback"]
    assert read_split(tmp_path / "out", "train") == [sp.encode(t) + [EOD] for t in literals + ["plain text"]]


def test_a_stale_tokenizer_json_cache_is_converted_again(tmp_path, tokenizer_model, corpus, no_byte_fallback, caplog):
    from data_prep.hf_tokenizer import write_tokenizer_json

    out = tmp_path / "out"
    args = dict(valid_fraction=0.05, chunk_mb=0.05, encoder="auto")
    run(corpus, tokenizer_model, out, **args)
    cache = out / ".work" / "tokenizer.json"
    good = cache.read_bytes()
    write_tokenizer_json(no_byte_fallback, cache)  # another model's conversion left in place
    next((out / ".work" / "done").glob("*.json")).unlink()  # one chunk to redo
    m = run(corpus, tokenizer_model, out, **args)
    assert m["encoder"]["used"] == "fastokens" and m["encoder"]["fallback"] is None
    assert cache.read_bytes() == good and "is not the one converted from" in caplog.text
    assert m["run"]["chunks_resumed"] == m["run"]["chunks"] - 1


@pytest.mark.slow
def test_ctrl_c_says_one_line_and_the_rerun_resumes(tmp_path, tokenizer_model):
    import signal
    import time

    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl(DOCS * 8))  # ~1.5 MB: many chunks of 0.05 MB
    out = tmp_path / "out"
    cli = [sys.executable, "data_prep/preprocess.py", "--input", str(path), "--tokenizer", str(tokenizer_model),
           "--output-dir", str(out), "--workers", "2", "--chunk-mb", "0.05", "--valid-fraction", "0",
           "--encoder", "sentencepiece", "--quiet"]
    proc = subprocess.Popen(cli, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE, text=True)
    done, deadline = out / ".work" / "done", time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not done.is_dir() or len(list(done.glob("*.json"))) < 2):
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "preprocess: interrupted: completed chunks are kept: run the same command again to resume"], err
    m = run([path], tokenizer_model, out, chunk_mb=0.05, workers=2)
    assert m["run"]["chunks_resumed"] >= 2 and m["splits"]["train"]["documents"] == len(DOCS) * 8


def _train_config(data_dir: Path, *overrides: str):
    from pretrain.config import DataSource, load_config

    cfg = load_config(REPO / "configs" / "tiny_alibi.yaml", ["train.global_batch_size=4", "train.micro_batch_size=4",
                                                             *overrides])
    cfg.data.sources = [DataSource(path=str(data_dir))]
    return cfg


def test_training_names_a_shard_holding_ids_past_the_vocabulary(tmp_path, tokenizer_model, corpus):
    from pretrain.data import BatchReader, DamagedShardError, build_train_dataset, load_data, split_tokens

    out = tmp_path / "data"
    m = run(corpus, tokenizer_model, out, valid_fraction=0.05)
    cfg = _train_config(out)
    for split in ("train", "valid"):  # same size, ids >= vocab 2048: the preflight size check passes
        binf = out / f"{next(e['prefix'] for e in m['merged'] if e['split'] == split)}.bin"
        tokens = np.fromfile(binf, np.uint16)
        tokens[::16] = 4000  # < the model's 4096: no crash, silently wrong ids
        tokens.tofile(binf)
    data = load_data(cfg)
    reader = BatchReader(build_train_dataset(cfg, data), cfg, 0, 1)
    with pytest.raises(DamagedShardError, match=rf"{out}/merged/train_00000.bin holds token id 4000 .*vocabulary has "
                                            rf"2048 ids: the shard is damaged"):
        reader.micro_batches(0)
    with pytest.raises(DamagedShardError, match=rf"{out}/merged/valid_00000.bin holds token id 4000 \(document 0\)"):
        split_tokens(out, "valid", 1000, data.sources[0].manifest)


def test_training_refuses_data_without_a_validation_window_in_one_line(tmp_path, tokenizer_model, corpus):
    from pretrain.config import ConfigError
    from pretrain.data import load_data

    out = tmp_path / "data"
    run(corpus, tokenizer_model, out, valid_fraction=0.0)
    with pytest.raises(ConfigError, match=r"has 0 valid tokens, fewer than one validation window of seq_length\+1=65: "
                                          r"preprocess into a new --output-dir with --valid-tokens 260"):
        load_data(_train_config(out))
    assert load_data(_train_config(out, "validation.interval=0")).sources  # no validation: fine
