"""Exact export of our megatron-core GPT (TP=1/PP=1 state_dict) to Hugging Face models.

- ALiBi -> `MptForCausalLM`: same block (pre-LN, LayerNorm without bias, no linear biases, exact
  GELU, 4x MLP, tied embeddings, final LN); MPT keeps its ALiBi bias in fp32 and uses the paper's
  slopes (non-power-of-two rule included). Bloom and Falcon do not (docs/reference.md §4).
- sinusoidal -> `GPT2LMHeadModel`: the fixed table written into `wpe` for `max_positions`
  positions, zero biases, exact GELU, Conv1D weights transposed; an embedding scale s is folded in
  by untying: `wte = s * E`, `lm_head = E`.
- rope -> `GPTNeoXForCausalLM`: rotary on the full head (`partial_rotary_factor` 1.0), megatron's
  base, sequential residual (`use_parallel_residual` False), exact GELU, no attention biases, zero
  LayerNorm and MLP biases. Both rotate halves (megatron-core `rotary_interleaved=False`, GPT-NeoX
  `rotate_half`) with angles p * base^(-2k / dh) (docs/reference.md §4).
- none -> the same `GPTNeoXForCausalLM` with `partial_rotary_factor` 0.0: no rotated dims, NoPE.
- t5 / kerple: no stock HF class computes a learned bias over these buckets or this kernel in a
  decoder without `trust_remote_code`; refused, naming the methods that export.

megatron-core's fused `linear_qkv` is laid out per head, rows [(n, 3, dh), d] = [q_h, k_h, v_h]
for each head h; MPT and GPT-2 expect [all q | all k | all v], rows [(3, n, dh), d]; GPT-NeoX's
`query_key_value` is per head like megatron's.
"""

from __future__ import annotations

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, MptConfig, MptForCausalLM,
                          PreTrainedModel)

from pretrain.config import Config
from pretrain.model import sinusoidal_table

EXPORTABLE = {"alibi": "MptForCausalLM", "sinusoidal": "GPT2LMHeadModel", "rope": "GPTNeoXForCausalLM",
              "none": "GPTNeoXForCausalLM"}


class ExportError(ValueError):
    """A checkpoint that has no exact stock Hugging Face equivalent."""


def megatron_to_hf(cfg: Config, state_dict: dict[str, torch.Tensor], max_positions: int | None = None) -> PreTrainedModel:
    """Build the HF model equal to our model `cfg` with weights `state_dict` (fp32, eval mode).

    max_positions: longest input the HF model accepts (MPT `max_seq_len`, GPT-2 `n_positions` =
    rows of the written sinusoidal table, GPT-NeoX `max_position_embeddings`, not enforced);
    default 64 x the training length for ALiBi (no table: MPT only builds a [heads, 1, max_seq_len]
    bias per forward), 16 x for the others (GPT-2's table is stored in the weights).
    """
    m = cfg.model
    if m.position not in EXPORTABLE:
        raise ExportError(
            f"position={m.position!r} cannot be exported: no stock Hugging Face class reproduces it without "
            f"trust_remote_code. Methods that export: "
            + ", ".join(f"{k} -> {v}" for k, v in EXPORTABLE.items())
        )
    if m.bidirectional:
        raise ExportError("bidirectional (encoder) models have no causal-LM equivalent in Hugging Face")
    max_positions = max_positions or (64 if m.position == "alibi" else 16) * m.seq_length
    sd = {k: v.detach().to(torch.float32) for k, v in state_dict.items() if not k.endswith("_extra_state")}
    build = {"alibi": _to_mpt, "sinusoidal": _to_gpt2}.get(m.position, _to_neox)
    model = build(cfg, sd, max_positions)
    model.config.train_seq_length = m.seq_length  # read back by tools/eval_extrapolation.py
    model.config.position_method = m.position
    return model.eval()


# ------------------------------------------------------------------ helpers


def _pick(sd: dict[str, torch.Tensor], *names: str) -> torch.Tensor:
    """First present key: the local spec and TransformerEngine's fused-norm spec name LNs differently."""
    for n in names:
        if n in sd:
            return sd[n]
    raise KeyError(f"none of {names} in the checkpoint state_dict (keys like: {sorted(sd)[:6]} ...)")


