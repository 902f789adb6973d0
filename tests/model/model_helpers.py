"""Small models and batches shared by the model tests and their multi-process worker."""

import torch

from pretrain.config import ModelConfig

POSITIONS = ("alibi", "sinusoidal", "rope", "t5", "kerple", "none")


def small_config(position: str, heads: int = 12, **kw) -> ModelConfig:
    """A CPU-cheap model; 12 heads exercises the non-power-of-two slope rule."""
    base = dict(num_layers=2, hidden_size=8 * heads, num_attention_heads=heads, ffn_hidden_size=32 * heads,
                vocab_size=96, seq_length=16, position=position, attention_backend="sdpa")
    if position == "sinusoidal":
        base.update(embedding_scale=(8 * heads) ** 0.5, embedding_init_std=(8 * heads) ** -0.5)
    base.update(kw)
    return ModelConfig(**base)


def batch(cfg: ModelConfig, b: int = 2, s: int | None = None, seed: int = 0):
    """(input_ids, position_ids, labels), each int64 [b, s]."""
    s = s or cfg.seq_length
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    return ids, torch.arange(s).expand(b, s), labels
