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

from helpers import REPO, TINY

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
    from pretrain.layout import Layout
    from pretrain.parallel import init_model_parallel

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
    in meta.json (and meta.json's own hash), as an attacker who can write the directory would:
    only a loader that never unpickles arbitrary objects stands in the way."""
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
    checkpoint.write_meta(ckpt, meta)


def edit_meta(run: Path, at: int, **fields) -> Path:
    """Change fields of a checkpoint's meta.json by hand; returns the checkpoint directory."""
    ckpt = run / "checkpoints" / f"step_{at:08d}"
    meta = dict(json.loads((ckpt / "meta.json").read_text()), **fields)
    (ckpt / "meta.json").write_text(json.dumps(meta, indent=1))
    return ckpt


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
    """A checkpoint written by format-1 code (no meta.json hash beside it) is refused, not skipped."""
    run = copy_run(trained, tmp_path)
    ckpt = edit_meta(run, STEPS, format_version=1)
    (ckpt / checkpoint.META_HASH).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="format 1, this code reads format 2: it needs pickle"):
        checkpoint.scan(run)


@pytest.mark.parametrize("fields", [{"step": 2}, {"consumed_samples": 0}, {"format_version": 3},
                                    {"bad_in_row": 0, "skipped_total": 0}])
def test_an_edited_meta_json_falls_back_to_the_previous_checkpoint(trained, tmp_path, capsys, fields):
    """meta.json edited by hand (step 3 -> 2 would resume step-3 weights at step 2, consumed_samples
    would re-read trained samples, a format flip would block the run): the checkpoint is set aside
    and the previous one used, as for any other damaged file."""
    run = copy_run(trained, tmp_path)
    edit_meta(run, STEPS, **fields)
    ckpt, meta = resume_from(trained[1], run)
    assert ckpt.name == f"step_{STEPS - 1:08d}" and meta["step"] == STEPS - 1
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1 and "meta.json does not match its hash" in out, out
    assert (run / "checkpoints" / f"corrupt_step_{STEPS:08d}").is_dir()


def test_an_implausible_meta_json_is_refused_even_with_its_hash_rewritten(trained, tmp_path):
    """Checked like a config, whatever the hash says: a file entry outside the checkpoint (path
    traversal), a layout of 1e8 tensor-parallel shards (convert would allocate gigabytes), a step
    that is not the directory's."""
    run = copy_run(trained, tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * 10)
    ckpt = run / "checkpoints" / f"step_{STEPS:08d}"
    meta = json.loads((ckpt / "meta.json").read_text())
    outside = {"../../../victim": {"size": 10, "xxh3_128": checkpoint.digest(victim)}}
    cases = [(dict(meta, files={**meta["files"], **outside}), "file entry '../../../victim' lies outside"),
             (dict(meta, files={**meta["files"], str(victim): outside["../../../victim"]}), "lies outside"),
             (dict(meta, layout=dict(meta["layout"], tensor_parallel=10**8, world_size=10**8)),
              "layout.world_size=100000000"),
             (dict(meta, layout=dict(meta["layout"], tensor_parallel=2)), "not a multiple of tensor_parallel"),
             (dict(meta, step=STEPS - 1), f"step={STEPS - 1} in directory step_{STEPS:08d}"),
             (dict(meta, consumed_samples=-8), "consumed_samples=-8")]
    for bad, expected in cases:
        checkpoint.write_meta(ckpt, bad)
        with pytest.raises(checkpoint.CheckpointError, match="meta.json is implausible") as e:
            checkpoint.load_consolidated(ckpt)
        assert expected in str(e.value) and "\n" not in str(e.value)
    assert checkpoint.find_checkpoint(run)[0].name == f"step_{STEPS - 1:08d}"  # the run falls back


def test_a_divergence_retry_keeps_the_last_good_checkpoint(trained, tmp_path, monkeypatch):
    """Step 3 is the newest good checkpoint; a stop for non-finite steps writes step 4, a retry
    that diverges again step 5 (both with bad_in_row > 0): with keep_last=1 step 3 is never pruned
    while the run diverges; once it trains finite steps again (step 6), the usual rule applies."""
    run, trainer = copy_run(trained, tmp_path), trained[1]
    monkeypatch.setattr(trainer.cfg.checkpoint, "keep_last", 1)
    tokenizer = checkpoint.find_checkpoint(run)[1]["tokenizer"]
    names = lambda: sorted(p.name for p in (run / "checkpoints").glob("step_*"))  # noqa: E731
    for step, bad in ((4, 3), (5, 4)):
        checkpoint.save_checkpoint(trainer, run, step, {"bad_in_row": bad}, tokenizer)
        assert names() == ["step_00000003", f"step_{step:08d}"]
        assert checkpoint.last_good(run / "checkpoints").name == "step_00000003"
    checkpoint.save_checkpoint(trainer, run, 6, {"bad_in_row": 0}, tokenizer)
    assert names() == ["step_00000006"]


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


