"""Model logits and per-token loss against an independent naive float64 transformer.

The reference below shares no code with pretrain.model: it reads the state_dict by the key
names documented in pretrain/model/__init__.py, writes slopes, the sinusoidal table, rotary,
LayerNorm, attention and GELU from their formulas, and loops over heads. ALiBi and sinusoidal
(the issue's requirement), plus bidirectional ALiBi, rope and none.
"""

import math

import pytest
import torch

from pretrain.model import build_model

from .model_helpers import batch, small_config


def paper_slopes(n):
    def pow2(k):
        return [2.0 ** (-8.0 * (i + 1) / k) for i in range(k)]

    c = 1
    while c * 2 <= n:
        c *= 2
    return pow2(c) + pow2(2 * c)[0::2][: n - c]


def rope(t, base):
    """[b, s, dh] -> rotated: t * cos + rotate_half(t) * sin, angles p / base^(2k/dh) (float64)."""
    s, dh = t.shape[1], t.shape[2]
    half = dh // 2
    angles = torch.tensor([[p / base ** (2 * k / dh) for k in range(half)] for p in range(s)], dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [s, dh]
    rotated = torch.cat([-t[..., half:], t[..., :half]], -1)
    return t * cos + rotated * sin


def naive_logits(sd, cfg, ids, slopes=None):
    """float64 forward of the MPT-style block, [b, s] -> [b, s, V]; `slopes` overrides ALiBi's."""
    w = {k: v.double() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    E = w["embedding.word_embeddings.weight"]
    d, n = cfg.hidden_size, cfg.num_attention_heads
    dh = d // n
    b, s = ids.shape
    x = E[ids]  # [b, s, d]
    if cfg.position == "sinusoidal":
        half = d // 2
        pe = torch.zeros(s, d, dtype=torch.float64)
        for p in range(s):
            for k in range(half):
                angle = p / (10000.0 ** (k / (half - 1)))
                pe[p, k], pe[p, half + k] = math.sin(angle), math.cos(angle)
        x = cfg.embedding_scale * x + pe
    slopes = slopes or (paper_slopes(n) if cfg.position == "alibi" else [0.0] * n)
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]

    def ln(t, weight):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + cfg.layernorm_epsilon) * weight

    for layer in range(cfg.num_layers):
        p = f"decoder.layers.{layer}."
        h = ln(x, w[p + "input_layernorm.weight"])
        qkv = (h @ w[p + "self_attention.linear_qkv.weight"].T).view(b, s, n, 3, dh)  # per head [q, k, v]
        heads = []
        for hd in range(n):
            q, k, v = qkv[:, :, hd, 0], qkv[:, :, hd, 1], qkv[:, :, hd, 2]  # [b, s, dh]
            if cfg.position == "rope":  # GPT-NeoX style: rotate halves, angle p * base^(-2k/dh)
                q, k = rope(q, cfg.rotary_base), rope(k, cfg.rotary_base)
            if cfg.bidirectional:  # encoder: symmetric bias, no mask
                scores = q @ k.transpose(1, 2) / math.sqrt(dh) - slopes[hd] * (i - j).abs()  # [b, s, s]
            else:
                scores = q @ k.transpose(1, 2) / math.sqrt(dh) - slopes[hd] * (i - j)  # [b, s, s]
                scores = scores.masked_fill(j > i, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v)
        x = x + torch.cat(heads, -1) @ w[p + "self_attention.linear_proj.weight"].T
        h = ln(x, w[p + "pre_mlp_layernorm.weight"])
        u = h @ w[p + "mlp.linear_fc1.weight"].T
        x = x + (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ w[p + "mlp.linear_fc2.weight"].T
    return ln(x, w["decoder.final_layernorm.weight"]) @ E.T


@pytest.mark.parametrize("position,bidirectional",
                         [("alibi", False), ("sinusoidal", False), ("alibi", True), ("rope", False), ("none", False)])
def test_logits_and_loss_match_naive_float64(single_process, position, bidirectional):
    torch.manual_seed(0)
    cfg = small_config(position, heads=12, bidirectional=bidirectional)
    model = build_model(cfg).eval()
    ids, pos, labels = batch(cfg)
    with torch.no_grad():
        logits = model(ids, pos, None, runtime_gather_output=True)  # [b, s, V]
        loss = model(ids, pos, None, labels=labels)  # [b, s]
    want = naive_logits(model.state_dict(), cfg, ids)
    scale = want.abs().max().item()
    assert (logits.double() - want).abs().max().item() <= 1e-5 * scale
    want_loss = torch.nn.functional.cross_entropy(want.reshape(-1, cfg.vocab_size), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss.double().reshape(-1), want_loss, rtol=1e-5, atol=1e-6)


def test_naive_reference_detects_wrong_slopes(single_process):
    # Guard against a reference that cannot fail: the same model scored with local (6-head)
    # slopes on the second half of the heads differs far beyond the tolerance.
    torch.manual_seed(0)
    cfg = small_config("alibi", heads=12)
    model = build_model(cfg).eval()
    ids, pos, _ = batch(cfg)
    with torch.no_grad():
        logits = model(ids, pos, None, runtime_gather_output=True).double()
    wrong = naive_logits(model.state_dict(), cfg, ids, slopes=paper_slopes(12)[:6] + paper_slopes(6))  # BigScience #227
    assert (logits - wrong).abs().max().item() > 1e-3 * wrong.abs().max().item()


def test_bf16_params_keep_fp32_slopes(single_process):
    # model.bfloat16() must not round the slopes: they live outside the module's buffers.
    torch.manual_seed(0)
    cfg = small_config("alibi", heads=12)
    model = build_model(cfg, params_dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not list(model.buffers())
    ids, pos, _ = batch(cfg, s=64)
    with torch.no_grad():
        logits = model(ids, pos, None, runtime_gather_output=True)
    want = naive_logits(model.state_dict(), cfg, ids)
    assert (logits.double() - want).abs().max().item() < 0.05 * want.abs().max().item()  # bf16 weights/activations
