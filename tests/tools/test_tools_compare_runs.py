"""compare_runs.py run mode on hand-made metrics (hand-computed hours), and wandb offline reading
against metrics.jsonl written alongside it."""

import json
import os
import time

import pytest

from tools.compare_runs import main as compare_main
from tools.runs import compare, read_run, read_wandb_history


def write_run(path, step_time, val, gpus=2, resumed=False):
    """10 steps logged every 2 steps; validation at steps 4 and 10 (val: {step: ppl})."""
    path.mkdir(parents=True)
    lines = []
    for step in range(2, 11, 2):
        lines.append({"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3, "grad_norm": 1.0, "step_time_s": step_time,
                      "tokens_per_s": 1000.0 * gpus, "tokens_per_s_per_gpu": 1000.0, "tflops_per_gpu": 1.0,
                      "mfu": 0.1, "peak_mem_gb": 1.5, "time": 1e9 + step})
        if step in val:
            lines.append({"step": step, "kind": "validation", "val/ppl_at_128": val[step], "val/ppl_at_64": 99.0})
    if resumed:  # steps 6..8 logged again after a restart from the step-4 checkpoint, slower
        lines += [dict(lines[3], step_time_s=2 * step_time)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_time_to_target_is_hand_computable(tmp_path):
    write_run(tmp_path / "a", step_time=36.0, val={4: 30.0, 10: 20.0})   # reaches 25 at step 10
    write_run(tmp_path / "b", step_time=72.0, val={4: 24.0, 10: 22.0}, gpus=1)  # reaches 25 at step 4
    runs = [read_run(tmp_path / "a"), read_run(tmp_path / "b")]
    assert runs[0].gpus == 2 and runs[1].gpus == 1
    target, rows = compare(runs, 128, target=25.0)
    a, b = rows
    assert (a["step_at_target"], b["step_at_target"]) == (10, 4)
    assert a["hours_to_target"] == pytest.approx(10 * 36 / 3600)  # 0.1 h
    assert a["gpu_hours_to_target"] == pytest.approx(0.2)
    assert b["hours_to_target"] == pytest.approx(4 * 72 / 3600)  # 0.08 h on 1 GPU
    assert b["gpu_hours_vs_fastest"] == pytest.approx(1.0) and a["gpu_hours_vs_fastest"] == pytest.approx(2.5)
    default_target, _ = compare(runs, 128)
    assert default_target == 22.0  # the worse of the two best perplexities, reached by both


def test_resumed_step_keeps_its_last_record_and_errors_name_the_lengths(tmp_path):
    write_run(tmp_path / "a", step_time=36.0, val={4: 30.0, 10: 20.0}, resumed=True)
    run = read_run(tmp_path / "a")
    assert [r["step"] for r in run.train] == [2, 4, 6, 8, 10]
    assert run.hours[10] == pytest.approx((8 * 36 + 2 * 72) / 3600)  # step 8 re-logged at 72 s/step
    with pytest.raises(ValueError, match=r"no validation perplexity at 2048 tokens .*val/ppl_at_128"):
        compare([run], 2048)


def test_runs_cli_writes_table_json_and_plot(tmp_path):
    write_run(tmp_path / "alibi", step_time=36.0, val={4: 30.0, 10: 20.0})
    write_run(tmp_path / "sinusoidal", step_time=72.0, val={4: 24.0, 10: 22.0})
    out = tmp_path / "out"
    compare_main(["runs", str(tmp_path / "alibi"), str(tmp_path / "sinusoidal"), "--eval-length", "128",
                  "--output", str(out)])
    data = json.loads((out / "runs.json").read_text())
    assert data["target_ppl"] == 22.0 and [r["name"] for r in data["rows"]] == ["alibi", "sinusoidal"]
    assert "| alibi | 2 | 10 |" in (out / "runs.md").read_text()
    assert (out / "loss_vs_time.png").stat().st_size > 5000


def test_wandb_offline_history_equals_the_logged_records(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = [{"step": s, "loss": 4.0 - 0.01 * s, "step_time_s": 0.5, "blob": "x" * 3000} for s in range(1, 40)]
    rows.append({"step": 39, "kind": "validation", "val/ppl_at_64": 12.5})
    run = wandb.init(project="t", dir=str(tmp_path), mode="offline")
    for r in rows:  # > 32 KiB in all: records span LevelDB-log blocks
        run.log(r)
    run.finish()
    (wandb_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    size = -1
    for _ in range(40):  # wandb-core may still be writing the offline file after finish() returns
        if size == os.path.getsize(wandb_file):
            break
        size = os.path.getsize(wandb_file)
        time.sleep(0.5)
    assert os.path.getsize(wandb_file) > 65536
    got = [{k: v for k, v in h.items() if not k.startswith("_")} for h in read_wandb_history(wandb_file)]
    assert got == rows
    parsed = read_run(tmp_path)  # a run directory with no metrics.jsonl: its wandb offline run
    assert [r["step"] for r in parsed.train] == list(range(1, 40)) and parsed.ppl_at(64) == [(39, 12.5)]
