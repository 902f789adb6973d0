"""Refusals before any work, and kill -9 in the middle then resume: byte-identical output."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.pipeline import RefusedError
from data_prep.preprocess import preprocess
from data_prep.train_tokenizer import train_tokenizer

from .conftest import shard_bytes

REPO = Path(__file__).resolve().parents[2]


def test_refusals(corpus, tokenizer_model, tmp_path):
    with pytest.raises(RefusedError, match="does not exist; train one"):
        preprocess(corpus, tmp_path / "nope.model", tmp_path / "o1", quiet=True)
    junk = tmp_path / "junk.model"
    junk.write_text("not a model")
    with pytest.raises(RefusedError, match="cannot load tokenizer"):
        preprocess(corpus, junk, tmp_path / "o0", quiet=True)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(RefusedError, match="cannot write to output directory"):
        preprocess(corpus, tokenizer_model, blocker / "out", quiet=True)
    out = tmp_path / "o2"
    preprocess(corpus[:1], tokenizer_model, out, workers=1, valid_fraction=0.0, quiet=True)
    other = train_tokenizer(corpus[:1], 1024, tmp_path / "other", sample_mb=0.2)
    before = shard_bytes(out)
    with pytest.raises(RefusedError, match="another tokenizer"):
        preprocess(corpus[:1], other, out, valid_fraction=0.0, quiet=True)
    with pytest.raises(RefusedError, match="different settings"):
        preprocess(corpus[:1], tokenizer_model, out, valid_fraction=0.5, quiet=True)
    assert shard_bytes(out) == before  # nothing touched
    stray = tmp_path / "o3"
    (stray / "shards").mkdir(parents=True)
    (stray / "shards" / "x.bin").write_bytes(b"")
    with pytest.raises(RefusedError, match="did not plan"):
        preprocess(corpus[:1], tokenizer_model, stray, quiet=True)
    r = subprocess.run([sys.executable, "data_prep/preprocess.py", "--input", str(corpus[0]), "--tokenizer",
                        str(tmp_path / "nope.model"), "--output-dir", str(tmp_path / "o4")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "refused" in r.stderr and "train_tokenizer.py" in r.stderr


def big_input(corpus, path: Path, copies: int) -> Path:
    """Copies of the first corpus file's documents, each copy tagged (~0.2 MB per copy)."""
    with open(path, "w") as f:
        for rep in range(copies):
            for line in corpus[0].read_text().splitlines():
                d = json.loads(line)
                f.write(json.dumps({"text": f"[copy {rep}] " + d["text"]}) + "\n")
    return path


