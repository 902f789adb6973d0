"""Fixed sinusoidal positions (Vaswani et al. 2017, as in fairseq, the paper's baseline).

Parameter-free and computed from the position ids, so it works for any length with no table
size to outgrow. Formula (fairseq `SinusoidalPositionalEmbedding`, sin half then cos half,
positions counted from 0), for d = hidden_size, half = d // 2, p a position:

    w_k       = 10000 ** (-k / (half - 1))        k = 0 .. half-1
    PE[p, k]         = sin(p * w_k)
    PE[p, half + k]  = cos(p * w_k)

The block input is `embedding_scale * E[token] + PE[p]`. fairseq uses scale sqrt(d) with
embedding init std d^-0.5: the unit-amplitude table otherwise swamps 0.02-std token embeddings
(see docs/reference.md §1). The GPT-2 export folds the scale in exactly by untying:
`wte = embedding_scale * E`, `lm_head = E`, `wpe = sinusoidal_table(arange(n), d)`.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """PE for integer `positions` [...] -> float32 [..., dim], computed in float64 so that the
    table is exact to fp32 rounding even at long positions (p * w_k is large)."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64, device=positions.device)
    inv_freq = torch.exp(k * -(math.log(10000.0) / (half - 1)))  # [half]
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [..., half]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(torch.float32)  # [..., dim]


class SinusoidalEmbedding(MegatronModule):
    """Replaces the forward of a megatron-core `LanguageModelEmbedding` built with
    position_embedding_type='none': keeps its `word_embeddings` (so the state_dict key stays
    `embedding.word_embeddings.weight` and weight tying is untouched) and adds the table.
    A MegatronModule, so megatron's sharded_state_dict reaches the vocab-parallel embedding.

    forward(input_ids [b, s], position_ids [b, s] | None) -> [s, b, h]
    """

    def __init__(self, inner: MegatronModule, embedding_scale: float):
        super().__init__(config=inner.config)
        if inner.config.sequence_parallel:
            raise ValueError("sinusoidal positions do not support sequence_parallel; set it off")
        self.word_embeddings = inner.word_embeddings
        self.embedding_dropout = inner.embedding_dropout
        self.embedding_scale = embedding_scale

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, **_) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        tokens = self.word_embeddings(input_ids)  # [b, s, h]
        table = sinusoidal_table(position_ids, tokens.shape[-1]).to(tokens.dtype)  # [b, s, h]
        x = (tokens * self.embedding_scale + table).transpose(0, 1).contiguous()  # [s, b, h]
        if self.config.fp32_residual_connection:
            x = x.float()
        return self.embedding_dropout(x)
