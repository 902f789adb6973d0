"""Export a checkpoint of ours (any TP/PP layout) to a Hugging Face model directory.

    python tools/convert_to_hf.py --checkpoint RUN_DIR --output HF_DIR [--max-positions N] [--tokenizer X] \
        [--overwrite]

ALiBi -> MptForCausalLM, sinusoidal -> GPT2LMHeadModel, rotary and none -> GPTNeoXForCausalLM
(exact, see tools/hf_export.py; t5 and kerple have no stock Hugging Face class and are refused), saved
as safetensors with config.json, generation_config.json and a tokenizer that gives the run's ids:
our SentencePiece model converted (data_prep/hf_tokenizer.py), or the run's Hugging Face
tokenizer.json copied byte for byte. Load with AutoModelForCausalLM / AutoTokenizer, no remote code.
The checkpoint's model files are verified against meta.json, and the tokenizer against the
sha256 the run recorded; either mismatch is refused. That sha256 goes into config.json
(`tokenizer_sha256`), so that tools/eval_extrapolation.py can refuse data made with another
tokenizer. The export is written to a temporary directory beside HF_DIR and renamed into place:
an existing export is replaced whole (with --overwrite), never mixed with stale shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path



def find_tokenizer(recorded: dict, cfg) -> Path | None:
    """The tokenizer file (.model or tokenizer.json) whose sha256 is the one the run recorded: the
    path in meta.json, else the one its data manifests name."""
    from data_prep.tokenizer import file_sha256  # here: sentencepiece and tokenizers load after --help

    candidates = [recorded.get("path")]
    for src in cfg.data.sources:
        manifest = Path(src.path) / "manifest.json"
        if manifest.is_file():
            candidates.append(json.loads(manifest.read_text()).get("tokenizer", {}).get("path"))
    for tok in candidates:
        if tok and Path(tok).is_file() and file_sha256(tok) == recorded.get("sha256"):
            return Path(tok)
    return None


def check_output(output: Path, overwrite: bool) -> None:
    """--output must be new, an empty directory, or (with --overwrite) an HF export to replace:
    never a file, a run directory or any other directory with files in it."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file: give a directory path (new, or an export to replace)")
    if not output.is_dir() or not any(output.iterdir()):
        return
    cfg = output / "config.json"
    is_export = cfg.is_file() and "model_type" in json.loads(cfg.read_text() or "{}")
    if not is_export:
        raise ValueError(f"--output {output} is a directory with files in it and not a Hugging Face export (a run "
                         "directory?): give a new or empty directory")
    if not overwrite:
        raise ValueError(f"--output {output} holds an export already: pass --overwrite to replace it, or give a "
                         "new directory")


def save_swapped(model, tok, ours, output: Path) -> None:
    """Save into a temporary directory beside `output`, then rename it into place (the old
    export, if any, is removed only after the new one is complete)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would stay on the export
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        ours.save_hf(tok, tmp)  # a tokenizer.json is copied byte for byte (its sha256 stays the run's)
        old = None
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old", dir=output.parent))
            output.rename(old / "export")
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


def convert(checkpoint: str | Path, output: str | Path, max_positions: int | None = None,
            tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the HF model (+ tokenizer) for `checkpoint` into `output`; returns `output`.
    An existing export at `output` is replaced only with `overwrite`."""
    from data_prep.tokenizer import Tokenizer, file_sha256, tokenizer_file
    from pretrain.checkpoint import load_consolidated

    output = Path(output)
    check_output(output, overwrite)
    cfg, state_dict, meta = load_consolidated(checkpoint, with_meta=True)
    if max_positions is not None and max_positions < cfg.model.seq_length:
        raise ValueError(f"--max-positions {max_positions} is below the training length {cfg.model.seq_length}: "
                         f"give at least {cfg.model.seq_length} (or leave it out for the default)")
    recorded = meta["tokenizer"]
    if tokenizer is None:
        tokenizer = find_tokenizer(recorded, cfg)
        if tokenizer is None:
            raise FileNotFoundError(
                f"no tokenizer with the run's sha256 {recorded.get('sha256', '?')[:12]} found for {checkpoint} (it "
                f"was trained with {recorded.get('path')}): pass --tokenizer X.model or X/tokenizer.json")
    elif (sha := file_sha256(tokenizer := tokenizer_file(tokenizer))) != recorded.get("sha256"):
        raise ValueError(f"--tokenizer {tokenizer} (sha256 {sha[:12]}) is not the tokenizer the "
                         f"run was trained with ({recorded.get('path')}, sha256 {recorded.get('sha256', '?')[:12]}): "
                         "pass that one; another tokenizer maps the ids to other text")
    from transformers import GenerationConfig

    from tools.hf_export import megatron_to_hf

    ours = Tokenizer(tokenizer, eod_token=recorded.get("eod_token"))
    if ours.eod != recorded.get("eod", ours.eod):
        raise ValueError(f"tokenizer {tokenizer}: its end-of-text id is {ours.eod}, the run's data used "
                         f"{recorded.get('eod')}")
    model = megatron_to_hf(cfg, state_dict, max_positions)
    tok = ours.to_hf()
    if len(tok) > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {len(tok)} ids > model vocab_size {cfg.model.vocab_size}")
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos  # GPT-2 style: no pad token, pad with eos
    model.config.eos_token_id = eos
    model.config.pad_token_id = pad
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None, do_sample=False)
    limit = getattr(model.config, "max_seq_len", None) or getattr(model.config, "n_positions", None)
    if limit:  # MPT and GPT-2 fail past it; the tokenizer then warns, naming the limit (GPT-NeoX has none)
        tok.model_max_length = limit
    model.config.tokenizer_sha256 = recorded["sha256"]  # checked by tools/eval_extrapolation.py against --data's
    model.config.tokenizer_path = str(tokenizer)
    save_swapped(model, tok, ours, output)
    return output


def positive_int(text: str) -> int:
    if not text.strip().isdecimal() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run directory or one of its checkpoints")
    ap.add_argument("--output", required=True, help="the Hugging Face model directory to write")
    ap.add_argument("--max-positions", type=positive_int, default=None,
                    help="longest input the HF model accepts, at least the training length L; None: 64 x L for ALiBi "
                         "(MPT builds its bias for this many positions), 16 x L otherwise (GPT-2 stores a table of "
                         "this many rows; GPT-NeoX has no limit). Past it the stock HF classes fail with a tensor "
                         "size error (the exported tokenizer warns, naming the limit): export again with a larger "
                         "value")
    ap.add_argument("--tokenizer", default=None, help="SentencePiece .model or Hugging Face tokenizer.json (or its folder); its sha256 must be the run's; None: the one the checkpoint recorded, "
                         "or its data manifest names")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing export at --output (never a "
                    "directory that is not an export)")
    args = ap.parse_args(argv)
    out = convert(args.checkpoint, args.output, args.max_positions, args.tokenizer, args.overwrite)
    print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to change
        sys.exit(f"convert_to_hf.py: error: {e}")
