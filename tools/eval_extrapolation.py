"""Perplexity vs input length (the ALiBi paper's Figure 1) for our checkpoints or HF models.

    python tools/eval_extrapolation.py --checkpoint RUN_A HF_DIR_B --data DATA_DIR \
        --lengths 512,1024,2048,4096 [--method nonoverlapping|sliding] [--stride S] --output OUT

Writes OUT/results.json (records {model, train_length, length, method, stride, tokens, ppl}),
OUT/results.csv and OUT/extrapolation.png. Nonoverlapping is the paper's method; sliding with a
small stride gives lower numbers at every length (App. B), so compare like with like.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from tools.evaluation import evaluate, load_model, load_tokens
from tools.plotting import plot_extrapolation

FIELDS = ["model", "train_length", "length", "method", "stride", "tokens", "ppl"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", nargs="+", required=True, help="our run/checkpoint dirs or HF model dirs")
    ap.add_argument("--names", default=None, help="comma-separated display names (default: directory names)")
    ap.add_argument("--data", required=True, help="a data_prep/preprocess.py output directory")
    ap.add_argument("--split", default="valid", choices=["train", "valid", "all"])
    ap.add_argument("--lengths", required=True, help="comma-separated evaluation lengths, e.g. 512,1024,2048")
    ap.add_argument("--method", default="nonoverlapping", choices=["nonoverlapping", "sliding"])
    ap.add_argument("--stride", type=int, default=None, help="sliding only: tokens scored per window")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: fit memory)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--output", required=True, type=Path)
    return ap.parse_args(argv)


def write_results(records: list[dict], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(records)
    plot = plot_extrapolation(records, out / "extrapolation.png")
    return {"json": out / "results.json", "csv": out / "results.csv", "plot": plot}


def main(argv=None) -> dict[str, Path]:
    args = parse_args(argv)
    try:
        lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    except ValueError:
        sys.exit(f"--lengths {args.lengths!r} must be comma-separated integers, e.g. 512,1024,2048")
    if args.method == "nonoverlapping" and args.stride is not None:
        sys.exit("--stride applies to --method sliding only (nonoverlapping scores every token once)")
    names = args.names.split(",") if args.names else [None] * len(args.checkpoint)
    if len(names) != len(args.checkpoint):
        sys.exit(f"--names has {len(names)} entries for {len(args.checkpoint)} checkpoints")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = load_tokens(args.data, args.split)
    print(f"{args.split} split of {args.data}: {tokens.numel()} tokens; device {device}")
    records = []
    for path, name in zip(args.checkpoint, names):  # one model in memory at a time
        model = load_model(path, device, args.dtype, name)
        records += evaluate([model], tokens, lengths, method=args.method, stride=args.stride, device=device,
                            batch_size=args.batch_size)
        del model
    paths = write_results(records, args.output)
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return paths


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to change
        sys.exit(f"eval_extrapolation.py: error: {e}")
