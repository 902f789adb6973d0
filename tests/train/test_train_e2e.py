"""train.py end to end on the tiny config (gloo, 2 ranks, dp=2 ZeRO-2): the loss falls,
metrics.jsonl and the wandb offline run hold the same records, SIGTERM at step k then resume
gives the uninterrupted losses for k+1..n, a mismatched model is refused, a truncated latest
checkpoint falls back to the previous one, and K non-finite losses stop the run."""

from __future__ import annotations

import glob
import json
import math
import shutil
import signal
import struct
import sys
import time
from pathlib import Path

import pytest

from pretrain import checkpoint
from pretrain.parallel import Layout

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, TINY, launch, wait_all  # noqa: E402

STEPS = 30
ARGS = ["--steps", str(STEPS), "--log-interval", "1", "--save-interval", "10", "--zero-stage", "2",
        "train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=3",
        "checkpoint.keep_last=2", "validation.interval=10", "validation.tokens=2048",
        "validation.length_multipliers=[1, 2, 4]"]


def train(run_dir: Path, data: Path, world: int = 2, extra=(), **popen):
    argv = [str(REPO / "pretrain" / "train.py"), "--config", str(TINY), "--data", str(data),
            "--run-dir", str(run_dir), *ARGS, *extra]
    return launch(argv, world, **popen)


