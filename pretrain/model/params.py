"""Parameter naming, tensor-parallel partition dims (and each TP rank's heads) and the layout-independent init.

Shared by the trainer (init), the checkpoint format (global names, partition dims) and the
tools (consolidation): a parameter's *global name* is its name in the TP=1, PP=1 model (global
layer numbers), which is what checkpoints store, whatever layout wrote them.
"""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel

from pretrain.config import ModelConfig


def global_names(gpt: GPTModel) -> dict[str, str]:
    """Local parameter name -> the name it has in the TP=1, PP=1 model (global layer numbers).
    The last stage's tied output weight (pp > 1) maps to the first stage's embedding name."""
    names = {}
    embedding = next((n for n, _ in gpt.named_parameters() if n.endswith("word_embeddings.weight")),
                     "embedding.word_embeddings.weight")
    for local, _ in gpt.named_parameters():
        name = local
        if local.startswith("decoder.layers."):
            idx, rest = local[len("decoder.layers."):].split(".", 1)
            name = f"decoder.layers.{gpt.decoder.layers[int(idx)].layer_number - 1}.{rest}"
        elif local == "output_layer.weight" and gpt.share_embeddings_and_output_weights:
            name = embedding
        names[local] = name
    return names


def tp_heads(num_heads: int, tp_size: int, tp_rank: int) -> slice:
    """The attention heads TP rank `tp_rank` owns: megatron-core gives rank r the contiguous heads
    [r * n/tp, (r + 1) * n/tp). Per-head tables (ALiBi slopes, T5 and KERPLE biases) are sliced
    with it from their full (all-heads) value."""
    if num_heads % tp_size:
        raise ValueError(f"num_heads={num_heads} is not divisible by tensor parallel size {tp_size}")
    local = num_heads // tp_size
    return slice(tp_rank * local, (tp_rank + 1) * local)


def partition_dim(p: torch.Tensor) -> int | None:
    """The dim a tensor-parallel parameter is split along (megatron's own attribute), or None."""
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


@torch.no_grad()
def init_weights(gpt: GPTModel, m: ModelConfig, seed: int) -> None:
    """Initialize every parameter from its *global* name, so the model is the same for any
    tensor/pipeline layout (megatron's own init depends on the stage's RNG position).
    Each full tensor is drawn from a generator seeded by (seed, name), then this rank's TP slice
    is kept. Stds follow megatron-core: init_method_std for input projections,
    std / sqrt(2 * num_layers) for the projections back into the residual stream,
    embedding_init_std for the (tied) embedding; LayerNorm weights 1; a learned position bias
    (`position_bias.*`, relative.py) its module's `draw` (the T5 / KERPLE init)."""
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    names = global_names(gpt)
    for local, p in gpt.named_parameters():
        name = names[local]
        if "norm" in name:
            p.fill_(1.0)
            continue
        if name.endswith("word_embeddings.weight"):
            name = "embedding.word_embeddings.weight"  # one draw for the embedding and its tied copy
        dim = partition_dim(p)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] *= tp
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = _draw(gpt, m, name, shape, gen)
        p.copy_(full if dim is None else full.chunk(tp, dim)[tp_rank])


def _draw(gpt: GPTModel, m: ModelConfig, name: str, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    """The full fp32 init of parameter `name` (all TP ranks' parts)."""
    if name.startswith("position_bias."):  # a learned score bias: its own paper's init
        return gpt.position_bias.draw(name.removeprefix("position_bias."), gen)
    if name == "embedding.word_embeddings.weight":
        std = getattr(m, "embedding_init_std", m.init_method_std)
    elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = m.init_method_std / math.sqrt(2.0 * m.num_layers)
    elif name.endswith(("linear_qkv.weight", "linear_fc1.weight")):
        std = m.init_method_std
    else:
        raise ValueError(f"init_weights: no init rule for parameter {name}; add one in pretrain/model/params.py")
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
