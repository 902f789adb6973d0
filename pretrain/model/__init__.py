"""megatron-core GPT with ALiBi, sinusoidal, rotary, T5-bias, KERPLE or no positions (MPT-style block).

Build (parallel_state must be initialized first)::

    from pretrain.model import build_model
    from pretrain.parallel import init_model_parallel
    init_model_parallel(tp=1)              # single process, gloo on CPU / nccl on GPU
    model = build_model(cfg.model)         # megatron.core.models.gpt.GPTModel, this rank's shard

Standard call (input_ids, position_ids, labels: int64 [b, s]; position_ids = arange(s) per row;
attention_mask is ALWAYS None -- the causal mask and the position bias (ALiBi, T5, KERPLE) are
built inside attention, for any length, with no maximum)::

    loss = model(input_ids, position_ids, None, labels=labels)   # fp32 per-token CE [b, s]
    logits = model(input_ids, position_ids, None, runtime_gather_output=True)   # [b, s, vocab]

Without runtime_gather_output the logits are this TP rank's vocab shard [b, s, vocab / tp].
position_ids feed the sinusoidal table and megatron's rope; ALiBi, T5 and KERPLE use the
in-sequence distance i - j (ALiBi as the paper), so reset_position_ids changes nothing for them.
Backend: ModelConfig.attention_backend (auto = on CUDA the first of attention.AUTO_ORDER that is
installed and can add the position's bias, SDPA elsewhere; spec.model_backend, logged once at build).
build_model keeps megatron's init (full weights drawn on the CPU from the torch seed, then sliced
per TP rank); the trainer redraws every weight with params.init_weights from (seed, global name),
the same model for any TP/PP layout. pretrain.model.compat lists every CUDA assumption of
megatron-core handled for CPU runs.

State dict (TP=1, PP=1; L = layer index 0..num_layers-1; d = hidden, n = heads, dh = d / n,
f = ffn_hidden_size, V = vocab_size). No biases anywhere; LayerNorms have only a weight::

    embedding.word_embeddings.weight                  [V, d]  tied: also the output projection
    decoder.layers.L.input_layernorm.weight           [d]
    decoder.layers.L.self_attention.linear_qkv.weight [3d, d] rows per head: [q_h | k_h | v_h],
                                                      i.e. view(n, 3, dh, d)
    decoder.layers.L.self_attention.linear_proj.weight [d, d]
    decoder.layers.L.pre_mlp_layernorm.weight         [d]
    decoder.layers.L.mlp.linear_fc1.weight            [f, d]
    decoder.layers.L.mlp.linear_fc2.weight            [d, f]
    decoder.final_layernorm.weight                    [d]
    position_bias.weight                              [buckets, n]  t5 only: one table for all layers
    position_bias.r1, position_bias.r2                [n]     kerple only: one kernel for all layers
    *._extra_state                                    value None, one per linear (linear_qkv,
                                                      linear_proj, linear_fc1, linear_fc2,
                                                      output_layer): megatron bookkeeping; skip

Layer math (x: [s, b, d]):  x = x + proj(attn(LN1(x)));  x = x + fc2(gelu_erf(fc1(LN2(x))));
logits = LN_f(x) @ E^T. Attention scores: q.k / sqrt(dh) (+ ALiBi -m_h (i - j), or T5's
table[bucket(j - i), h], or KERPLE's -max(r1_h, .01) log(1 + max(r2_h, .01) |i - j|)), causal.
Embedding input: E[tok] (alibi/rope/t5/kerple/none) or embedding_scale * E[tok] + PE[pos] (sinusoidal,
`sinusoidal.sinusoidal_table`).

HF mapping:
- ALiBi -> MptForCausalLM: wte = E; blocks.L.norm_1/norm_2 = input/pre_mlp LN;
  attn.Wqkv = linear_qkv reordered to [all q | all k | all v]:
  W.view(n, 3, dh, d).transpose(0, 1).reshape(3d, d); attn.out_proj = linear_proj;
  ffn.up_proj = fc1, ffn.down_proj = fc2; norm_f = final LN; alibi_bias_max 8.
- sinusoidal -> GPT2LMHeadModel: wte = embedding_scale * E, lm_head = E (untied unless the
  scale is 1), wpe = sinusoidal_table(arange(n_positions), d); c_attn = qkv reordered as above
  and transposed (Conv1D); all biases zero; activation_function "gelu".
- rope / none -> GPTNeoXForCausalLM: embed_in = E, lm_head = E; layers.L.input_layernorm /
  post_attention_layernorm = the two LNs (zero bias); attention.query_key_value = linear_qkv
  unchanged (per head, as megatron); attention.dense = proj; mlp.dense_h_to_4h / dense_4h_to_h =
  fc1 / fc2 (zero biases); partial_rotary_factor 1.0 (rope) or 0.0 (none), use_parallel_residual
  False, hidden_act "gelu".
- t5 / kerple: no stock HF class; not exported (tools/hf_export.py).
"""

from .alibi import AlibiBias, alibi_bias, alibi_slopes, rank_slopes
from .builder import build_model, transformer_config
from .compat import apply_cpu_compat
from .sinusoidal import sinusoidal_table

__all__ = [
    "AlibiBias",
    "alibi_bias",
    "alibi_slopes",
    "apply_cpu_compat",
    "build_model",
    "rank_slopes",
    "sinusoidal_table",
    "transformer_config",
]