def records(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """Last record per step (a resumed run appends)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind", "train") == kind:
            out[r["step"]] = r
    return out


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows of the offline run, read straight from its .wandb file (LevelDB-log framed
    protobuf records, the format `wandb sync` uploads)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, block, pending, rows = Path(path).read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # full record, or last fragment
            record = pb.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind in (2, 3):
            pending += chunk
    return rows


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert wait_all(train(run_dir, tiny_data), timeout=400) == [0, 0]
    return run_dir


@pytest.mark.slow
def test_train_loss_falls_and_metrics_reach_jsonl_and_wandb(uninterrupted):
    rec = records(uninterrupted)
    assert sorted(rec) == list(range(1, STEPS + 1))
    for r in rec.values():
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_mem_gb",
                    "step_time_s"):
            assert math.isfinite(r[key]), (key, r)
    first = sum(rec[s]["loss"] for s in range(1, 6)) / 5
    last = sum(rec[s]["loss"] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - 1.0, f"loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f}"
    for r in rec.values():  # what the run ran on, in every record
        assert [r[k] for k in ("attention_kernel", "device", "precision")] == ["sdpa", "cpu", "fp32"]
    val = records(uninterrupted, "validation")
    assert sorted(val) == [10, 20, 30]
    assert all(math.isfinite(val[30][f"val/ppl_at_{n}"]) for n in (64, 128, 256))
    assert val[30]["val/ppl_at_64"] < val[10]["val/ppl_at_64"]

    history = wandb_history(uninterrupted)
    logged = {int(r["step"]): r for r in history if "loss" in r}
    assert sorted(logged) == sorted(rec)
    for s, r in rec.items():
        assert logged[s]["loss"] == r["loss"] and logged[s]["mfu"] == r["mfu"]
    charts = [r for r in history if "val/ppl_at_128" in r]
    assert [int(r["step"]) for r in charts] == [10, 20, 30]
    assert any(k.startswith("val/extrapolation") for k in charts[-1])  # the one-chart line series


@pytest.mark.slow
def test_train_sigterm_then_resume_matches_uninterrupted(uninterrupted, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    procs = train(run_dir, tiny_data, extra=["--save-interval", "1000"])
    deadline = time.time() + 300
    while time.time() < deadline:  # stop it a few steps in, as SLURM would before the time limit
        if (run_dir / "metrics.jsonl").exists() and max(records(run_dir), default=0) >= 4:
            break
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert wait_all(procs, timeout=300) == [0, 0]
    k = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 4 <= k < STEPS, f"stopped at step {k}"

    assert wait_all(train(run_dir, tiny_data, extra=["--save-interval", "1000"]), timeout=400) == [0, 0]
    ref, got = records(uninterrupted), records(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(k + 1, STEPS + 1):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-6), f"step {s} after resuming at {k}"
        assert got[s]["lr"] == ref[s]["lr"]


@pytest.mark.slow
def test_train_resume_refuses_a_different_model(uninterrupted, tiny_data):
    (proc,) = train(uninterrupted, tiny_data, world=1, extra=["model.num_layers=3"], stderr=-1, text=True)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 2, err
    assert "cannot resume" in err and "model.num_layers: checkpoint has 2, this run 3" in err, err
    assert "layout world_size: checkpoint has 2, this run 1" in err  # every problem listed at once


def test_train_refuses_another_tokenizer(uninterrupted):
    from pretrain.config import load_config

    _, meta = checkpoint.find_checkpoint(uninterrupted)
    cfg = load_config(TINY, ["parallel.zero_stage=2"])
    assert checkpoint.compatibility_errors(meta, cfg, meta["tokenizer"], Layout.of(cfg, 2)) == []
    other = dict(meta["tokenizer"], sha256="0" * 64, path="/elsewhere/tok.model")
    (err,) = checkpoint.compatibility_errors(meta, cfg, other, Layout.of(cfg, 2))
    assert "tokenizer" in err and "/elsewhere/tok.model" in err


def test_train_truncated_latest_falls_back(uninterrupted, tmp_path, capsys):
    kept = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert kept == ["latest", "step_00000020", "step_00000030"]  # keep_last 2, no partial .tmp_* left
    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted / "checkpoints", run_dir / "checkpoints")
    assert checkpoint.find_checkpoint(run_dir)[0].name == "step_00000030"
    shard = run_dir / "checkpoints" / "step_00000030" / "model" / "tp00_pp00.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # a crash mid-copy
    ckpt, meta = checkpoint.find_checkpoint(run_dir)
    assert ckpt.name == "step_00000020" and meta["step"] == 20
    assert "truncated" in capsys.readouterr().out
    cfg, state = checkpoint.load_consolidated(run_dir)
    assert cfg.train.steps == STEPS and state["embedding.word_embeddings.weight"].shape == (4096, 128)


@pytest.mark.slow
def test_train_stops_after_k_nonfinite_losses(tiny_data, tmp_path):
    run_dir = tmp_path / "nan"
    (proc,) = train(run_dir, tiny_data, world=1, stderr=-1, text=True,
                    extra=["optim.lr=1.0e30", "optim.warmup_steps=0", "train.max_bad_steps=3",
                           "validation.interval=0", "wandb.enabled=false", "--zero-stage", "1"])
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 1, err
    assert "3 non-finite losses in a row" in err
    rec = records(run_dir)
    assert math.isfinite(rec[1]["loss"]) and all(math.isnan(rec[s]["loss"]) for s in (2, 3, 4))
    assert max(rec) == 4 and rec[4]["skipped_steps"] == 3
    _, state = checkpoint.load_consolidated(run_dir)  # the stop wrote a checkpoint; skipped steps left it finite
    assert checkpoint.find_checkpoint(run_dir)[1]["step"] == 4
    assert all(bool(v.isfinite().all()) for v in state.values())


def test_train_data_blend_is_deterministic_and_weighted(tiny_data):
    """Two sources (the same shards twice, weights 1:3) through megatron-core's blended builder:
    the requested number of samples, the same samples on every build, drawn ~1:3."""
    import numpy as np

    from pretrain.config import DataSource, load_config
    from pretrain.data import build_train_dataset, load_data

    cfg = load_config(TINY, ["train.steps=50", "train.global_batch_size=8"])
    cfg.data.sources = [DataSource(path=str(tiny_data), weight=1.0), DataSource(path=str(tiny_data), weight=3.0)]
    a, b = build_train_dataset(cfg, load_data(cfg)), build_train_dataset(cfg, load_data(cfg))
    assert len(a) == 400
    for i in (0, 7, 399):
        assert np.array_equal(a[i]["tokens"], b[i]["tokens"]) and a[i]["tokens"].shape == (64,)
    share = np.bincount(a.dataset_index, minlength=2) / len(a)
    assert share[1] == pytest.approx(0.75, abs=0.02)


def test_train_data_with_an_incomplete_shard_is_refused_before_training(tiny_data, tmp_path):
    """A data directory whose merged shard is shorter than its manifest says (an interrupted
    copy) is refused by the preflight data check, naming the file, not read mid-run."""
    from pretrain.config import ConfigError, DataSource, load_config
    from pretrain.data import load_data

    copy = tmp_path / "data"
    shutil.copytree(tiny_data, copy)
    cfg = load_config(TINY)
    cfg.data.sources = [DataSource(path=str(copy))]
    assert load_data(cfg).tokenizer["vocab_size"] == 4096
    (shard,) = sorted((copy / "merged").glob("train_*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])  # one uint16 token short
    with pytest.raises(ConfigError, match=rf"{shard.name} is incomplete \(\d+ bytes, manifest.json says"):
        load_data(cfg)
