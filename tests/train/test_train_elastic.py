"""Elastic resume (gloo): a tiny run trained by train.py at (tp 1, pp 1, dp 2, ZeRO-1) with a
checkpoint mid-run resumes at (tp 2, dp 1, ZeRO-0), at (pp 2, dp 1, ZeRO-1) and, through
train.py, at (dp 1, ZeRO-0, another micro-batch): each continues with the uninterrupted run's
losses within 1e-4 relative, for ALiBi and for T5's learned bias; every global parameter's fp32
master and both Adam moments, as the new layout holds them after the reshard (read from torch's
own AdamW state at ZeRO-0, through DeepSpeed's fragment API at ZeRO-1), equal the ones the
original run held at the checkpoint, exactly; the console and `--dry-run` show the layout change."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_consolidated
from pretrain.rundir import RunDir

from helpers import REPO, launch, wait_all

WORKER = str(REPO / "tests" / "train" / "elastic_worker.py")
STEPS, MID = 6, 3
OVERRIDES = [f"train.steps={STEPS}", "train.log_interval=1", f"checkpoint.save_interval={MID}",
             "checkpoint.keep_last=2", "train.global_batch_size=4", "train.micro_batch_size=1",
             "parallel.zero_stage=1", "optim.warmup_steps=1", "validation.interval=0"]
POSITIONS = ("alibi", "t5")
RESHARDS = {"tp2": "2,1,0,1", "pp2": "1,2,1,1"}  # worker layouts: tp,pp,zero,micro on 2 ranks
OLD = "world 2 = tp 1 x pp 1 x dp 2, ZeRO-1, micro-batch 1"


def config(position: str) -> str:
    return str(REPO / "configs" / f"tiny_{position}.yaml")


def train_cli(position: str, run_dir: Path, data: Path, world: int, extra=(), **popen):
    """train.py on `world` ranks; a flag in `extra` replaces the override of its key (giving both is refused)."""
    flagged = {"--zero-stage": "parallel.zero_stage=", "--micro-batch": "train.micro_batch_size="}
    dropped = tuple(flagged[f] for f in extra if f in flagged)
    argv = [str(REPO / "pretrain" / "train.py"), "--config", config(position), "--data", str(data),
            "--run-dir", str(run_dir), *(o for o in OVERRIDES if not o.startswith(dropped)), *extra]
    return launch(argv, world, **popen)


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in RunDir(run_dir).records() if r.get("kind", "train") == "train"}


def losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in records(run_dir).items()}


def stopped_at_mid(trained: Path, to: Path) -> Path:
    """A copy of the run as it was after its mid-run checkpoint (the later one removed), without
    its metrics: what the resumed run logs is all there is."""
    shutil.copytree(trained, to, ignore=shutil.ignore_patterns("wandb", "run.lock", "metrics.jsonl"))
    shutil.rmtree(to / "checkpoints" / f"step_{STEPS:08d}")
    (to / "checkpoints" / "latest").write_text(f"step_{MID:08d}\n")
    return to


def merged(paths: list[Path]) -> tuple[dict[str, torch.Tensor], set[int]]:
    """{key/global name: full tensor} from optim/ or moments files (TP parts concatenated along the
    partition dim in their metadata), and the Adam steps they record."""
    from safetensors import safe_open

    parts: dict[str, dict[int, torch.Tensor]] = {}
    dims, steps = {}, set()
    for path in paths:
        tp_rank = int(path.name.split("tp")[1].split("_")[0])
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata()
            table = json.loads(meta["table"])
            steps.add(int(meta["adam_step"]))
            for key in f.keys():
                name = key.split("/", 1)[1]
                rec = table[name]
                dims[key] = rec["partition_dim"] if isinstance(rec, dict) else rec
                parts.setdefault(key, {})[tp_rank] = f.get_tensor(key)
    out = {}
    for key, by_rank in parts.items():
        out[key] = by_rank[0] if dims[key] is None else torch.cat([by_rank[r] for r in sorted(by_rank)], dims[key])
    return out, steps


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted (tp 1, pp 1, dp 2) runs, one per position method, trained side by side."""
    root = tmp_path_factory.mktemp("elastic")
    runs = {position: root / position for position in POSITIONS}
    procs = [p for position, run in runs.items() for p in train_cli(position, run, tiny_data, 2)]
    assert wait_all(procs, timeout=600) == [0] * len(procs)
    return runs