def _layer(sd: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    p = f"decoder.layers.{i}."
    return {
        "ln1": _pick(sd, p + "input_layernorm.weight", p + "self_attention.linear_qkv.layer_norm_weight"),
        "qkv": _pick(sd, p + "self_attention.linear_qkv.weight"),
        "proj": _pick(sd, p + "self_attention.linear_proj.weight"),
        "ln2": _pick(sd, p + "pre_mlp_layernorm.weight", p + "mlp.linear_fc1.layer_norm_weight"),
        "fc1": _pick(sd, p + "mlp.linear_fc1.weight"),
        "fc2": _pick(sd, p + "mlp.linear_fc2.weight"),
    }


def qkv_heads_to_blocks(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """megatron [(n, 3, dh), d] per-head q,k,v rows -> HF [(3, n, dh), d] all-q | all-k | all-v."""
    rows, d = w.shape
    dh = rows // (3 * num_heads)
    return w.view(num_heads, 3, dh, d).transpose(0, 1).reshape(rows, d)


def _check_no_biases(sd: dict[str, torch.Tensor]) -> None:
    biased = [k for k, v in sd.items() if k.endswith(".bias") and v.abs().max() > 0]
    if biased:
        raise ExportError(f"the checkpoint has nonzero biases {biased[:4]}; the MPT-style block has none")


def _embedding(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return _pick(sd, "embedding.word_embeddings.weight")


def _output(sd: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return sd.get("output_layer.weight")


# ------------------------------------------------------------------ ALiBi -> MPT


def _to_mpt(cfg: Config, sd: dict[str, torch.Tensor], max_positions: int) -> MptForCausalLM:
    m = cfg.model
    if m.ffn_hidden_size != 4 * m.hidden_size:
        raise ExportError(f"MPT's MLP is 4 x d_model; ffn_hidden_size={m.ffn_hidden_size} != 4 x {m.hidden_size}")
    _check_no_biases(sd)
    out = _output(sd)
    hf_cfg = MptConfig(
        d_model=m.hidden_size, n_heads=m.num_attention_heads, n_layers=m.num_layers, expansion_ratio=4,
        max_seq_len=max_positions, vocab_size=m.vocab_size, layer_norm_epsilon=m.layernorm_epsilon,
        resid_pdrop=0.0, emb_pdrop=0.0, no_bias=True, learned_pos_emb=False, use_cache=True,
        attn_config={"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0},
        tie_word_embeddings=out is None or torch.equal(out, _embedding(sd)),
    )
    model = MptForCausalLM(hf_cfg)
    new = {"transformer.wte.weight": _embedding(sd), "transformer.norm_f.weight": sd["decoder.final_layernorm.weight"]}
    for i in range(m.num_layers):
        w, p = _layer(sd, i), f"transformer.blocks.{i}."
        new |= {
            p + "norm_1.weight": w["ln1"],
            p + "attn.Wqkv.weight": qkv_heads_to_blocks(w["qkv"], m.num_attention_heads),
            p + "attn.out_proj.weight": w["proj"],
            p + "norm_2.weight": w["ln2"],
            p + "ffn.up_proj.weight": w["fc1"],
            p + "ffn.down_proj.weight": w["fc2"],
        }
    new["lm_head.weight"] = out if out is not None else _embedding(sd)
    _load_exact(model, new)
    return model


# ------------------------------------------------------------------ sinusoidal -> GPT-2


def _to_gpt2(cfg: Config, sd: dict[str, torch.Tensor], max_positions: int) -> GPT2LMHeadModel:
    m = cfg.model
    _check_no_biases(sd)
    scale = m.embedding_scale
    emb = _embedding(sd)
    out = _output(sd)
    out = emb if out is None else out
    hf_cfg = GPT2Config(
        vocab_size=m.vocab_size, n_positions=max_positions, n_embd=m.hidden_size, n_layer=m.num_layers,
        n_head=m.num_attention_heads, n_inner=m.ffn_hidden_size, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=m.layernorm_epsilon,
        scale_attn_weights=True, tie_word_embeddings=scale == 1.0 and torch.equal(out, emb),
        bos_token_id=None, eos_token_id=None,
    )
    model = GPT2LMHeadModel(hf_cfg)
    d = m.hidden_size
    zeros = lambda n: torch.zeros(n)  # noqa: E731
    new = {
        "transformer.wte.weight": emb * scale,
        "transformer.wpe.weight": sinusoidal_table(torch.arange(max_positions), d),
        "transformer.ln_f.weight": sd["decoder.final_layernorm.weight"], "transformer.ln_f.bias": zeros(d),
        "lm_head.weight": out,
    }
    for i in range(m.num_layers):
        w, p = _layer(sd, i), f"transformer.h.{i}."
        new |= {  # Conv1D stores [in, out]: transpose every linear weight
            p + "ln_1.weight": w["ln1"], p + "ln_1.bias": zeros(d),
            p + "attn.c_attn.weight": qkv_heads_to_blocks(w["qkv"], m.num_attention_heads).t(),
            p + "attn.c_attn.bias": zeros(3 * d),
            p + "attn.c_proj.weight": w["proj"].t(), p + "attn.c_proj.bias": zeros(d),
            p + "ln_2.weight": w["ln2"], p + "ln_2.bias": zeros(d),
            p + "mlp.c_fc.weight": w["fc1"].t(), p + "mlp.c_fc.bias": zeros(m.ffn_hidden_size),
            p + "mlp.c_proj.weight": w["fc2"].t(), p + "mlp.c_proj.bias": zeros(d),
        }
    _load_exact(model, new)
    return model


# ------------------------------------------------------------------ rotary / none -> GPT-NeoX


def _to_neox(cfg: Config, sd: dict[str, torch.Tensor], max_positions: int) -> GPTNeoXForCausalLM:
    m = cfg.model
    _check_no_biases(sd)
    emb, out = _embedding(sd), _output(sd)
    out = emb if out is None else out
    hf_cfg = GPTNeoXConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, intermediate_size=m.ffn_hidden_size, hidden_act="gelu",
        max_position_embeddings=max_positions, layer_norm_eps=m.layernorm_epsilon, use_parallel_residual=False,
        attention_bias=False, hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=torch.equal(out, emb),
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base),
                         "partial_rotary_factor": 1.0 if m.position == "rope" else 0.0},
        bos_token_id=None, eos_token_id=None,
    )
    model = GPTNeoXForCausalLM(hf_cfg)
    d, zeros = m.hidden_size, torch.zeros
    new = {"gpt_neox.embed_in.weight": emb, "lm_head.weight": out,
           "gpt_neox.final_layer_norm.weight": sd["decoder.final_layernorm.weight"],
           "gpt_neox.final_layer_norm.bias": zeros(d)}
    for i in range(m.num_layers):
        w, p = _layer(sd, i), f"gpt_neox.layers.{i}."
        new |= {
            p + "input_layernorm.weight": w["ln1"], p + "input_layernorm.bias": zeros(d),
            p + "attention.query_key_value.weight": w["qkv"],  # per head [q_h, k_h, v_h], as megatron
            p + "attention.dense.weight": w["proj"],
            p + "post_attention_layernorm.weight": w["ln2"], p + "post_attention_layernorm.bias": zeros(d),
            p + "mlp.dense_h_to_4h.weight": w["fc1"], p + "mlp.dense_h_to_4h.bias": zeros(m.ffn_hidden_size),
            p + "mlp.dense_4h_to_h.weight": w["fc2"], p + "mlp.dense_4h_to_h.bias": zeros(d),
        }
    _load_exact(model, new)
    return model


def _load_exact(model: PreTrainedModel, new: dict[str, torch.Tensor]) -> None:
    """Copy every HF parameter from `new`; fail on any missing or unexpected one."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(params) - set(new))
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied:
        raise ExportError(f"export left HF parameters unset: {missing}")
    with torch.no_grad():
        for name, value in new.items():
            if name in tied:
                continue
            if name not in params:
                raise ExportError(f"export produced {name}, which {type(model).__name__} does not have")
            if params[name].shape != value.shape:
                raise ExportError(f"{name}: HF shape {tuple(params[name].shape)} != exported {tuple(value.shape)}")
            params[name].copy_(value.contiguous())
