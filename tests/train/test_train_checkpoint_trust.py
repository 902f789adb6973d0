"""Checkpoints that can be trusted, on one world-1 ZeRO-1 run trained in this process (three
checkpoints, then copies of them corrupted or tampered with): a planted pickle payload in any
checkpoint file runs on neither resume, convert nor eval; same-size corruption of the model,
optimizer or RNG file is detected, the previous checkpoint is used and the good one is not
pruned; `latest` cannot lead outside the run directory; another format is refused; convert
refuses a tokenizer other than the run's; partial checkpoints give one-line tool errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, TINY  # noqa: E402

STEPS = 3
# what resume reads (the optimizer state by global name, our RNG state) and what the tools read
# (our model shard); names without the extension, which changed
RESUME_FILES = ["optim/tp00_pp00_dp00", "rng/rank00000"]
MODEL_FILE = "model/tp00_pp00"


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """(run directory with checkpoints at steps 1, 2, 3; the trainer, to resume into)."""
    from pretrain.config import DataSource, load_config
    from pretrain.data import BatchReader, build_train_dataset, load_data
    from pretrain.engine import Trainer
    from pretrain.parallel import Layout, init_model_parallel

    cfg = load_config(TINY, ["parallel.zero_stage=1", "train.global_batch_size=2", "train.micro_batch_size=2",
                             f"train.steps={STEPS}", f"checkpoint.keep_last={STEPS}"])
    cfg.data.sources = [DataSource(path=str(tiny_data))]
    init_model_parallel(1, 1, seed=cfg.train.seed)
    data = load_data(cfg)
    trainer = Trainer(cfg, Layout.of(cfg, 1))
    reader = BatchReader(build_train_dataset(cfg, data), cfg, 0, 1)
    run = tmp_path_factory.mktemp("trust") / "run"
    for step in range(STEPS):
        trainer.train_step(reader.micro_batches(step), 1e-3)
        checkpoint.save_checkpoint(trainer, run, step + 1, {}, data.tokenizer)
    return run, trainer


def resume_from(trainer, run_dir: Path):
    """resume() on what preflight finds in `run_dir`: (checkpoint directory, meta) or None."""
    return checkpoint.resume(trainer, checkpoint.scan(run_dir))


def copy_run(trained, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    return run


def ckpt_file(run: Path, step: int, stem: str) -> Path:
    (path,) = (run / "checkpoints" / f"step_{step:08d}").glob(stem + ".*")
    return path


def corrupt_same_size(path: Path) -> None:
    """Flip 64 bytes in the middle: a bit-rotted or mis-copied file of the right size."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


