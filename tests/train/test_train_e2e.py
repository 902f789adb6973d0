"""train.py end to end on the tiny config (gloo, 2 ranks, dp=2 ZeRO-2): the loss falls,
metrics.jsonl and the wandb offline run hold the same records, a second trainer on the run
directory is refused while the first finishes, SIGTERM at step k then resume gives the
uninterrupted losses for k+1..n, a mismatched model is refused, a changed seq_length or global
batch is refused with the diff and accepted with --allow-config-change (past a stale lock, with
the console telling what happened), a truncated latest checkpoint falls back to the previous
one, and K non-finite losses stop the run."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain import checkpoint
from pretrain.layout import Layout
from pretrain.resume import resume_changes
from pretrain.rundir import RunDir

from helpers import REPO, TINY, hold_lock_then_kill9, launch, wait_all

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
    return {r["step"]: r for r in RunDir(run_dir).records() if r.get("kind", "train") == kind}


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
def run_and_intruder(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted run, and what became of a second trainer started on the same run
    directory once the first held it (the first is paused meanwhile with SIGSTOP, so that the two
    overlap however loaded the machine is)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    procs = train(run_dir, tiny_data)
    lock, metrics, deadline = RunDir(run_dir).lock_file, RunDir(run_dir).metrics, time.time() + 300
    while not (lock.is_file() and lock.read_text().strip()) and not (metrics.is_file() and metrics.stat().st_size):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the first trainer did not start"
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    try:
        t0 = time.time()
        second = train(run_dir, tiny_data, stderr=subprocess.PIPE, text=True)
        errors = [p.communicate(timeout=300)[1] for p in second]
        intruder = {"codes": [p.returncode for p in second], "stderr": errors, "seconds": time.time() - t0,
                    "holder_pid": procs[0].pid}
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
    assert wait_all(procs, timeout=400) == [0, 0]
    return run_dir, intruder


@pytest.fixture(scope="module")
def uninterrupted(run_and_intruder) -> Path:
    return run_and_intruder[0]


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
def test_train_second_trainer_on_a_locked_run_dir_is_refused_while_the_first_finishes(run_and_intruder):
    run_dir, intruder = run_and_intruder
    assert intruder["codes"] == [2, 2], intruder["stderr"]
    holder = f"host {socket.gethostname()} pid {intruder['holder_pid']} since "
    for err in intruder["stderr"]:  # both ranks, one line naming the holder
        assert f"train.py: cannot start: run directory {run_dir} is in use by another trainer ({holder}" in err, err
    assert intruder["seconds"] < 120  # refused in preflight: no process group, nothing trained or written
    rows = RunDir(run_dir).records()
    assert [r["step"] for r in rows if "kind" not in r] == list(range(1, STEPS + 1))  # every step logged once
    assert [r["step"] for r in rows if r.get("kind") == "validation"] == [10, 20, 30]


@pytest.mark.slow
def test_train_sigterm_then_resume_matches_uninterrupted(uninterrupted, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    procs = train(run_dir, tiny_data, extra=["--save-interval", "1000"])
    deadline = time.time() + 300
    while time.time() < deadline:  # stop it a few steps in, as SLURM would before the time limit
        if max(records(run_dir), default=0) >= 4:
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
    (proc,) = train(uninterrupted, tiny_data, world=1, extra=["model.num_layers=3", "train.seed=7"], stderr=-1,
                    text=True)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 2, err
    assert "cannot resume" in err and "model.num_layers: checkpoint has 2, this run 3" in err, err
    assert "train.seed: checkpoint has 1234, this run 7" in err  # every problem listed at once
    assert "world" not in err  # another world size is a layout change, resharded (test_train_elastic.py)


@pytest.mark.slow
def test_train_resume_with_another_seq_length_or_batch_is_refused_then_allowed(uninterrupted, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir, ignore=shutil.ignore_patterns("wandb"))
    shutil.rmtree(run_dir / "checkpoints" / "step_00000030")  # continue from step 20
    (run_dir / "checkpoints" / "latest").write_text("step_00000020\n")
    changed = ["train.global_batch_size=16", "--seq-length", "32"]
    procs = train(run_dir, tiny_data, extra=changed, stderr=subprocess.PIPE, text=True)
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errors
    for needle in ("model.seq_length: checkpoint has 64, this run 32", "--allow-config-change model.seq_length",
                   "train.global_batch_size: checkpoint has 8, this run 16",
                   "--allow-config-change train.global_batch_size"):
        assert needle in errors[0], errors[0]
    assert "checkpoint.save_interval" not in errors[0]  # harmless changes are not refused

    dead = hold_lock_then_kill9(run_dir)  # a trainer killed with SIGKILL left its lock file behind
    procs = train(run_dir, tiny_data, stdout=subprocess.PIPE, text=True,
                  extra=changed + ["--allow-config-change", "model.seq_length", "train.global_batch_size"])
    out = procs[0].communicate(timeout=400)[0]
    assert wait_all(procs, timeout=60) == [0, 0], out
    assert f"pid {dead} " not in (run_dir / "run.lock").read_text()
    ckpts = run_dir / "checkpoints"
    for needle in (f"resumed from {ckpts}/step_00000020 at step 20",
                   "config change: model.seq_length: checkpoint has 64, this run 32 (allowed by --allow-config-change)",
                   "config change: train.global_batch_size: checkpoint has 8, this run 16 (allowed",
                   f"config history: {run_dir}/config.step_00000020.yaml",
                   f"step 30: checkpoint {ckpts}/step_00000030",
                   "summary: steps 20 -> 30 of 30 (10 this start, 5,120 tokens",  # 10 x 16 x 32
                   f"last checkpoint: {ckpts}/step_00000030", "best validation perplexity: "):
        assert needle in out, (needle, out)
    val = records(run_dir, "validation")[30]
    assert f"step 30: validation perplexity {val['val/ppl_at_32']:.3f} at 32, {val['val/ppl_at_64']:.3f} at 64" in out
    meta = checkpoint.find_checkpoint(run_dir)[1]
    assert meta["consumed_samples"] == 20 * 8 + 10 * 16  # the data goes on from the next unread sample
    assert meta["config"]["model"]["seq_length"] == 32


def test_train_refuses_another_tokenizer(uninterrupted):
    from pretrain.config import Config, from_dict

    _, meta = checkpoint.find_checkpoint(uninterrupted)
    cfg = from_dict(Config, meta["config"])  # the run's own config: only the tokenizer differs
    assert resume_changes(meta, cfg, meta["tokenizer"], Layout.of(cfg, 2)).refused == []
    other = dict(meta["tokenizer"], sha256="0" * 64, path="/elsewhere/tok.model")
    (err,) = resume_changes(meta, cfg, other, Layout.of(cfg, 2)).refused
    assert "tokenizer" in err and "/elsewhere/tok.model" in err


def test_train_truncated_latest_falls_back(uninterrupted, tmp_path, capsys):
    kept = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert kept == ["latest", "step_00000020", "step_00000030"]  # keep_last 2, no partial .tmp_* left
    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted / "checkpoints", run_dir / "checkpoints")
    assert checkpoint.find_checkpoint(run_dir)[0].name == "step_00000030"
    shard = run_dir / "checkpoints" / "step_00000030" / "model" / "tp00_pp00.safetensors"
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


def test_train_data_directory_is_only_read(tiny_data, tmp_path):
    """Building the training samples writes nothing into the data directory: megatron-core's
    default index cache (<prefix>/cache/, keyed by path and settings, not contents) would outlive
    data regenerated in place, fail on read-only data, and make the shards directory differ from
    a fresh preprocess of the same inputs."""
    import shutil

    from pretrain.config import DataSource, load_config
    from pretrain.data import build_train_dataset, load_data

    data = shutil.copytree(tiny_data, tmp_path / "data")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    cfg = load_config(TINY, ["train.steps=20", "train.global_batch_size=8"])
    cfg.data.sources = [DataSource(path=str(data), weight=1.0)]
    assert len(build_train_dataset(cfg, load_data(cfg))) >= 160  # whole epochs of one source
    cfg.data.sources = [DataSource(path=str(data), weight=1.0), DataSource(path=str(data), weight=3.0)]
    assert len(build_train_dataset(cfg, load_data(cfg))) == 160  # the blended dataset's own index too
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


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


def test_a_second_ctrl_c_exits_at_once_without_a_traceback():
    """The stop handler as train.py installs it: a first SIGINT is a stop request (the loop
    checkpoints at the next step boundary), a second ends the process at once with 130."""
    code = ("import time\nfrom pretrain.stop import StopRequest\ns = StopRequest()\nprint('ready', flush=True)\n"
            "while not s.signum:\n    time.sleep(0.01)\nprint('stop requested', s.signum, flush=True)\n"
            "time.sleep(300)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    assert p.stdout.readline().startswith("Ctrl-C: checkpoint at the next step boundary")
    assert p.stdout.readline().strip() == f"stop requested {int(signal.SIGINT)}"
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and err == "second Ctrl-C: exiting now, without a checkpoint\n", err


@pytest.mark.slow
def test_train_ctrl_c_checkpoints_at_the_next_step_and_exits_0(tiny_data, tmp_path):
    run_dir, log = tmp_path / "int", tmp_path / "train.log"
    with open(log, "w") as out:
        (proc,) = train(run_dir, tiny_data, world=1, stdout=out, stderr=subprocess.STDOUT,
                        extra=["validation.interval=0", "wandb.enabled=false", "--save-interval", "1000",
                               "--zero-stage", "1"])
        deadline = time.time() + 300
        while not max(records(run_dir), default=0) >= 2:
            assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert wait_all([proc], timeout=300) == [0], log.read_text()[-3000:]
    text = log.read_text()
    k = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= k < STEPS and f"signal SIGINT: checkpoint at step {k} written, exiting 0" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


@pytest.mark.slow
def test_train_divergence_retry_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    """A good run to step 4 (keep_last=1); a resume with a far too high LR diverges (non-finite
    from step 6: checkpoints at 6 and, at the stop, 7); a retry with the same LR stops at 8. Only
    the diverged checkpoints rotate: step_4 survives both, and every message names it."""
    run_dir = tmp_path / "div"
    common = ["validation.interval=0", "wandb.enabled=false", "checkpoint.keep_last=1", "train.max_bad_steps=2"]
    flags = ["--save-interval", "2", "--zero-stage", "1"]
    (proc,) = train(run_dir, tiny_data, world=1, extra=[*common, *flags, "--steps", "4"])
    assert wait_all([proc], timeout=400) == [0]
    bad_lr = ["optim.lr=1.0e30", "optim.warmup_steps=0"]
    good = run_dir / "checkpoints" / "step_00000004"
    for stop in (7, 8):  # the divergence, then the retry
        (proc,) = train(run_dir, tiny_data, world=1, stdout=-1, stderr=-1, text=True,
                        extra=[*common, *bad_lr, *flags, "--steps", "12", "--allow-config-change", "optim",
                               "train.steps"])
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 1 and f"non-finite losses in a row (train.max_bad_steps=2) at step {stop}" in err
        assert f"the last good checkpoint (before the non-finite losses) is {good}" in err, err
        assert f"step {stop}: checkpoint step_{stop:08d} was written while diverging" in out, out
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [good.name, f"step_{stop:08d}"]
    rec = records(run_dir)
    assert all(math.isfinite(rec[s]["loss"]) for s in range(1, 6)) and math.isnan(rec[6]["loss"])
