"""Refusals before any work, and kill -9 in the middle then resume: byte-identical output."""

from __future__ import annotations

import json
import os
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
    preprocess(corpus[:1], tokenizer_model, out, workers=1, quiet=True)
    other = train_tokenizer(corpus[:1], 1024, tmp_path / "other", sample_mb=0.2)
    before = shard_bytes(out)
    with pytest.raises(RefusedError, match="another tokenizer"):
        preprocess(corpus[:1], other, out, quiet=True)
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


@pytest.mark.slow
def test_kill_9_then_resume_is_byte_identical(corpus, tokenizer_model, tmp_path):
    big = tmp_path / "big.jsonl"  # ~1 MB: long enough to be killed in the middle
    with open(big, "w") as f:
        for rep in range(5):
            for line in corpus[0].read_text().splitlines():
                d = json.loads(line)
                f.write(json.dumps({"text": f"[copy {rep}] " + d["text"]}) + "\n")
    args = dict(workers=2, valid_fraction=0.05, chunk_mb=0.05)
    cli = [sys.executable, "data_prep/preprocess.py", "--input", str(big), "--tokenizer", str(tokenizer_model),
           "--output-dir", str(tmp_path / "killed"), "--workers", "2", "--valid-fraction", "0.05",
           "--chunk-mb", "0.05", "--quiet"]
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