@pytest.mark.slow
def test_resume_on_other_layouts_continues_the_run(trained, tiny_data, tmp_path):
    copies = {(position, name): stopped_at_mid(trained[position], tmp_path / f"{position}_{name}")
              for position in POSITIONS for name in (*RESHARDS, "dp1")}
    jobs = [f"{config(position)}@{spec}={copies[position, name]}" for position in POSITIONS
            for name, spec in RESHARDS.items()]
    procs = launch([WORKER, str(tiny_data), json.dumps(OVERRIDES), *jobs], 2)  # one process group for all
    # dp 1 through train.py: ZeRO-0 and micro-batch 2 (accumulation 4 -> 2, the same global batch)
    cli = {position: train_cli(position, copies[position, "dp1"], tiny_data, 1, stdout=subprocess.PIPE, text=True,
                               extra=["--zero-stage", "0", "--micro-batch", "2"])[0] for position in POSITIONS}
    outs = {position: p.communicate(timeout=900)[0] for position, p in cli.items()}
    assert wait_all(procs + list(cli.values()), timeout=900) == [0] * (len(procs) + len(cli)), outs

    for position in POSITIONS:
        ref = losses(trained[position])
        assert sorted(ref) == list(range(1, STEPS + 1)) and ref[STEPS] < ref[1] - 0.3, ref
        ckpt = trained[position] / "checkpoints"  # the original run's state at MID ...
        original, steps = merged(sorted((ckpt / f"step_{MID:08d}" / "optim").glob("*.safetensors")))
        _, model = load_consolidated(ckpt / f"step_{MID:08d}")
        assert steps == {MID} and set(original) == {f"{k}/{n}" for k in ("fp32", "exp_avg", "exp_avg_sq") for n in model}
        for n, weight in model.items():  # fp32 run: the master is the model's weight
            assert torch.equal(original[f"fp32/{n}"], weight), n
        for name, spec in RESHARDS.items():
            run = copies[position, name]
            got = json.loads((run / "elastic.json").read_text())
            new = spec.split(",")
            assert got["layout"] == (f"{OLD} -> world 2 = tp {new[0]} x pp {new[1]} x dp 1, ZeRO-{new[2]}, "
                                     f"micro-batch {new[3]}"), got["layout"]
            for step, loss in got["losses"].items():
                assert loss == pytest.approx(ref[int(step)], rel=1e-4), f"{position} {name} step {step}: {got}"
            assert sorted(map(int, got["losses"])) == list(range(MID + 1, STEPS + 1))
            # ... equals what the new layout holds after the reshard, every parameter, exactly
            held, held_steps = merged(sorted(run.glob("moments_*.safetensors")))
            assert held_steps == {MID} and set(held) == set(original), sorted(set(held) ^ set(original))
            for key in original:
                assert torch.equal(held[key], original[key]), f"{position} {name}: {key}"
        run = copies[position, "dp1"]
        assert (f"layout change: {OLD} -> world 1 = tp 1 x pp 1 x dp 1, ZeRO-0, micro-batch 2 (model and optimizer "
                "state resharded)") in outs[position], outs[position]
        got, ref_rows = records(run), records(trained[position])
        assert sorted(got) == list(range(MID + 1, STEPS + 1)), sorted(got)
        for step in range(MID + 1, STEPS + 1):
            assert got[step]["loss"] == pytest.approx(ref[step], rel=1e-4), f"{position} dp1 step {step}: {got}"
            for key in ("lr", "consumed_samples"):  # the schedule and the data position go on
                assert got[step][key] == ref_rows[step][key], (position, step, key)


