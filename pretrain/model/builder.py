"""ModelConfig -> megatron-core GPTModel (the only place the two meet)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig

from pretrain.config import ConfigError, ModelConfig, model_errors

from .compat import apply_cpu_compat
from .relative import SharedBias
from .spec import POSITIONS, block_spec, model_backend


def transformer_config(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32, **overrides: Any) -> TransformerConfig:
    """The MPT-style block as a TransformerConfig; TP/PP sizes come from parallel_state.
    `overrides` go straight to TransformerConfig (e.g. recompute_granularity="full",
    recompute_method="uniform", recompute_num_layers=1 for activation checkpointing)."""
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        normalization="LayerNorm",
        layernorm_epsilon=cfg.layernorm_epsilon,
        add_bias_linear=False,  # no linear biases (MPT)
        add_qkv_bias=False,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact erf GELU (approximate="none")
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        embedding_init_method_std=cfg.embedding_init_std,
        # Full weights are drawn on the CPU from the torch seed and then sliced: the same model
        # for any TP degree, and no CUDA needed to build it.
        use_cpu_initialization=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,  # dtype of the activations sent between pipeline stages
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # megatron-core's native fused cross-entropy (torch.compile, no Transformer Engine): the
        # same loss; its gradient is cast to bf16 (fusions/fused_cross_entropy.py), as the
        # unfused path's is for bf16 logits, but a rounding for fp32 models: bf16 only.
        cross_entropy_loss_fusion=params_dtype == torch.bfloat16,
        cross_entropy_fusion_impl="native",
        # the other fused kernels need CUDA/apex; off everywhere so CPU and GPU compute the same thing
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        sequence_parallel=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(
    cfg: ModelConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    params_dtype: torch.dtype = torch.float32,
    transformer_overrides: dict[str, Any] | None = None,
) -> GPTModel:
    """Build this rank's GPTModel shard. megatron-core parallel_state must be initialized
    (`pretrain.parallel.init_model_parallel`, or parallel_state.initialize_model_parallel + seeding)."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron-core parallel_state is not initialized: call "
            "pretrain.parallel.init_model_parallel(tp, pp) (or parallel_state.initialize_model_parallel) first"
        )
    errors = model_errors(cfg)
    if errors:
        raise ConfigError(errors)
    apply_cpu_compat()
    config = transformer_config(cfg, params_dtype, **(transformer_overrides or {}))
    position = POSITIONS[cfg.position]
    kernel = model_backend(cfg)
    score_bias, shared = position.score_bias, None
    if position.shared_bias is not None:  # one learned module for every layer of this stage
        tp = parallel_state.get_tensor_model_parallel_group()
        shared = position.shared_bias(cfg, config, tp.size(), tp.rank())
        score_bias = lambda *_: SharedBias(shared)  # noqa: E731
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(cfg, config, kernel, score_bias),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,  # only used by learned positions, which we never build
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=True,
        position_embedding_type=position.mcore_type,
        rotary_base=cfg.rotary_base,
    )
    if position.wrap_embedding is not None and pre_process:
        model.embedding = position.wrap_embedding(model.embedding, cfg)
    if shared is not None:
        model.position_bias = shared  # registered once: one name, one gradient summed over the layers
    if not config.perform_initialization:
        _mark_partitions(model)
    model.attention_kernel = kernel  # named in the run's log and metrics
    return model


def _mark_partitions(model: GPTModel) -> None:
    """The tensor-parallel attributes (partition dim) megatron sets only inside its weight init,
    which `perform_initialization=False` skips: column-parallel weights and the vocab-parallel
    embedding are split along dim 0, row-parallel weights along dim 1."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=0, stride=1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=1, stride=1)
