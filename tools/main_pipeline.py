"""The stages of the main job (tools/main_job.py), each skipped when its output already exists so
that an interrupted run continues where it stopped (training itself resumes from checkpoints).

corpus -> tokenizer -> preprocess -> train the paper's four methods (sinusoidal, rotary, T5 bias,
ALiBi) at the same L -> export ALiBi to HF -> evaluate all five at L .. 16L (nonoverlapping) ->
Figure 1 + comparison table.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.corpus import build_default_corpus
from data_prep.manifest import load_manifest
from data_prep.pipeline import preprocess
from data_prep.train_tokenizer import train_tokenizer
from pretrain.config import Config, load_config
from pretrain.data import split_tokens
from pretrain.rundir import RunDir, busy_message
from tools.convert_to_hf import convert
from tools.eval_extrapolation import check_tokenizers, evaluate, write_results
from tools.eval_models import load_model
from tools.jobs import ROOT, JobError, child_env, die_with_parent, train_cmd
from tools.runs import read_run


@dataclass(frozen=True)
class Settings:
    """What --quick changes; everything else is the same code path and the shipped configs."""

    corpus_mb: float
    length_multipliers: tuple[int, ...]
    eval_tokens: int
    """Validation tokens scored per length (the first of the valid split)."""
    overrides: tuple[str, ...] = ()
    """Config overrides applied to every model (--quick: a few steps of a smaller batch)."""


FULL = Settings(corpus_mb=5.0, length_multipliers=(1, 2, 4, 8, 16), eval_tokens=32768)
QUICK = Settings(corpus_mb=1.0, length_multipliers=(1, 2, 8), eval_tokens=2048,
                 overrides=("train.steps=16", "train.global_batch_size=8", "train.micro_batch_size=8",
                            "optim.warmup_steps=4", "train.log_interval=1"))
MODELS = {name: ROOT / "configs" / f"main_job_{name}.yaml" for name in ("sinusoidal", "rope", "t5", "alibi")}
"""The paper's Figure 1 methods, in its legend's order (sinusoidal, rotary, T5 bias, ALiBi)."""


def model_config(name: str, s: Settings) -> Config:
    """The config `name` trains with (its YAML plus the settings' overrides)."""
    return load_config(MODELS[name], s.overrides)


def stage(name: str):
    print(f"\n=== {name}", flush=True)
    return time.time()


def build_data(out: Path, s: Settings) -> tuple[Path, Path]:
    """Embedded corpus -> SentencePiece tokenizer -> preprocessed shards. Returns (tokenizer, data dir)."""
    t = stage("corpus, tokenizer, preprocess")
    corpus = out / "corpus"
    if not (corpus / ".complete").is_file():  # a marker: an interrupted build is redone
        build_default_corpus(corpus, max_mb=s.corpus_mb)
        (corpus / ".complete").touch()
    tok = out / "tokenizer" / "tok.model"
    if not tok.is_file():
        vocab = model_config("alibi", s).model.vocab_size
        train_tokenizer(sorted(corpus.glob("default.*")), vocab, tok.with_suffix(""), sample_mb=2 * s.corpus_mb)
    data = out / "data"
    if not (data / "manifest.json").is_file():
        m = preprocess(sorted(corpus.glob("default.*")), tok, data, valid_fraction=0.05, quiet=True,
                       eval_length=max(s.length_multipliers) * model_config("alibi", s).model.seq_length)
        print(f"tokens: train {m['splits']['train']['tokens']}, valid {m['splits']['valid']['tokens']}")
    print(f"done in {time.time() - t:.0f} s: {data}")
    return tok, data


def train(out: Path, data: Path, s: Settings) -> dict[str, Path]:
    """Train the tiny models with pretrain/train.py, as a user would, side by side (one CPU
    thread each, sharing the 2-core laptop's cores), polling their metrics.jsonl for progress."""
    cfg = model_config("alibi", s)
    steps = cfg.train.steps
    t = stage(f"train tiny {', '.join(MODELS)} at L={cfg.model.seq_length} for {steps} steps (in parallel)")
    procs, runs = {}, {name: out / "runs" / name for name in MODELS}
    for run_dir in runs.values():  # a trainer left by an earlier job (one that could not be stopped with it)
        if (who := RunDir(run_dir).holder()) is not None:
            raise JobError(f"{busy_message(run_dir, who)} (a trainer of an earlier main job on {out}?)")
    for name, config in MODELS.items():
        run_dir = runs[name]
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = train_cmd(config, run_dir, data, overrides=list(s.overrides))
        log = open(RunDir(run_dir).log, "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent())  # killed with us, even by kill -9
        procs[name] = (proc, log)
        print(f"{name}: {' '.join(cmd)}\n  log: {RunDir(run_dir).log}", flush=True)
    while any(p.poll() is None for p, _ in procs.values()):
        time.sleep(2 if steps < 100 else 15)
        print("  " + ", ".join(f"{n}: {_last_step(runs[n])}/{steps} steps" for n in procs), flush=True)
    for name, (p, log) in procs.items():
        log.close()
        if p.returncode:
            tail = "\n".join(RunDir(runs[name]).log.read_text().splitlines()[-30:])
            raise JobError(f"training {name} failed (exit {p.returncode}); end of its log:\n{tail}")
    print(f"done in {time.time() - t:.0f} s: {', '.join(str(r) for r in runs.values())}")
    return runs


def _last_step(run_dir: Path) -> int:
    """The last step logged so far (the trainer may be writing the last line)."""
    records = RunDir(run_dir).records()
    return records[-1].get("step", 0) if records else 0


def export(out: Path, run_dir: Path, tok: Path, s: Settings) -> Path:
    t = stage("export tiny ALiBi to Hugging Face (MptForCausalLM)")
    hf = convert(run_dir, out / "hf" / run_dir.name, tokenizer=tok, overwrite=True)  # the default 64 x L positions
    print(f"done in {time.time() - t:.0f} s: {hf}")
    return hf


def extrapolation(out: Path, data: Path, models: dict[str, Path], s: Settings) -> list[dict]:
    t = stage("extrapolation evaluation (nonoverlapping)")
    lengths = [m * model_config("alibi", s).model.seq_length for m in s.length_multipliers]
    check_tokenizers(list(models.values()), data, load_manifest(data))
    tokens = split_tokens(data, "valid", max(s.eval_tokens, max(lengths)) + 1)  # every length scores the same stream
    records = []
    for name, path in models.items():
        model = load_model(path, torch.device("cpu"), name=name)
        records += evaluate([model], tokens, lengths, method="nonoverlapping", stride=None, device=torch.device("cpu"))
    write_results(records, out / "eval")
    print(f"done in {time.time() - t:.0f} s")
    return records


def comparison_table(records: list[dict], runs: dict[str, Path]) -> str:
    """Perplexity at each length per model (the paper's Table 1 layout), with training cost."""
    lengths = sorted({r["length"] for r in records})
    head = "| model | L_train | " + " | ".join(f"ppl@{n}" for n in lengths) + " | ppl@max / ppl@L | train s |\n"
    head += "|---" * (len(lengths) + 4) + "|\n"
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        ppl = {r["length"]: r["ppl"] for r in records if r["model"] == model}
        train_l = next(r["train_length"] for r in records if r["model"] == model)
        secs = ""
        if model in runs:  # summed training step time, as compare_runs.py counts it
            run = read_run(runs[model])
            secs = f"{3600 * run.hours[run.train[-1]['step']]:.0f}"
        rows.append(f"| {model} | {train_l} | " + " | ".join(f"{ppl[n]:.2f}" for n in lengths)
                    + f" | {ppl[max(lengths)] / ppl[train_l]:.2f}x | {secs} |\n")
    return head + "".join(rows)
