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

from pretrain.perplexity import Method, perplexity
from tools.eval_models import EvalModel, auto_batch_size, load_model
from tools.plotting import plot_extrapolation

FIELDS = ["model", "train_length", "length", "method", "stride", "tokens", "ppl"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", nargs="+", required=True, help="our run/checkpoint dirs or HF model dirs")
    ap.add_argument("--names", default=None, help="comma-separated display names, one per --checkpoint; None: the directory names")
    ap.add_argument("--data", required=True, help="a data_prep/preprocess.py output directory")
    ap.add_argument("--split", default="valid", choices=["train", "valid", "all"], help="which documents to score (all: train then valid)")
    ap.add_argument("--lengths", required=True, help="comma-separated evaluation lengths, e.g. 512,1024,2048")
    ap.add_argument("--method", default="nonoverlapping", choices=["nonoverlapping", "sliding"],
                    help="nonoverlapping: the paper's, every token scored once; sliding: only the last --stride of each window")
    ap.add_argument("--stride", type=int, default=None, help="sliding only: tokens scored per window; None: the length (= nonoverlapping)")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per forward; None: the largest that fits the device's free memory")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model weights and activations")
    ap.add_argument("--output", required=True, type=Path, help="writes results.{json,csv} and extrapolation.png here")
    return ap.parse_args(argv)


def evaluate(models: list[EvalModel], tokens: torch.Tensor, lengths: list[int], *, method: Method,
             stride: int | None, device: torch.device, batch_size: int | None = None) -> list[dict]:
    """Perplexity of every model at every length: records for results.json."""
    for m in models:  # fail before hours of compute, not after
        too_long = [n for n in lengths if m.max_length is not None and n > m.max_length]
        if too_long:
            raise ValueError(f"{m.name} accepts inputs up to {m.max_length} tokens, asked for {too_long}: "
                             "re-run tools/convert_to_hf.py with a larger --max-positions")
    if max(lengths) + 1 > tokens.numel():
        raise ValueError(f"the evaluation split has {tokens.numel()} tokens, too few for length {max(lengths)}: "
                         "use shorter --lengths or more data (--split all)")
    records = []
    for m in models:
        for n in lengths:
            bs = batch_size or auto_batch_size(m, n, device)
            res = perplexity(m.logits_fn, tokens, n, method=method, stride=stride, batch_size=bs, device=device,
                             desc=f"{m.name} @ {n}")
            records.append({"model": m.name, "train_length": m.train_length, "length": n, "method": method,
                            "stride": n if method == "nonoverlapping" else (stride or n),
                            "tokens": res.tokens, "ppl": res.ppl})
            print(f"{m.name:>24s}  L_train={m.train_length:<6d} L_valid={n:<7d} ppl={res.ppl:10.3f}  "
                  f"({method}, stride {records[-1]['stride']}, {res.tokens} tokens)", flush=True)
    return records


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
    from pretrain.data import split_tokens

    tokens = split_tokens(args.data, args.split)
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
