"""Models for the extrapolation evaluation: our checkpoints or HF directories, behind one
`LogitsFn`, with a batch size that fits the device.

A directory with a `config.json` naming a `model_type` is a Hugging Face model (loaded with
`AutoModelForCausalLM`, no remote code); anything else is one of our run/checkpoint
directories (loaded with `pretrain.checkpoint.load_consolidated`, any TP/PP layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from pretrain.checkpoint import load_consolidated, read_meta, scan
from pretrain.parallel import init_model_parallel
from pretrain.perplexity import LogitsFn

# transformers and megatron-core (pretrain.model) are imported where a model is loaded: the evaluation
# checks its command line with this module (is_hf_dir, recorded_tokenizer) first, and a bad one gets
# its one-line error at once.

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class EvalModel:
    name: str
    train_length: int
    logits_fn: LogitsFn
    max_length: int | None
    """Longest input the model accepts (HF position tables), None: unlimited."""
    shape: dict[str, int]
    """vocab, hidden, heads, layers: for batch sizing."""


def is_hf_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "model_type" in json.loads(cfg.read_text())


def recorded_tokenizer(path: str | Path) -> dict | None:
    """{path, sha256} of the tokenizer a model was trained with, read cheaply (no weights): our
    checkpoint's meta.json (the newest complete checkpoint of a run), or the `tokenizer_sha256`
    tools/convert_to_hf.py writes into an HF export's config.json. None: nothing recorded."""
    path = Path(path)
    if is_hf_dir(path):
        cfg = json.loads((path / "config.json").read_text())
        sha = cfg.get("tokenizer_sha256")
        return {"path": cfg.get("tokenizer_path"), "sha256": sha} if sha else None
    if (path / "meta.json").is_file():
        return read_meta(path).get("tokenizer")
    found = scan(path.parent if path.name == "checkpoints" else path)
    return found.usable[0][1].get("tokenizer") if found.usable else None


def load_model(path: str | Path, device: torch.device, dtype: str = "fp32", name: str | None = None) -> EvalModel:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    name = name or path.name
    return _load_hf(path, device, dtype, name) if is_hf_dir(path) else _load_ours(path, device, dtype, name)


def _load_hf(path: Path, device: torch.device, dtype: str, name: str) -> EvalModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    c = model.config
    train_length = getattr(c, "train_seq_length", None)
    if train_length is None:
        raise ValueError(f"{path}/config.json has no train_seq_length: convert with tools/convert_to_hf.py, "
                         "or add the model's training length to its config.json as train_seq_length")
    max_length = getattr(c, "max_seq_len", None) or getattr(c, "n_positions", None)

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, use_cache=False).logits  # [b, s, V]

    shape = dict(vocab=c.vocab_size, hidden=c.hidden_size, heads=c.num_attention_heads, layers=c.num_hidden_layers)
    return EvalModel(name, int(train_length), logits_fn, max_length, shape)


def _load_ours(path: Path, device: torch.device, dtype: str, name: str) -> EvalModel:
    from pretrain.model import build_model

    cfg, state_dict = load_consolidated(path)
    init_model_parallel(tp=1)
    model = build_model(cfg.model, params_dtype=DTYPES[dtype])
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config (missing {missing[:4]}, unexpected {unexpected[:4]})")
    model = model.to(device).eval()

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device).expand_as(x)
        return model(x, pos, None, runtime_gather_output=True)  # [b, s, V]

    m = cfg.model
    shape = dict(vocab=m.vocab_size, hidden=m.hidden_size, heads=m.num_attention_heads, layers=m.num_layers)
    return EvalModel(name, m.seq_length, logits_fn, None, shape)


def auto_batch_size(model: EvalModel, length: int, device: torch.device | str, max_batch: int = 64) -> int:
    """Largest batch whose estimated activation memory fits a safe share of what is free.

    Per sample: logits and their log-softmax in fp32 (2 * L * V * 4 bytes), one layer's attention
    scores + float bias (2 * heads * L^2 * 4) and the residual stream of every layer kept by
    no_grad for one layer at a time (~16 * L * hidden * 4). Errs on the small side.
    """
    m = model.shape
    per_sample = 8 * length * m["vocab"] + 8 * m["heads"] * length * length + 64 * length * m["hidden"]
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.5 * free
    else:
        budget = 0.25 * psutil.virtual_memory().available
    return int(max(1, min(max_batch, budget // per_sample)))
