"""Models and data for the extrapolation evaluation: our checkpoints or HF directories, behind
one `LogitsFn`, and the token stream of a preprocessed split.

A directory with a `config.json` naming a `model_type` is a Hugging Face model (loaded with
`AutoModelForCausalLM`, no remote code); anything else is one of our run/checkpoint
directories (loaded with `pretrain.checkpoint.load_consolidated`, any TP/PP layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tools.perplexity import LogitsFn, Method, auto_batch_size, perplexity

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
    from pretrain.checkpoint import load_consolidated
    from pretrain.model import build_model, init_model_parallel

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


def load_tokens(data_dir: str | Path, split: str = "valid") -> torch.Tensor:
    """All documents of `split` ('train', 'valid' or 'all') of a data_prep/preprocess.py output
    directory, concatenated in order (each document ends with its eod token): int64 [N]."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_prep.manifest import shard_prefixes
    from data_prep.worker import SPLITS

    prefixes = [p for s in (SPLITS if split == "all" else [split]) for p in shard_prefixes(data_dir, s)]
    if not prefixes:
        raise ValueError(f"{data_dir} has no {split!r} shards: check --data, or use --split all")
    parts = []
    for prefix in prefixes:
        ds = IndexedDataset(str(prefix), mmap=True)
        parts += [np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))]
    return torch.from_numpy(np.concatenate(parts))


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
            bs = batch_size or auto_batch_size(n, device=device, **m.shape)
            res = perplexity(m.logits_fn, tokens, n, method=method, stride=stride, batch_size=bs, device=device,
                             desc=f"{m.name} @ {n}")
            records.append({"model": m.name, "train_length": m.train_length, "length": n, "method": method,
                            "stride": n if method == "nonoverlapping" else (stride or n),
                            "tokens": res.tokens, "ppl": res.ppl})
            print(f"{m.name:>24s}  L_train={m.train_length:<6d} L_valid={n:<7d} ppl={res.ppl:10.3f}  "
                  f"({method}, stride {records[-1]['stride']}, {res.tokens} tokens)", flush=True)
    return records
