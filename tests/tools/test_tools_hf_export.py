"""HF export is exact: HF logits equal our megatron-core model's (fp32) at L and 4L, greedy
generation is identical (ALiBi -> MPT, sinusoidal -> GPT-2, rotary and none -> GPT-NeoX), and
methods without a stock HF class (t5, kerple) are refused by name."""

import pytest
import torch
from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM, MptForCausalLM

from pretrain.config import Config, ModelConfig
from pretrain.model import build_model
from pretrain.parallel import init_model_parallel
from tools.hf_export import ExportError, megatron_to_hf

from helpers import assert_hf_generates_like, megatron_logits

L = 32


def tiny(position: str, heads: int = 12) -> Config:
    d = 48
    sinus = position == "sinusoidal"
    return Config(model=ModelConfig(
        num_layers=2, hidden_size=d, num_attention_heads=heads, ffn_hidden_size=4 * d, vocab_size=96,
        seq_length=L, position=position, init_method_std=0.15,  # large weights: peaked, sensitive logits
        embedding_scale=d**0.5 if sinus else 1.0, embedding_init_std=d**-0.5 if sinus else 0.3,
    ))


def our_model(cfg: Config, seed: int = 0) -> torch.nn.Module:
    init_model_parallel(tp=1)
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # LayerNorm weights away from 1 so a mis-mapped norm shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("position,heads,cls", [
    ("alibi", 12, MptForCausalLM),  # 12 heads: the non-power-of-two slope rule
    ("alibi", 8, MptForCausalLM),
    ("sinusoidal", 12, GPT2LMHeadModel),
    ("rope", 12, GPTNeoXForCausalLM),
    ("none", 12, GPTNeoXForCausalLM),
])
def test_hf_logits_and_generation_equal_ours(position, heads, cls):
    cfg = tiny(position, heads)
    model = our_model(cfg)
    hf = megatron_to_hf(cfg, model.state_dict(), max_positions=4 * L)
    assert type(hf) is cls
    torch.manual_seed(1)
    for length in (L, 4 * L):
        x = torch.randint(0, cfg.model.vocab_size, (2, length))
        ours = megatron_logits(model, x)
        with torch.no_grad():
            theirs = hf(x).logits
        assert ours.abs().max() > 3  # logits that are not all near zero
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert_hf_generates_like(hf, model, torch.randint(0, cfg.model.vocab_size, (1, 8)))


def test_export_depends_on_the_qkv_reordering():
    """Negative control: without the per-head -> blocked qkv reordering the logits differ."""
    import tools.hf_export as hx

    cfg = tiny("alibi")
    model = our_model(cfg)
    x = torch.randint(0, cfg.model.vocab_size, (1, L))
    orig = hx.qkv_heads_to_blocks
    try:
        hx.qkv_heads_to_blocks = lambda w, n: w
        wrong = megatron_to_hf(cfg, model.state_dict(), max_positions=L)
    finally:
        hx.qkv_heads_to_blocks = orig
    with torch.no_grad():
        assert (wrong(x).logits - megatron_logits(model, x)).abs().max() > 1e-2


def test_rotary_export_depends_on_the_rotation():
    """Negative control: the same rotary weights exported without rotation (as NoPE) differ."""
    import dataclasses

    cfg = tiny("rope")
    model = our_model(cfg)
    nope = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, position="none"))
    x = torch.randint(0, cfg.model.vocab_size, (1, L))
    with torch.no_grad():
        assert (megatron_to_hf(nope, model.state_dict()).eval()(x).logits - megatron_logits(model, x)).abs().max() > 1e-2


@pytest.mark.parametrize("position", ["t5", "kerple"])
def test_learned_biases_are_refused_naming_the_exportable_methods(position):
    cfg = tiny(position)
    with pytest.raises(ExportError, match=r"alibi -> MptForCausalLM, sinusoidal -> GPT2LMHeadModel, "
                                          r"rope -> GPTNeoXForCausalLM, none -> GPTNeoXForCausalLM"):
        megatron_to_hf(cfg, {})