@pytest.mark.slow
def test_dry_run_of_a_resume_shows_the_layout_change_and_memory(trained, tiny_data, capsys):
    from pretrain.train import main

    run = trained["alibi"]
    assert main(["--config", config("alibi"), "--data", str(tiny_data), "--run-dir", str(run), *OVERRIDES,
                 "--tp", "2", "--dry-run", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"layout change: {OLD} -> world 4 = tp 2 x pp 1 x dp 2, ZeRO-1, micro-batch 1" in out, out
    assert f"would resume {run / 'checkpoints' / f'step_{STEPS:08d}'} at step {STEPS}" in out, out
    assert "world 4 = tp 2 x pp 1 x dp 2" in out and "total" in out, out  # the memory table at the new layout


def test_layout_changes_are_accepted_and_maths_changes_refused():
    from pretrain import reshard
    from pretrain.resume import resume_changes
    from pretrain.config import load_config, to_dict
    from pretrain.layout import Layout

    def cfg_of(*overrides):
        return load_config(config("alibi"), [*OVERRIDES, *overrides])

    old = cfg_of()
    tok = {"path": "tok.model", "sha256": "ab"}
    meta = {"config": to_dict(old), "tokenizer": tok, "layout": reshard.layout_record(Layout.of(old, 2), old),
            "files": {"optim/tp00_pp00_dp00.safetensors": {}, "model/tp00_pp00.safetensors": {}}}
    for overrides, world, new in [((), 1, "world 1 = tp 1 x pp 1 x dp 1, ZeRO-1, micro-batch 1"),
                                  (("parallel.tensor_parallel=2",), 2, "world 2 = tp 2 x pp 1 x dp 1, ZeRO-1, micro-batch 1"),
                                  (("parallel.pipeline_parallel=2", "parallel.zero_stage=0"), 4,
                                   "world 4 = tp 1 x pp 2 x dp 2, ZeRO-0, micro-batch 1"),
                                  (("train.micro_batch_size=2",), 2, "world 2 = tp 1 x pp 1 x dp 2, ZeRO-1, micro-batch 2")]:
        cfg = cfg_of(*overrides)
        changes = resume_changes(meta, cfg, tok, Layout.of(cfg, world))
        assert changes.refused == [] and changes.accepted == [], changes
        assert changes.layout == f"{OLD} -> {new}"
    same = resume_changes(meta, old, tok, Layout.of(old, 2))
    assert same.layout == "" and same.refused == []

    # what changes the maths stays refused, with or without a layout change
    cfg = cfg_of("train.precision=bf16", "train.global_batch_size=8", "parallel.tensor_parallel=2")
    refused = resume_changes(meta, cfg, tok, Layout.of(cfg, 2)).refused
    assert any(r.startswith("train.precision: checkpoint has 'auto', this run 'bf16'") for r in refused), refused
    assert any(r.startswith("train.global_batch_size: checkpoint has 4, this run 8") for r in refused), refused
    # regrouping micro-batches reweights masked tokens; older checkpoints are sharded by layout
    cfg = cfg_of("data.eod_mask_loss=true", "train.micro_batch_size=2")
    meta_eod = dict(meta, config=to_dict(cfg_of("data.eod_mask_loss=true")))
    (problem,) = resume_changes(meta_eod, cfg, tok, Layout.of(cfg, 2)).refused
    assert problem.startswith("train.micro_batch_size: checkpoint has 1, this run 2 with data.eod_mask_loss=true")
    assert resume_changes(meta_eod, cfg, tok, Layout.of(cfg, 2), allow=("train.micro_batch_size",)).refused == []
    older = dict(meta, files={"ds/mp_rank_00_model_states.pt": {}, "model/tp00_pp00.safetensors": {}})
    (problem,) = resume_changes(older, old, tok, Layout.of(old, 1)).refused
    assert "written before elastic resume" in problem and "resume it on its own layout once" in problem
    assert resume_changes(older, old, tok, Layout.of(old, 2)).refused == []
