"""Config input that used to win silently (issue 18, item 19): a key given twice in a YAML file,
a flag and an override of the same key, and a resume with a new train.steps, whose LR jump the
resume diff now states (checked against pretrain.schedule.lr_at)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config, to_dict
from pretrain.layout import Layout
from pretrain.schedule import lr_at
from pretrain.train import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_alibi.yaml"


def test_a_key_given_twice_in_a_config_file_is_refused_with_both_lines(tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text(TINY.read_text() + "\ntrain:\n  steps: 7\n")  # a second train: section at the end
    with pytest.raises(ConfigError, match=r"twice.yaml:\d+:1: .*duplicate key 'train' \(also on line \d+\)"):
        load_config(path)
    path.write_text("optim:\n  lr: 1.0e-3\n  warmup_steps: 5\n  lr: 1.0e-4\n")
    assert main(["--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:4:3: " in err and "duplicate key 'lr' (also on line 2)" in err, err
    with pytest.raises(ConfigError, match="duplicate key 'a'"):  # in an override's value too
        load_config(TINY, ["data.sources=[{path: x, a: 1, a: 2}]"])


def test_yaml_merge_keys_still_override_as_yaml_defines():
    optim = load_config(TINY, ["optim={<<: {lr: 1.0e-3, min_lr: 2.0e-5}, lr: 2.0e-3}"]).optim
    assert (optim.lr, optim.min_lr) == (2.0e-3, 2.0e-5)  # the explicit key wins over the merged one: no duplicate


def test_a_flag_and_an_override_of_one_key_are_refused(capsys):
    assert main(["--config", str(TINY), "--dry-run", "--steps", "10", "train.steps=1e12x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps 10 and the override 'train.steps=1e12x' both set train.steps: give one" in err
    assert main(["--config", str(TINY), "--dry-run", "--steps", "10"]) == 0  # either alone is fine
    assert main(["--config", str(TINY), "--dry-run", "train.steps=10"]) == 0


def test_resume_diff_states_the_lr_jump_of_a_new_train_steps():
    from pretrain.resume import resume_changes
    from pretrain.reshard import layout_record

    old = load_config(TINY, ["train.steps=100", "optim.warmup_steps=10"])
    new = load_config(TINY, ["train.steps=200", "optim.warmup_steps=10"])
    meta = {"config": to_dict(old), "step": 100, "tokenizer": {"sha256": "t"},
            "layout": layout_record(Layout.of(old, 1), old)}
    changes = resume_changes(meta, new, {"sha256": "t"}, Layout.of(new, 1), ("train.steps",))
    before, after = lr_at(100, old.optim, 100), lr_at(100, new.optim, 200)
    assert before == old.optim.min_lr and after > 5 * before  # the finished cosine starts again from its middle
    (line,) = changes.accepted
    assert line.startswith("train.steps: checkpoint has 100, this run 200; the LR schedule is laid out again over "
                           f"200 steps: at step 100 the LR jumps from {before:.3g} to {after:.3g}; set "
                           "optim.decay_steps=100 as well")
    refused = resume_changes(meta, new, {"sha256": "t"}, Layout.of(new, 1))
    assert "the LR jumps" in refused.refused[0] and "--allow-config-change train.steps" in refused.refused[0]
    kept = load_config(TINY, ["train.steps=200", "optim.warmup_steps=10", "optim.decay_steps=100"])
    lines = resume_changes(meta, kept, {"sha256": "t"}, Layout.of(kept, 1), ("train.steps", "optim")).accepted
    assert lines and not any("LR" in x for x in lines)  # decay kept: the LR at step 100 is unchanged, no note