def test_a_full_disk_during_a_save_gives_one_line_and_leaves_no_partial_checkpoint(trained, tmp_path, monkeypatch):
    """ENOSPC while the model shard is written (after DeepSpeed's files): one line naming the
    checkpoint directory and the space needed, the partial .tmp_step_* removed, `latest` and the
    earlier checkpoints untouched, and the next save works."""
    import errno

    run, trainer = copy_run(trained, tmp_path), trained[1]
    tokenizer = checkpoint.find_checkpoint(run)[1]["tokenizer"]
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    write = checkpoint._write_model_shard

    def full_disk(path, tensors, table):
        path.write_bytes(b"\0" * 1000)  # what fitted
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "_write_model_shard", full_disk)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_checkpoint(trainer, run, 4, {}, tokenizer)
    message = str(e.value)
    assert "\n" not in message and f"no space left on the device of {run / 'checkpoints'}" in message, message
    assert "needs about" in message and "(the size of step_00000003)" in message and "GiB are free" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # no .tmp_step_00000004
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003\n"
    monkeypatch.setattr(checkpoint, "_write_model_shard", write)
    checkpoint.save_checkpoint(trainer, run, 4, {}, tokenizer)
    assert checkpoint.find_checkpoint(run)[0].name == "step_00000004"


def test_a_full_disk_while_meta_json_is_written_gives_the_same_line(trained, tmp_path, monkeypatch):
    """ENOSPC at the last write, rank 0's meta.json (every shard written and hashed): the same one
    line, no partial checkpoint, `latest` untouched."""
    import errno

    run, trainer = copy_run(trained, tmp_path), trained[1]
    tokenizer = checkpoint.find_checkpoint(run)[1]["tokenizer"]
    before = sorted(p.name for p in (run / "checkpoints").iterdir())

    def full_disk(ckpt, meta):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(ckpt / "meta.json"))

    monkeypatch.setattr(checkpoint, "write_meta", full_disk)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_checkpoint(trainer, run, 4, {}, tokenizer)
    message = str(e.value)
    assert "\n" not in message and f"no space left on the device of {run / 'checkpoints'}" in message, message
    assert os.strerror(errno.EDQUOT) in message and "(the size of step_00000003)" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003\n"


def test_a_full_disk_when_latest_is_written_keeps_the_complete_checkpoint_and_says_so(trained, tmp_path, monkeypatch):
    """ENOSPC after the rename, at `latest`: the checkpoint is complete, so the line says so (not
    "the partial checkpoint was removed"), and a resume takes it, not the one `latest` named."""
    import errno

    run, trainer = copy_run(trained, tmp_path), trained[1]
    tokenizer = checkpoint.find_checkpoint(run)[1]["tokenizer"]
    write = checkpoint.write_atomic

    def full_disk(path, data):
        if path.name == "latest":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data)

    monkeypatch.setattr(checkpoint, "write_atomic", full_disk)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_checkpoint(trainer, run, 4, {}, tokenizer)
    message = str(e.value)
    assert "\n" not in message and "after step_00000004 was written: it is complete" in message, message
    assert "partial" not in message
    assert checkpoint.find_checkpoint(run)[0].name == "step_00000004"


def test_data_regenerated_in_place_is_in_the_resume_diff(trained, tmp_path, tiny_data, monkeypatch):
    """The same data directory, the same tokenizer, another corpus (preprocess rerun into it):
    the checkpoint's data fingerprint differs, so preflight refuses the resume naming
    data.manifest, and --allow-config-change data accepts it; the unchanged data resumes."""
    from data_prep.preprocess import preprocess
    from pretrain.config import DataSource
    from pretrain.loop import PreflightError, data_errors, fingerprint, preflight
    from pretrain.parallel import DistEnv

    run, trainer = copy_run(trained, tmp_path), trained[1]
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    monkeypatch.setattr(trainer.cfg.data, "sources", [DataSource(path=str(data))])
    tokenizer = checkpoint.find_checkpoint(run)[1]["tokenizer"]
    checkpoint.save_checkpoint(trainer, run, 4, {"data": fingerprint(data_errors(trainer.cfg)[0])}, tokenizer)
    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0)
    assert preflight(trainer.cfg, env, run).changes.accepted == []
    docs = (tiny_data.parent / "corpus" / "default.jsonl").read_text().splitlines()
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(docs[::2]) + "\n")  # half the documents
    shutil.rmtree(data)
    preprocess([str(other)], str(tiny_data.parent / "tok.model"), str(data), workers=1, quiet=True,
               valid_fraction=0.1)
    with pytest.raises(PreflightError) as e:
        preflight(trainer.cfg, env, run)
    assert f"cannot resume {run / 'checkpoints' / 'step_00000004'}: data.manifest: checkpoint has '{data} " \
           "(manifest sha256" in str(e.value) and "regenerated in place" in str(e.value), str(e.value)
    assert "--allow-config-change data.manifest" in str(e.value)
    (line,) = preflight(trainer.cfg, env, run, allow=("data",)).changes.accepted
    assert line.startswith("data.manifest:") and line.endswith("(allowed by --allow-config-change)")
