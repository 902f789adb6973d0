"""The main job: the whole pipeline on a CPU in about 5 minutes (277-329 s on 2 cores), ending in the paper's Figure 1.

    python tools/main_job.py [--output outputs/main_job] [--quick] [--steps N] [--fresh]

Builds the embedded default corpus, trains a SentencePiece tokenizer, preprocesses, trains the
paper's four methods as tiny models at L=64 side by side (sinusoidal, rotary, T5 bias, ALiBi;
pretrain/train.py), exports the ALiBi one to Hugging Face, evaluates all five (ours x4, HF
ALiBi) at L..16L with nonoverlapping windows, and writes OUT/eval/extrapolation.png (perplexity
vs length, the paper's Figure 1) and OUT/comparison.md. --quick runs the same code with a
smaller corpus and a few steps (CI); stages whose output exists are reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tools.jobs import JobError, OutputLock


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--output", type=Path, default=Path("outputs/main_job"), help="everything the job writes goes here")
    ap.add_argument("--quick", action="store_true", help="small corpus, few steps: checks the path, not the result")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model; None: the configs' (1000; --quick: 16)")
    ap.add_argument("--fresh", action="store_true", help="delete OUTPUT first instead of reusing finished stages")
    args = ap.parse_args(argv)
    from tools import main_pipeline as mp  # torch and the pipeline: after --help

    s = mp.QUICK if args.quick else mp.FULL
    if args.steps:
        s = mp.Settings(**{**s.__dict__, "overrides": (*s.overrides, f"train.steps={args.steps}",
                                                        f"train.log_interval={max(1, args.steps // 20)}")})
    out = args.output.resolve()
    with OutputLock(out, "main job", ".main_job.lock") as lock:  # before --fresh deletes anything
        if args.fresh:
            for child in out.iterdir():
                if child != lock.path:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        return run(out, s)


def run(out: Path, s) -> dict:
    from tools import main_pipeline as mp  # torch: after --help

    t0 = time.time()
    tok, data = mp.build_data(out, s)
    runs = mp.train(out, data, s)
    hf = mp.export(out, runs["alibi"], tok, s)
    records = mp.extrapolation(out, data, {**runs, "alibi (HF export)": hf}, s)
    table = mp.comparison_table(records, runs)
    cfg = mp.model_config("alibi", s)
    (out / "comparison.md").write_text(
        f"Tiny models (2 layers, d 128) trained at L={cfg.model.seq_length} for {cfg.train.steps} steps (side by side, one CPU thread "
        "each; train s = summed step time); validation perplexity, nonoverlapping windows over the same token "
        "stream at every length (tokens scored per length: eval/results.json).\n\n" + table)
    summary = {"wall_s": round(time.time() - t0, 1), "settings": s.__dict__, "results": records,
               "figure": str(out / "eval" / "extrapolation.png"), "table": str(out / "comparison.md"),
               "hf_model": str(hf), "runs": {k: str(v) for k, v in runs.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n" + table)
    print(f"Figure 1 (perplexity vs input length): {summary['figure']}")
    print(f"comparison table: {summary['table']}\nHF model: {hf}\nresults: {out / 'eval' / 'results.json'}")
    print(f"main job finished in {summary['wall_s']:.0f} s")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (JobError, ValueError, FileNotFoundError) as e:  # the message says what happened and what to do
        sys.exit(f"main_job.py: error: {e}")
