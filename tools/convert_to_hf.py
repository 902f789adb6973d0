"""Export a checkpoint of ours (any TP/PP layout) to a Hugging Face model directory.

    python tools/convert_to_hf.py --checkpoint RUN_DIR --output HF_DIR [--max-positions N] [--tokenizer X.model]

ALiBi -> MptForCausalLM, sinusoidal -> GPT2LMHeadModel (exact, see tools/hf_export.py), saved
as safetensors with config.json, generation_config.json and a tokenizer that gives the same ids
as our SentencePiece model. Load with AutoModelForCausalLM / AutoTokenizer, no remote code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import GenerationConfig

from tools.hf_export import megatron_to_hf
from data_prep.hf_tokenizer import spm_to_hf_tokenizer


def find_tokenizer(checkpoint: str | Path, cfg) -> Path | None:
    """The SentencePiece model the checkpoint recorded (meta.json), else its data manifest's."""
    from pretrain.checkpoint import find_checkpoint

    path = Path(checkpoint)
    meta = path / "meta.json"
    if not meta.is_file():
        found = find_checkpoint(path.parent if path.name == "checkpoints" else path)
        meta = found[0] / "meta.json" if found else None
    candidates = []
    if meta is not None and meta.is_file():
        candidates.append(json.loads(meta.read_text()).get("tokenizer"))
    for src in cfg.data.sources:
        manifest = Path(src.path) / "manifest.json"
        if manifest.is_file():
            candidates.append(json.loads(manifest.read_text()).get("tokenizer"))
    for tok in candidates:
        tok = tok.get("path") if isinstance(tok, dict) else tok
        if tok and Path(tok).is_file():
            return Path(tok)
    return None


def convert(checkpoint: str | Path, output: str | Path, max_positions: int | None = None,
            tokenizer: str | Path | None = None) -> Path:
    """Write the HF model (+ tokenizer) for `checkpoint` into `output`; returns `output`."""
    from pretrain.checkpoint import load_consolidated

    cfg, state_dict = load_consolidated(checkpoint)
    model = megatron_to_hf(cfg, state_dict, max_positions)
    tokenizer = Path(tokenizer) if tokenizer else find_tokenizer(checkpoint, cfg)
    if tokenizer is None:
        raise FileNotFoundError(
            f"no tokenizer found for {checkpoint} (its data manifest names none that exists): pass --tokenizer X.model")
    tok = spm_to_hf_tokenizer(tokenizer)
    if len(tok) > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {len(tok)} ids > model vocab_size {cfg.model.vocab_size}")
    eos = tok.eos_token_id
    model.config.eos_token_id = eos
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id, bos_token_id=None,
                                               do_sample=False)
    output = Path(output)
    model.save_pretrained(output, safe_serialization=True)
    tok.save_pretrained(output)
    return output


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run directory or one of its checkpoints")
    ap.add_argument("--output", required=True, help="the Hugging Face model directory to write")
    ap.add_argument("--max-positions", type=int, default=None,
                    help="longest input the HF model accepts (default 16 x the training length)")
    ap.add_argument("--tokenizer", default=None, help="SentencePiece .model; None: the one the checkpoint's data manifest names")
    args = ap.parse_args(argv)
    out = convert(args.checkpoint, args.output, args.max_positions, args.tokenizer)
    print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to change
        sys.exit(f"convert_to_hf.py: error: {e}")
