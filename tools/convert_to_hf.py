"""Export a checkpoint of ours (any TP/PP layout) to a Hugging Face model directory.

    python tools/convert_to_hf.py --checkpoint RUN_DIR --output HF_DIR [--max-positions N] [--tokenizer X]

ALiBi -> MptForCausalLM, sinusoidal -> GPT2LMHeadModel (exact, see tools/hf_export.py), saved
as safetensors with config.json, generation_config.json and a tokenizer that gives the run's ids:
our SentencePiece model converted (data_prep/hf_tokenizer.py), or the run's Hugging Face
tokenizer.json copied byte for byte. Load with AutoModelForCausalLM / AutoTokenizer, no remote code.
The checkpoint's model files are verified against meta.json, and the tokenizer against the
sha256 the run recorded; either mismatch is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def find_tokenizer(recorded: dict, cfg) -> Path | None:
    """The tokenizer file (.model or tokenizer.json) whose sha256 is the one the run recorded: the
    path in meta.json, else the one its data manifests name."""
    from data_prep.tokenizer import file_sha256

    candidates = [recorded.get("path")]
    for src in cfg.data.sources:
        manifest = Path(src.path) / "manifest.json"
        if manifest.is_file():
            candidates.append(json.loads(manifest.read_text()).get("tokenizer", {}).get("path"))
    for tok in candidates:
        if tok and Path(tok).is_file() and file_sha256(tok) == recorded.get("sha256"):
            return Path(tok)
    return None


def convert(checkpoint: str | Path, output: str | Path, max_positions: int | None = None,
            tokenizer: str | Path | None = None) -> Path:
    """Write the HF model (+ tokenizer) for `checkpoint` into `output`; returns `output`."""
    from data_prep.tokenizer import Tokenizer, file_sha256, tokenizer_file
    from pretrain.checkpoint import load_consolidated

    cfg, state_dict, meta = load_consolidated(checkpoint, with_meta=True)
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
    output = Path(output)
    model.save_pretrained(output, safe_serialization=True)
    ours.save_hf(tok, output)
    return output


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run directory or one of its checkpoints")
    ap.add_argument("--output", required=True, help="the Hugging Face model directory to write")
    ap.add_argument("--max-positions", type=int, default=None,
                    help="longest input the HF model accepts (default 16 x the training length)")
    ap.add_argument("--tokenizer", default=None, help="SentencePiece .model or Hugging Face tokenizer.json (or its folder); its sha256 must be the run's; None: the one the checkpoint recorded, "
                         "or its data manifest names")
    args = ap.parse_args(argv)
    out = convert(args.checkpoint, args.output, args.max_positions, args.tokenizer)
    print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to change
        sys.exit(f"convert_to_hf.py: error: {e}")