@pytest.mark.slow
def test_kill_9_then_resume_is_byte_identical(corpus, tokenizer_model, tmp_path):
    big = big_input(corpus, tmp_path / "big.jsonl", 5)  # ~1 MB: long enough to be killed in the middle
    args = dict(workers=2, valid_fraction=0.05, chunk_mb=0.05)
    cli = [sys.executable, "data_prep/preprocess.py", "--input", str(big), "--tokenizer", str(tokenizer_model),
           "--output-dir", str(tmp_path / "killed"), "--workers", "2", "--valid-fraction", "0.05",
           "--chunk-mb", "0.05", "--encoder", "sentencepiece", "--quiet"]
    proc = subprocess.Popen(cli, cwd=REPO, start_new_session=True)
    done_dir = tmp_path / "killed" / ".work" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # coordinator and workers, like a node failure
    proc.wait()
    n_done = len(list(done_dir.glob("*.json")))
    shards = sorted((tmp_path / "killed" / "shards").iterdir())
    assert 3 <= n_done < 30
    # a complete-looking chunk whose shard was damaged is redone, never trusted
    victim = next(p for p in shards if p.suffix == ".bin" and ".tmp" not in p.name)
    victim.write_bytes(victim.read_bytes()[:-2])
    m = preprocess([big], tokenizer_model, tmp_path / "killed", quiet=True, **args)
    assert 0 < m["run"]["chunks_resumed"] < m["run"]["chunks"]
    ref = preprocess([big], tokenizer_model, tmp_path / "ref", quiet=True, **dict(args, workers=1))
    assert shard_bytes(tmp_path / "killed") == shard_bytes(tmp_path / "ref")
    assert not list((tmp_path / "killed" / "shards").glob("*.tmp*"))
    assert m["splits"] == ref["splits"]


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_is_refused(corpus, tokenizer_model, tmp_path):
    big = big_input(corpus, tmp_path / "big.jsonl", 10)
    cli = [sys.executable, "data_prep/preprocess.py", "--input", str(big), "--tokenizer", str(tokenizer_model),
           "--output-dir", str(tmp_path / "out"), "--workers", "1", "--encoder", "sentencepiece", "--valid-fraction",
           "0", "--quiet"]
    first = subprocess.Popen(cli, cwd=REPO, stderr=subprocess.PIPE, text=True)
    lock, deadline = tmp_path / "out" / ".work" / "lock", time.time() + 60
    while not (lock.exists() and lock.read_text()) and time.time() < deadline and first.poll() is None:
        time.sleep(0.02)  # until the first run holds the directory
    second = subprocess.run(cli, cwd=REPO, capture_output=True, text=True)
    assert first.poll() is None, "the first run ended before the second started"
    assert second.returncode == 2, second.stderr
    assert f"in use by another preprocess run (pid {first.pid} on" in second.stderr
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert first.wait() == 0, first.stderr.read()
    assert preprocess([big], tokenizer_model, tmp_path / "out", workers=1, valid_fraction=0.0,
                      quiet=True)["run"]["bytes"] == 0


def test_torn_state_files_are_redone_not_trusted(corpus, tokenizer_model, tmp_path):
    args = dict(workers=1, valid_fraction=0.05, chunk_mb=0.05, quiet=True)
    preprocess(corpus, tokenizer_model, tmp_path / "ref", **args)
    out = tmp_path / "out"
    preprocess(corpus, tokenizer_model, out, **args)
    plan = out / ".work" / "plan.json"
    plan.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])  # as a crash or a full disk left it
    done = sorted((out / ".work" / "done").glob("*.json"))
    done[3].write_bytes(done[3].read_bytes()[:10])
    m = preprocess(corpus, tokenizer_model, out, **args)
    assert m["run"]["chunks_resumed"] == m["run"]["chunks"] - 1  # only the torn chunk is redone
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")
    assert json.loads(plan.read_text())["tokenizer_sha256"] == m["tokenizer"]["sha256"]


_FULL_DISK = """
import errno, sys
from data_prep.worker import indexed_dataset
builder, calls = indexed_dataset().IndexedDatasetBuilder, []
real = builder.add_document
def add_document(self, *args, **kwargs):  # the disk fills up after 40 documents
    calls.append(1)
    if len(calls) > 40:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, *args, **kwargs)
builder.add_document = add_document
from data_prep.preprocess import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_full_disk_says_how_much_space_is_needed_and_the_rerun_resumes(corpus, tokenizer_model, tmp_path):
    args = dict(workers=1, valid_fraction=0.05, chunk_mb=0.05, quiet=True)
    ref = preprocess(corpus, tokenizer_model, tmp_path / "ref", **args)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, "--input", *map(str, corpus), "--tokenizer",
                        str(tokenizer_model), "--output-dir", str(out), "--workers", "1", "--valid-fraction", "0.05",
                        "--chunk-mb", "0.05", "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"no space left on device for {out}" in r.stderr and " must be free there" in r.stderr
    assert re.search(r"about \d+\.\d+ [MG]B must be free", r.stderr)
    assert not list(out.glob("*/*.tmp*"))  # the partial shards were removed at once
    m = preprocess(corpus, tokenizer_model, out, **args)
    assert 0 < m["run"]["chunks_resumed"] < m["run"]["chunks"]
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref") and m["splits"] == ref["splits"]
