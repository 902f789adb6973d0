"""May this run resume that checkpoint? The one resume policy: which differences from the
checkpoint's run are accepted, which are refused, and the message for each.

- the model shape (`SHAPE_FIELDS`): refused, the saved tensors would not fit;
- the layout (`LAYOUT_KEYS`: GPU count, tp, pp, ZeRO stage, micro-batch): accepted and resharded
  (pretrain/reshard.py), the same maths on other GPUs, except where `layout_change` says why not;
- `HARMLESS` keys (logging, checkpointing, validation, wandb, hardware): accepted and printed;
- anything else (model, data and its manifests, tokenizer, batch, steps, seed, optimizer,
  precision, kernels, recomputation): refused unless --allow-config-change names it, since it
  breaks exact continuation or the data position. New config fields are refused by default
  until listed in `HARMLESS`.

Preflight asks it (`resume_changes`) before any process group exists, and the loop asks again
when `checkpoint.resume` fell back to an older checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pretrain import reshard
from pretrain.config import Config, ConfigError, field_defaults, flatten, from_dict, to_dict
from pretrain.layout import Layout
from pretrain.schedule import lr_at

HARMLESS = ("train.log_interval", "train.max_bad_steps", "train.dist_timeout_s", "checkpoint.", "validation.",
            "wandb.", "hardware.")
"""Keys (or sections, ending in '.') whose change on resume leaves the trained trajectory and the
data position exactly as they were: accepted and printed."""
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "position",
                "bidirectional")
"""model.* fields that shape the saved tensors: never accepted."""
LAYOUT_KEYS = ("parallel.tensor_parallel", "parallel.pipeline_parallel", "parallel.zero_stage",
               "parallel.zero_bucket_size", "train.micro_batch_size")
"""Config keys that only change how the same maths is spread over the GPUs."""


@dataclass
class Changes:
    """How this run differs from a checkpoint it resumes: `accepted` lines (harmless, or named by
    --allow-config-change), `refused` lines (each with what to do), and the `layout` change
    (`old -> new`, "" if none), which is resharded on resume."""

    accepted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    layout: str = ""


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every dotted key whose value differs. A field added since
    the checkpoint was written counts as its default there (the run it saved behaved so); a key
    one side lacks otherwise counts as None."""
    a, b = flatten(old), flatten(new)
    a = {**{k: v for k, v in field_defaults().items() if k not in a}, **a}
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def layout_change(meta: dict, cfg: Config, layout: Layout) -> tuple[str, list[str]]:
    """(`old -> new` if this run's layout differs from the checkpoint's, else "";
    why it cannot be resumed on, [] if it can)."""
    old, new = meta["layout"], reshard.layout_record(layout, cfg)
    old_desc, new_desc = reshard.describe(old, meta["config"]), reshard.describe(new, {})
    if old_desc == new_desc:
        return "", []
    line = f"{old_desc} -> {new_desc}"
    problems = []
    if not reshard.has_optimizer_state(meta):
        problems.append(f"layout {line}: this checkpoint was written before elastic resume (its optimizer "
                        "state is DeepSpeed's, sharded by layout): resume it on its own layout once, and its "
                        "next checkpoint can move")
    old_micro = meta["config"].get("train", {}).get("micro_batch_size")
    if old_micro != cfg.train.micro_batch_size and cfg.data.eod_mask_loss:
        # the loss is a mean per micro-batch: with masked tokens, regrouping reweights them
        problems.append(f"train.micro_batch_size: checkpoint has {old_micro}, this run {cfg.train.micro_batch_size} "
                        "with data.eod_mask_loss=true changes how masked tokens weigh in the loss: keep the "
                        "micro-batch, or pass --allow-config-change train.micro_batch_size")
    return line, problems


def resume_changes(meta: dict, cfg: Config, tokenizer: dict, layout: Layout, allow: tuple[str, ...] = (),
                   data: dict[str, str] | None = None) -> Changes:
    """Every difference between the checkpoint's run (its meta.json, `meta`) and this one, sorted
    by the policy above; `allow` names keys (or sections above them) to accept anyway. `data`:
    this run's `checkpoint.data_fingerprint`, compared for the sources both runs read (a
    checkpoint written before fingerprints were kept has none to compare)."""
    out = Changes()
    diffs = config_changes(meta["config"], to_dict(cfg))
    old_tok, new_tok = meta["tokenizer"], tokenizer
    if (old_tok.get("sha256"), old_tok.get("eod")) != (new_tok.get("sha256"), new_tok.get("eod")):
        diffs.append(("tokenizer", *(f"{t.get('path')} (sha256 {str(t.get('sha256'))[:12]}, eod {t.get('eod')})"
                                     for t in (old_tok, new_tok))))
    old_data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    for path in sorted(set(old_data) & set(data or {})):
        if old_data[path] != data[path]:
            diffs.append(("data.manifest", f"{path} (manifest sha256 {str(old_data[path])[:12]})",
                          f"regenerated in place (manifest sha256 {data[path][:12]})"))
    out.layout, problems = layout_change(meta, cfg, layout)
    out.refused += [p for p in problems if not any(p.startswith(a) for a in allow)]
    fixed = {f"model.{n}" for n in SHAPE_FIELDS}
    for key, old, new in diffs:
        line = f"{key}: checkpoint has {old!r}, this run {new!r}" + (_lr_note(meta, cfg) if key == "train.steps" else "")
        if key in fixed:
            out.refused.append(f"{line} (the saved tensors are laid out for the checkpoint's model: use a new "
                               "--run-dir for a different model)")
        elif key in LAYOUT_KEYS:
            continue  # in out.layout
        elif any(key == h or key.startswith(h) for h in HARMLESS):
            out.accepted.append(f"{line} (harmless)")
        elif any(key == a or key.startswith(a + ".") for a in allow):
            out.accepted.append(f"{line} (allowed by --allow-config-change)")
        else:
            out.refused.append(f"{line} (breaks exact continuation or the data position: pass "
                               f"--allow-config-change {key} to accept it)")
    return out


def _lr_note(meta: dict, cfg: Config) -> str:
    """What a new train.steps does to the LR at the resumed step (the cosine is laid over
    train.steps unless optim.decay_steps fixes it): '' when the LR there stays the same."""
    try:
        old, step = from_dict(Config, meta["config"]), int(meta["step"])
    except (ConfigError, KeyError, TypeError, ValueError):
        return ""
    before, after = lr_at(step, old.optim, old.train.steps), lr_at(step, cfg.optim, cfg.train.steps)
    if abs(after - before) <= 1e-9 * max(abs(before), abs(after)):
        return ""
    return (f"; the LR schedule is laid out again over {cfg.train.steps} steps: at step {step} the LR jumps "
            f"from {before:.3g} to {after:.3g}; set optim.decay_steps={old.optim.decay_steps or old.train.steps} "
            "as well to keep the checkpoint's decay")