class Payload:
    """Unpickling this runs a shell command (what an attacker would plant)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Replace a checkpoint file by a torch.save'd pickle payload and re-record its size and hash
    in meta.json, as an attacker who can write the directory would: only a loader that never
    unpickles arbitrary objects stands in the way."""
    import torch
    import xxhash

    torch.save({"module": Payload(marker), "optimizer_state_dict": Payload(marker)}, path)
    ckpt = next(p for p in path.parents if (p / "meta.json").is_file())
    meta = json.loads((ckpt / "meta.json").read_text())
    rel = str(path.relative_to(ckpt))
    rec = meta["files"][rel]
    if isinstance(rec, dict):
        rec.update(size=path.stat().st_size, xxh3_128=xxhash.xxh3_128(path.read_bytes()).hexdigest())
    else:  # format 1 recorded sizes only
        meta["files"][rel] = path.stat().st_size
    (ckpt / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("stem", RESUME_FILES)
def test_planted_payload_does_not_run_on_resume(trained, tmp_path, stem):
    run, marker = copy_run(trained, tmp_path), tmp_path / "pwned"
    plant(ckpt_file(run, STEPS, stem), marker)
    with pytest.raises(Exception) as e:
        resume_from(trained[1], run)
    assert not marker.exists(), f"a pickle payload in {stem} ran on resume"
    assert isinstance(e.value, checkpoint.CheckpointError), e.value  # refused with a message, not a crash
    assert any(m in str(e.value) for m in ("not an RNG state of ours", "not an optimizer state of ours")), e.value


def test_planted_payloads_do_not_run_on_convert_or_eval(trained, tmp_path):
    from tools.convert_to_hf import convert
    from tools.eval_models import load_model

    import torch

    run, marker = copy_run(trained, tmp_path), tmp_path / "pwned"
    for stem in RESUME_FILES:  # files the tools must not read at all
        plant(ckpt_file(run, STEPS, stem), marker)
    convert(run, tmp_path / "hf")
    assert load_model(run, torch.device("cpu")).train_length == 64
    assert not marker.exists()
    plant(ckpt_file(run, STEPS, MODEL_FILE), marker)  # the file they do read
    for load in (lambda: convert(run / "checkpoints" / f"step_{STEPS:08d}", tmp_path / "hf2"),
                 lambda: load_model(run, torch.device("cpu"))):
        with pytest.raises(Exception) as e:
            load()
        assert not marker.exists(), "a pickle payload in the model shard ran on convert or eval"
        assert isinstance(e.value, checkpoint.CheckpointError) and "not a model shard of ours" in str(e.value)


@pytest.mark.parametrize("stem", RESUME_FILES)
def test_same_size_corruption_falls_back_to_the_previous_checkpoint(trained, tmp_path, capsys, stem):
    run = copy_run(trained, tmp_path)
    corrupt_same_size(ckpt_file(run, STEPS, stem))
    ckpt, meta = resume_from(trained[1], run)
    assert ckpt.name == f"step_{STEPS - 1:08d}" and meta["step"] == STEPS - 1
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1 and stem in out and "corrupted" in out, out
    # set aside, not deleted, and no longer a candidate
    assert (run / "checkpoints" / f"corrupt_step_{STEPS:08d}").is_dir()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [f"step_{s:08d}" for s in (1, 2)]


def test_corrupted_newest_checkpoints_never_get_the_good_one_pruned(trained, tmp_path, capsys, monkeypatch):
    """Steps 2 and 3 corrupted: the run resumes from 1; with keep_last=1 its next checkpoint (step
    2) must survive the pruning (sorting step_* would keep the corrupted step 3 and delete it)."""
    run = copy_run(trained, tmp_path)
    corrupt_same_size(ckpt_file(run, 3, MODEL_FILE))
    corrupt_same_size(ckpt_file(run, 2, RESUME_FILES[1]))
    trainer = trained[1]
    ckpt, meta = resume_from(trainer, run)
    assert meta["step"] == 1 and capsys.readouterr().out.count("WARNING") == 2
    assert (run / "checkpoints" / "step_00000001").is_dir()  # what we resumed from is kept
    monkeypatch.setattr(trainer.cfg.checkpoint, "keep_last", 1)
    checkpoint.save_checkpoint(trainer, run, 2, {}, meta["tokenizer"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "corrupt_step_00000002", "corrupt_step_00000003", "latest", "step_00000002"]
    assert checkpoint.find_checkpoint(run)[0].name == "step_00000002"  # verified: every hash matches


def test_tools_fall_back_from_a_corrupted_model_shard_or_refuse_that_checkpoint(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    corrupt_same_size(ckpt_file(run, STEPS, MODEL_FILE))
    cfg, state = checkpoint.load_consolidated(run)  # the run: its newest good checkpoint, with a warning
    assert "does not match its xxh3_128" in capsys.readouterr().out
    _, good = checkpoint.load_consolidated(trained[0] / "checkpoints" / f"step_{STEPS - 1:08d}")
    assert all(bool((state[k] == good[k]).all()) for k in good)
    with pytest.raises(checkpoint.CheckpointError, match="tp00_pp00.safetensors does not match"):
        checkpoint.load_consolidated(run / "checkpoints" / f"step_{STEPS:08d}")  # that one: refused


def test_latest_outside_the_run_directory_is_refused(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run / "checkpoints" / "step_00000001", elsewhere / "step_00000009")
    (run / "checkpoints" / "latest").write_text("../../elsewhere/step_00000009\n")
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint directory of this run"):
        checkpoint.scan(run)
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint directory of this run"):
        checkpoint.load_consolidated(run)
    (run / "checkpoints" / "latest").write_text("step_00000009\n")  # a link out of the run directory
    (run / "checkpoints" / "step_00000009").symlink_to(elsewhere / "step_00000009")
    with pytest.raises(checkpoint.CheckpointError, match="leads outside"):
        checkpoint.scan(run)


def test_a_checkpoint_of_another_format_is_refused_with_what_to_do(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    meta_path = run / "checkpoints" / f"step_{STEPS:08d}" / "meta.json"
    meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), format_version=1)))
    with pytest.raises(checkpoint.CheckpointError, match="format 1, this code reads format 2: it needs pickle"):
        checkpoint.scan(run)


def test_convert_refuses_a_tokenizer_other_than_the_runs(trained, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    from tools.convert_to_hf import convert

    run = trained[0]
    recorded = Path(checkpoint.find_checkpoint(run)[1]["tokenizer"]["path"])
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(recorded.read_bytes())
    proto.pieces[10].piece, proto.pieces[11].piece = proto.pieces[11].piece, proto.pieces[10].piece
    other = tmp_path / "other.model"  # a working tokenizer that maps two ids to other text
    other.write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match=r"other.model \(sha256 \w+\) is not the tokenizer the run was trained"):
        convert(run, tmp_path / "hf", tokenizer=other)
    assert not (tmp_path / "hf").exists()


def test_partial_or_corrupted_checkpoints_give_one_line_tool_errors(trained, tmp_path, tiny_data):
    from tools.eval_extrapolation import main as eval_main

    run = copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / f"step_{STEPS:08d}"
    ckpt_file(run, STEPS, MODEL_FILE).unlink()  # a partial copy
    expected = f"{ckpt}: model/tp00_pp00.safetensors is truncated or missing"
    out = subprocess.run([sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--checkpoint", str(ckpt),
                          "--output", str(tmp_path / "hf")], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    lines = [x for x in out.stderr.splitlines() if "Warning" not in x and "warn(" not in x and "[WARNING]" not in x]
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"convert_to_hf.py: error: {expected}"), out.stderr
    # eval: the same one-line message (its __main__ prints str(e) exactly as convert's does)
    with pytest.raises(checkpoint.CheckpointError) as e:
        eval_main(["--checkpoint", str(ckpt), "--data", str(tiny_data), "--lengths", "64",
                   "--output", str(tmp_path / "ev")])
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)
