"""Perplexity vs input length (the ALiBi paper's Figure 1) for our checkpoints or HF models.

    python tools/eval_extrapolation.py --checkpoint RUN_A HF_DIR_B --data DATA_DIR \
        --lengths 512,1024,2048,4096 [--method nonoverlapping|sliding] [--stride S] --output OUT

Writes OUT/results.json (records {model, train_length, length, method, stride, tokens, ppl}),
OUT/results.csv and OUT/extrapolation.png. Nonoverlapping is the paper's method; sliding with a
small stride gives lower numbers at every length (App. B), so compare like with like. Models
are named by directory and kind ("alibi (ours)", "alibi (HF)") unless --names says otherwise;
two models with one name are refused. A model trained with another tokenizer than the one --data
was made with is refused before anything is computed (the sha256 recorded in our checkpoint, or
in an export's config.json by tools/convert_to_hf.py, against the data manifest's).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep.manifest import load_manifest
from pretrain.parallel import use_gpu

if TYPE_CHECKING:  # the heavy imports (torch, transformers, megatron) wait until the arguments are checked
    import torch

    from pretrain.perplexity import Method
    from tools.eval_models import EvalModel

FIELDS = ["model", "train_length", "length", "method", "stride", "tokens", "ppl"]


class UsageError(ValueError):
    """A bad command line; the message says what to change."""


def parse_lengths(text: str) -> list[int]:
    """--lengths: comma-separated positive integers, at least one; sorted, duplicates dropped."""
    items = [x.strip() for x in text.split(",")]
    if not any(items):
        raise UsageError(f"--lengths {text!r} names no length: give comma-separated positive integers, e.g. 512,1024")
    bad = [x for x in items if not x.isdecimal() or int(x) == 0]
    if bad:
        raise UsageError(f"--lengths {text!r}: {', '.join(repr(x) for x in bad)} is not a positive integer; give "
                         "comma-separated positive integers, e.g. 512,1024,2048")
    return sorted({int(x) for x in items})


def model_names(paths: list[str], names: str | None) -> list[str]:
    """--names, or each directory's name and kind ("alibi (ours)", "alibi (HF)"); no two alike."""
    from tools.eval_models import is_hf_dir

    if names is not None:
        out = [n.strip() for n in names.split(",")]
        if len(out) != len(paths):
            raise UsageError(f"--names has {len(out)} entries for {len(paths)} checkpoints")
    else:
        out = [f"{Path(p).resolve().name} ({'HF' if is_hf_dir(p) else 'ours'})" for p in paths]
    seen: dict[str, str] = {}
    for name, path in zip(out, paths):
        if not name:
            raise UsageError(f"--names gives {path} an empty name")
        if name in seen:
            raise UsageError(f"{seen[name]} and {path} would both be named {name!r} in the results: pass --names "
                             "with a distinct name for each --checkpoint")
        seen[name] = path
    return out


def check_tokenizers(paths: list[str | Path], data_dir: str | Path, manifest: dict) -> None:
    """Refuse any model trained with another tokenizer than the one --data was made with (its
    perplexity would be a meaningless number), as training and export refuse it: the sha256 the
    data manifest records against the one the checkpoint (or HF export) records."""
    from tools.eval_models import is_hf_dir, recorded_tokenizer

    data_tok = manifest["tokenizer"]
    for path in paths:
        tok = recorded_tokenizer(path)
        if tok is None and is_hf_dir(path):
            raise UsageError(f"{path}/config.json records no tokenizer_sha256, so its tokenizer cannot be checked "
                             f"against --data {data_dir} ({data_tok['path']}): export it with tools/convert_to_hf.py, "
                             f"or add \"tokenizer_sha256\": \"{data_tok['sha256']}\" to its config.json if it "
                             "uses that tokenizer")
        if tok is None:
            continue
        # the same tokenizer.json with another --eod-token is another tokenizer too (HF exports record no eod)
        same_eod = tok.get("eod", data_tok.get("eod")) == data_tok.get("eod")
        if tok.get("sha256") != data_tok["sha256"] or not same_eod:
            eods = "" if same_eod else f", with eod {data_tok.get('eod')} here and {tok.get('eod')} in training"
            raise UsageError(f"--data {data_dir} was tokenized with {data_tok['path']} (sha256 "
                             f"{data_tok['sha256'][:12]}) but {path} was trained with {tok.get('path')} (sha256 "
                             f"{str(tok.get('sha256'))[:12]}){eods}: its perplexity on these ids would be "
                             "meaningless; evaluate on data preprocessed with the model's tokenizer")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", nargs="+", action="extend", required=True,
                    help="our run/checkpoint dirs or HF model dirs (the flag may be repeated: all are evaluated)")
    ap.add_argument("--names", default=None, help="comma-separated display names, one per --checkpoint; None: each directory's name and kind, e.g. \"alibi (ours)\", \"alibi (HF)\"; no two alike")
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
    from pretrain.perplexity import perplexity
    from tools.eval_models import auto_batch_size

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
    from tools.plotting import plot_extrapolation

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
    lengths = parse_lengths(args.lengths)
    if args.method == "nonoverlapping" and args.stride is not None:
        raise UsageError("--stride applies to --method sliding only (nonoverlapping scores every token once)")
    for flag, value in (("--stride", args.stride), ("--batch-size", args.batch_size)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} {value} must be a positive integer")
    missing = [c for c in args.checkpoint if not Path(c).exists()]
    if missing:
        raise FileNotFoundError(f"--checkpoint {' '.join(missing)}: no such directory")
    names = model_names(args.checkpoint, args.names)
    if args.output.exists() and not args.output.is_dir():
        raise UsageError(f"--output {args.output} is a file: give a directory (results.json, results.csv and "
                         "extrapolation.png are written into it)")
    args.output.mkdir(parents=True, exist_ok=True)  # an unwritable place fails now, not after the compute

    manifest = load_manifest(args.data)
    check_tokenizers(args.checkpoint, args.data, manifest)

    import torch

    from pretrain.data import split_tokens
    from tools.eval_models import load_model

    device = torch.device("cuda" if use_gpu() else "cpu")

    tokens = split_tokens(args.data, args.split, manifest=manifest)
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
