"""Model logits and per-token loss against an independent naive float64 transformer.

The reference below shares no code with pretrain.model: it reads the state_dict by the key
names documented in pretrain/model/__init__.py, writes slopes, the sinusoidal table, rotary,
LayerNorm, attention and GELU from their formulas, and loops over heads. ALiBi and sinusoidal
(the issue's requirement), plus bidirectional ALiBi, rope and none; the learned biases (T5 with
its bucket function written out here and checked on hand-computed distances, KERPLE) in both
directions, forward and gradients of every parameter.
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


def t5_bucket(rel, causal, num_buckets=32, max_distance=128):
    """T5's bucket of relative position rel = j - i (Raffel et al. 2020; Mesh TensorFlow's
    `_relative_position_bucket`), in float64 Python arithmetic."""
    n = max(-rel, 0) if causal else abs(rel)
    side = num_buckets if causal else num_buckets // 2
    offset = side if not causal and rel > 0 else 0
    exact = side // 2
    if n < exact:
        return offset + n
    return offset + min(side - 1, exact + math.floor(math.log(n / exact) / math.log(max_distance / exact) * (side - exact)))


def naive_bias(w, cfg, hd, s, slopes):
    """float64 [s, s] score bias of head hd (before the causal mask)."""
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    dist = (i - j).abs() if cfg.bidirectional else (i - j)
    if cfg.position == "t5":
        buckets = [[t5_bucket(jj - ii, not cfg.bidirectional, cfg.t5_num_buckets, cfg.t5_max_distance)
                    for jj in range(s)] for ii in range(s)]
        return w["position_bias.weight"][torch.tensor(buckets), hd]
    if cfg.position == "kerple":  # -r1 log(1 + r2 |i - j|) with the values KERPLE clamps to >= 0.01
        return -w["kerple.r1"][hd] * torch.log(1 + w["kerple.r2"][hd] * (i - j).abs())
    return -slopes[hd] * dist


def naive_logits(sd, cfg, ids, slopes=None):
    """float64 forward of the MPT-style block, [b, s] -> [b, s, V]; `slopes` overrides ALiBi's.
    KERPLE reads its clamped kernel parameters from sd["kerple.r1"], sd["kerple.r2"]."""
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
            scores = q @ k.transpose(1, 2) / math.sqrt(dh) + naive_bias(w, cfg, hd, s, slopes)  # [b, s, s]
            if not cfg.bidirectional:  # encoder: no mask
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


# T5's buckets worked out by hand for the default 32 buckets, max distance 128.
# Causal (one-sided, 32 buckets for the past distance n = i - j): n < 16 -> n; else
# 16 + floor(16 * ln(n / 16) / ln 8): n=19: 16 * 0.1719 / 2.0794 = 1.32 -> 17; n=22: 2.45 -> 18;
# n=32: 16/3 = 5.33 -> 21; n=64: 32/3 = 10.67 -> 26; n=90: 16 * 1.7272 / 2.0794 = 13.29 -> 29;
# n=127: 15.94 -> 31; n >= 128: 16 -> capped at 31. Keys after the query (rel > 0): bucket 0.
CAUSAL_BUCKETS = {0: 0, -1: 1, -15: 15, -16: 16, -18: 16, -19: 17, -22: 18, -32: 21, -64: 26, -90: 29, -127: 31,
                  -128: 31, -5000: 31, 3: 0}
# Bidirectional (16 buckets per side, exact below 8, log-spaced to 128: 8 + floor(8 * log_16(n / 8))):
# n=9: 8 * 0.1178 / 2.7726 = 0.34 -> 8; n=16: exactly 2 -> 10; n=32: 4 -> 12; n=64: 6 -> 14;
# n=127: 7.98 -> 15; n >= 128: 8 -> capped at 15. Keys after the query (rel = j - i > 0): +16.
BIDIRECTIONAL_BUCKETS = {0: 0, -1: 1, -7: 7, -9: 8, -16: 10, -32: 12, -64: 14, -127: 15, -128: 15, -900: 15,
                         1: 17, 7: 23, 16: 26, 64: 30, 900: 31}


@pytest.mark.parametrize("causal,expected", [(True, CAUSAL_BUCKETS), (False, BIDIRECTIONAL_BUCKETS)])
def test_t5_buckets_hand_computed(causal, expected):
    from pretrain.model import relative

    lut = relative.t5_bucket_of_distance(32 if causal else 16, 128)
    ours = lambda rel: relative.t5_bucket(torch.tensor(rel), lut, causal, 32).tolist()  # noqa: E731
    assert ours(list(expected)) == list(expected.values())
    assert [t5_bucket(r, causal) for r in expected] == list(expected.values())  # the reference above
    every = list(range(-3000, 3000))  # and the two agree on every distance
    assert ours(every) == [t5_bucket(r, causal) for r in every]


def _learned_bias_model(position, bidirectional):
    """A model whose learned bias is far from its init, so a wrong bucket or head shows."""
    torch.manual_seed(0)
    cfg = small_config(position, heads=12, bidirectional=bidirectional, t5_num_buckets=8, t5_max_distance=12)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.position_bias.parameters():
            p.copy_(2 * torch.rand_like(p) if position == "kerple" else 2 * torch.randn_like(p))
        if position == "kerple":
            model.position_bias.r2[0] = 0.001  # below KERPLE's 0.01 bound: clamped in the forward
    return cfg, model


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("position", ["t5", "kerple"])
def test_learned_bias_logits_and_gradients_match_float64(single_process, position, bidirectional):
    cfg, model = _learned_bias_model(position, bidirectional)
    ids, pos, labels = batch(cfg)  # s = 16 > t5_max_distance: the capped bucket is used
    logits = model(ids, pos, None, runtime_gather_output=True)  # [b, s, V]
    torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.reshape(-1)).backward()

    leaves = {k: v.detach().double().requires_grad_() for k, v in model.state_dict().items()
              if isinstance(v, torch.Tensor)}
    if position == "kerple":  # the values the forward uses, as leaves of their own
        leaves |= {f"kerple.{r}": leaves[f"position_bias.{r}"].detach().clamp(min=0.01).requires_grad_()
                   for r in ("r1", "r2")}
    want = naive_logits(leaves, cfg, ids)
    scale = want.abs().max().item()
    assert (logits.double() - want).abs().max().item() <= 1e-5 * scale
    torch.nn.functional.cross_entropy(want.reshape(-1, cfg.vocab_size), labels.reshape(-1)).backward()

    for name, p in model.named_parameters():
        # KERPLE: the gradient of the used (clamped) value passes to the parameter (straight through)
        ref = leaves[name.replace("position_bias.", "kerple.") if position == "kerple" else name].grad
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(p.grad.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=name)
