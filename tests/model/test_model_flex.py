"""FlexAttention path (ALiBi as score_mod over the TP rank's slopes, causal block_mask)
against a naive float64 attention, and against the SDPA reference on a GPU."""

import math

import pytest
import torch

from pretrain.model import alibi_slopes
from pretrain.model import AlibiBias
from pretrain.model.attention import flex_kernel, sdpa_kernel


def naive_attention(q, k, v, slopes, causal):
    """float64 softmax(q k^T / sqrt(d) + bias) v with slopes given per local head (or None)."""
    q, k, v = (t.double() for t in (q, k, v))
    s = q.shape[2]
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [b, h, s, s]
    if slopes is not None:
        dist = (i - j) if causal else (i - j).abs()
        scores = scores - torch.tensor(slopes, dtype=torch.float64)[:, None, None] * dist
    if causal:
        scores = scores.masked_fill(j > i, float("-inf"))
    return torch.softmax(scores, -1) @ v


def qkv(b=2, h=6, s=48, d=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, device=device, dtype=dtype) for _ in range(3)]


# 12 global heads, this rank = TP rank 1 of 2: local heads are global heads 6..11
CASES = [("alibi-causal", True, True), ("alibi-bidirectional", True, False), ("nobias-causal", False, True)]


@pytest.mark.parametrize("name,alibi,causal", CASES, ids=[c[0] for c in CASES])
def test_flex_score_mod_matches_naive_cpu(name, alibi, causal):
    q, k, v = qkv()
    bias = AlibiBias(12, 2, 1) if alibi else None
    out = flex_kernel(q, k, v, bias=bias, causal=causal, scale=None, compiled=False)
    want = naive_attention(q, k, v, alibi_slopes(12)[6:] if alibi else None, causal)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    ref = sdpa_kernel(q, k, v, bias=bias, causal=causal, scale=None)
    torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_flex_compiled_forward_cpu():
    # The compiled kernel itself (forward only: torch 2.13 has no CPU flex backward); ~20-45 s compile.
    q, k, v = qkv()
    bias = AlibiBias(12, 2, 1)
    out = flex_kernel(q, k, v, bias=bias, causal=True, scale=None)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, alibi_slopes(12)[6:], True), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_flex_matches_sdpa_reference_gpu_bf16_fwd_bwd(causal):
    dev = "cuda"
    q, k, v = (t.requires_grad_() for t in qkv(b=2, h=8, s=1024, d=128, dtype=torch.bfloat16, device=dev))
    bias = AlibiBias(16, 2, 1)
    grad = torch.randn_like(q)
    outs, grads = [], []
    for kernel in (flex_kernel, sdpa_kernel):  # rank 1 of TP=2: heads 8..15
        out = kernel(q, k, v, bias=bias, causal=causal, scale=None)
        (dq, dk, dv) = torch.autograd.grad(out, (q, k, v), grad)
        outs.append(out.float())
        grads.append([g.float() for g in (dq, dk, dv)])
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("position", ["alibi", "sinusoidal"])
def test_model_flex_matches_sdpa_gpu(single_process, position):
    from pretrain.model import build_model

    from .model_helpers import batch, small_config

    results = []
    for backend in ("flex", "sdpa"):
        torch.manual_seed(0)
        cfg = small_config(position, heads=16, hidden_size=1024, seq_length=512, attention_backend=backend)
        model = build_model(cfg, params_dtype=torch.bfloat16).cuda()
        ids, pos, labels = (t.cuda() for t in batch(cfg))
        loss = model(ids, pos, None, labels=labels)  # [b, s] fp32
        loss.mean().backward()
        results.append((loss.detach(), model.embedding.word_embeddings.weight.grad.float()))
    (l_flex, g_flex), (l_ref, g_ref) = results
    torch.testing.assert_close(l_flex, l_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g_flex, g_ref, rtol=5e-2, atol=5e-2 * g_ref.abs().max().item())
