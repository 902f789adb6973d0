"""The attention kernels. FlexAttention (ALiBi as score_mod over the TP rank's slopes, causal
block_mask; the T5 table and KERPLE kernel as score_mods over learned tensors) against a naive
float64 attention on the CPU; on a GPU every installed fast kernel (flex, flex-flash, fa2) against
the fp32-bias SDPA reference and a naive fp32 attention with the TP rank's slopes, forward and
backward (learned parameters included), alone and inside the model. Kernel choice (auto's order,
refusals with their fix) and the compile settings are checked on the CPU."""

import logging
import math
import sys
from typing import get_args

import pytest
import torch

from pretrain.config import AttentionBackend
from pretrain.model import alibi_slopes
from pretrain.model import AlibiBias
from pretrain.model import attention, spec
from pretrain.model.attention import KERNELS, flex_kernel, sdpa_kernel
from pretrain.model.relative import KerpleBias, T5Bias

from .test_model_reference import t5_bucket

FAST = ["flex", "flex-flash", "fa2"]


def gpu_kernel(name):
    """The kernel `name` on this GPU, or a skip saying why it cannot run here."""
    reason = attention.kernel_unavailable(name, torch.cuda.is_available())
    if reason:
        pytest.skip(f"{name}: {reason}")
    return KERNELS[name]


def naive_attention(q, k, v, slopes, causal, bias=None):
    """float64 softmax(q k^T / sqrt(d) + bias) v with ALiBi slopes given per local head, or any
    float64 `bias` [h, s, s], or neither."""
    q, k, v = (t.double() for t in (q, k, v))
    s = q.shape[2]
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [b, h, s, s]
    if bias is not None:
        scores = scores + bias
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


def learned_bias(position, heads=12, tp_size=2, tp_rank=1, seed=0):
    """This rank's T5 / KERPLE module with parameters far from init (and one KERPLE r2 clamped)."""
    torch.manual_seed(seed)
    if position == "t5":
        bias = T5Bias(heads, tp_size, tp_rank, num_buckets=8, max_distance=20, hidden_size=64)
        with torch.no_grad():
            bias.weight.normal_(0.0, 2.0)
    else:
        bias = KerpleBias(heads, tp_size, tp_rank)
        with torch.no_grad():
            bias.r1.uniform_(0.0, 3.0)
            bias.r2.uniform_(0.0, 1.0)[0] = 0.001
    return bias


def naive_learned_bias(bias, s, causal):
    """float64 [h, s, s] from the module's parameters and the formulas (T5 buckets in Python)."""
    if isinstance(bias, T5Bias):
        buckets = torch.tensor([[t5_bucket(j - i, causal, 8, 20) for j in range(s)] for i in range(s)])
        return bias.weight.detach().double()[buckets].permute(2, 0, 1)
    r1, r2 = (r.detach().double().clamp(min=0.01)[:, None, None] for r in (bias.r1, bias.r2))
    dist = (torch.arange(s)[:, None] - torch.arange(s)[None, :]).abs()
    return -r1 * torch.log(1 + r2 * dist)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("position", ["t5", "kerple"])
def test_learned_score_mod_matches_naive_cpu(position, causal):
    q, k, v = qkv()
    bias = learned_bias(position)
    with torch.no_grad():  # CPU flex: forward only
        out = flex_kernel(q, k, v, bias=bias, causal=causal, scale=None, compiled=False)
    want = naive_attention(q, k, v, None, causal, naive_learned_bias(bias, q.shape[2], causal))
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


@pytest.mark.slow
def test_flex_compiled_t5_forward_cpu_follows_the_trained_table():
    # The compiled T5 score_mod (bucket lookup inside the kernel) matches float64, and a table
    # changed by training is read by the same compiled graph: no recompile per step or layer.
    from torch._dynamo.utils import counters

    q, k, v = qkv(s=128)
    bias = learned_bias("t5").requires_grad_(False)  # CPU flex: forward only
    graphs = None
    for _ in range(2):
        out = flex_kernel(q, k, v, bias=bias, causal=True, scale=None)
        want = naive_attention(q, k, v, None, True, naive_learned_bias(bias, 128, True))
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
        graphs = graphs if graphs is not None else counters["stats"]["unique_graphs"]
        with torch.no_grad():
            bias.weight.add_(torch.randn_like(bias.weight))  # an optimizer step
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", FAST)
def test_kernel_matches_references_gpu_bf16_fwd_bwd(name, causal):
    kernel = gpu_kernel(name)
    g = torch.Generator(device="cuda").manual_seed(0)
    # the model's real layout: megatron hands [s, b, np, hn]; CoreAttention views it as [b, np, s, hn]
    base = [torch.randn(1024, 2, 8, 128, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
            for _ in range(3)]
    q, k, v = (t.permute(1, 2, 0, 3) for t in base)  # [b, np, s, hn], strided
    bias = AlibiBias(16, 2, 1)  # rank 1 of TP=2: heads 8..15
    grad = torch.randn_like(q)
    outs, grads = [], []
    for fn in (kernel, sdpa_kernel):
        out = fn(q, k, v, bias=bias, causal=causal, scale=None)
        outs.append(out.float())
        grads.append([t.float() for t in torch.autograd.grad(out, (q, k, v), grad)])
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
    # the TP head offset against slopes written out independently (global heads 8..15 of 16)
    ref = naive_attention(*(t.detach().cpu() for t in (q, k, v)), alibi_slopes(16)[8:], causal)
    torch.testing.assert_close(outs[0].double().cpu(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("position", ["alibi", "sinusoidal"])
@pytest.mark.parametrize("name", FAST)
def test_model_kernel_matches_sdpa_gpu(single_process, monkeypatch, name, position):
    from pretrain.model import build_model

    from .model_helpers import batch, small_config

    gpu_kernel(name)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # the suite's CPU default: this test builds for the GPU
    results = []
    for backend in (name, "sdpa"):
        torch.manual_seed(0)
        cfg = small_config(position, heads=16, hidden_size=1024, seq_length=512, attention_backend=backend)
        model = build_model(cfg, params_dtype=torch.bfloat16).cuda()
        ids, pos, labels = (t.cuda() for t in batch(cfg))
        loss = model(ids, pos, None, labels=labels)  # [b, s] fp32
        loss.mean().backward()
        results.append((loss.detach(), model.embedding.word_embeddings.weight.grad.float()))
    (l_fast, g_fast), (l_ref, g_ref) = results
    torch.testing.assert_close(l_fast, l_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g_fast, g_ref, rtol=5e-2, atol=5e-2 * g_ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("position", ["t5", "kerple"])
def test_learned_flex_matches_sdpa_reference_gpu_fwd_bwd(position, causal):
    # The compiled score_mod over learned tensors (rank 1 of TP=2) against the dense reference:
    # outputs and the gradients of q, k, v AND of the learned bias parameters (fp32).
    dev = "cuda"
    q, k, v = (t.requires_grad_() for t in qkv(b=2, h=6, s=1024, d=64, device=dev))
    bias = learned_bias(position).to(dev)
    params = list(bias.parameters())
    grad = torch.randn_like(q)
    outs, grads = [], []
    for kernel in (flex_kernel, sdpa_kernel):
        out = kernel(q, k, v, bias=bias, causal=causal, scale=None)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (q, k, v, *params), grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_t5_bucket_table_reaches_the_device_once():
    """Each of a model's layers builds its score_mod (flex) or dense bias (sdpa) from the one T5
    module at every forward: the bucket table is copied to the device once per process, not once
    per layer and step (a host-to-device copy each; "meta" stands in for the GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Copies.count += "copy" in func.__name__ and out.device.type == "meta"  # host -> "device"
            return out

    bias = T5Bias(4, 1, 0, num_buckets=12, max_distance=40, hidden_size=64)
    with Copies():
        for _layer in range(24):
            bias.score_mod(True, "meta")
    assert Copies.count <= 1, f"{Copies.count} copies of the bucket table for 24 layers"


def test_learned_bias_falls_back_to_sdpa_where_flex_cannot_train_it(single_process, monkeypatch, caplog):
    # On a GPU whose torch gives no gradient for score_mod-captured tensors, t5/kerple use sdpa.
    from pretrain.model import build_model, spec

    from .model_helpers import small_config

    monkeypatch.setattr(spec, "use_gpu", lambda: True)
    monkeypatch.setattr(spec, "kernel_unavailable", lambda name, gpu: None)
    monkeypatch.setattr(spec, "flex_trains_captured_tensors", lambda device, kernel="flex": False)
    assert spec.model_backend(small_config("alibi", attention_backend="flex")) == "flex"  # nothing learned
    with caplog.at_level(logging.WARNING, logger="pretrain.model.spec"):
        assert spec.model_backend(small_config("t5", attention_backend="flex")) == "sdpa"
    assert "using the sdpa kernel instead" in caplog.text
    monkeypatch.setattr(spec, "flex_trains_captured_tensors", lambda device, kernel="flex": True)
    model = build_model(small_config("kerple", attention_backend="flex"))
    assert model.decoder.layers[0].self_attention.core_attention.kernel is flex_kernel


def test_learned_bias_falls_back_from_flex_flash_to_flex_not_sdpa(single_process, monkeypatch, caplog):
    # flex-flash without a correct gradient for the captured table: the next FlexAttention kernel
    # (Triton flex, where it trains the table), not the dense-bias sdpa path.
    from pretrain.model import spec

    from .model_helpers import small_config

    monkeypatch.setattr(spec, "use_gpu", lambda: True)
    monkeypatch.setattr(spec, "kernel_unavailable", lambda name, gpu: None)
    monkeypatch.setattr(spec, "flex_trains_captured_tensors", lambda device, kernel="flex": kernel == "flex")
    with caplog.at_level(logging.WARNING, logger="pretrain.model.spec"):
        assert spec.model_backend(small_config("t5", attention_backend="flex-flash")) == "flex"
        assert spec.model_backend(small_config("kerple", attention_backend="auto")) == "flex"
    assert "flex-flash kernel gives no correct gradient" in caplog.text and "using the flex kernel" in caplog.text
    monkeypatch.setattr(spec, "flex_trains_captured_tensors", lambda device, kernel="flex": False)
    assert spec.model_backend(small_config("t5", attention_backend="flex-flash")) == "sdpa"  # neither trains it


def fake_hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(spec, "use_gpu", lambda: True)


def test_broken_flash_attn_install_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    """A flash_attn built for another torch fails at import (undefined symbol): auto says why and
    takes the next kernel; nothing raises."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.partition(".")[0] == "flash_attn"]:  # a real one imported earlier
        monkeypatch.delitem(sys.modules, name)
    fake_hopper(monkeypatch)
    reason = attention.kernel_unavailable("fa2", True)
    assert reason.startswith("needs the flash-attn package") and "undefined symbol" in reason, reason
    assert "flash_attn.cute" in attention.kernel_unavailable("flex-flash", True)
    assert spec.resolve_backend("auto", ["alibi"]) == "flex"


def test_flex_flash_on_torch_2_11_says_why_and_auto_takes_the_next_kernel(monkeypatch):
    """torch 2.11 (the device image's) has the FLASH backend only with patches: refused with the
    reason; an explicit request is refused with the fix, auto takes flex (fa2 made absent)."""
    fake_hopper(monkeypatch)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(attention, "_import_error", lambda module: f"ModuleNotFoundError: No module named {module!r}")
    reason = attention.kernel_unavailable("flex-flash", True)
    assert reason == ("needs torch >= 2.13 for FlexAttention's FLASH backend (this is 2.11.0+cu130, where it "
                      "trains only with patches)")
    assert spec.resolve_backend("auto", ["alibi"]) == "flex"
    with pytest.raises(ValueError, match=r"attention_backend=flex-flash needs torch >= 2.13 .*; use auto"):
        spec.resolve_backend("flex-flash", ["alibi"])


def test_flash_backend_check_reports_failure_instead_of_raising():
    # Where the FLASH backend cannot run (here: a CPU), the forward+backward check returns why.
    assert isinstance(attention._flash_backend_error.__wrapped__("cpu"), str)


@pytest.mark.gpu
def test_flex_trains_captured_tensors_on_this_gpu():
    # The check that model_backend relies on: False here means t5/kerple train on sdpa (logged).
    from pretrain.model.attention import flex_trains_captured_tensors

    assert flex_trains_captured_tensors("cuda")


def test_backend_names_and_auto_order(monkeypatch):
    """Every kernel is a config value; auto takes the first of AUTO_ORDER that can run (sdpa on a
    CPU), FlashAttention-2 only for ALiBi or no bias; an explicit kernel that cannot run, or fa2
    with another bias, is refused with the fix."""
    assert set(get_args(AttentionBackend)) == {"auto", *KERNELS}
    assert spec.resolve_backend("auto", ["alibi"]) == "sdpa"  # this CPU
    with pytest.raises(ValueError, match="attention_backend=fa2 needs a CUDA GPU.*use auto"):
        spec.resolve_backend("fa2", ["alibi"])

    missing = set()
    monkeypatch.setattr(spec, "use_gpu", lambda: True)
    monkeypatch.setattr(spec, "kernel_unavailable", lambda name, gpu: "not installed" if name in missing else None)
    monkeypatch.setitem(spec.POSITIONS, "t5like", spec.PositionSpec("none", score_bias=lambda c, tp, r: object()))
    assert spec.resolve_backend("auto", ["alibi", "sinusoidal"]) == "flex-flash"
    missing.add("flex-flash")
    assert spec.resolve_backend("auto", ["alibi"]) == "fa2"
    assert spec.resolve_backend("auto", ["alibi", "t5like"]) == "flex"  # another bias: not fa2
    with pytest.raises(ValueError, match="fa2 adds ALiBi slopes only.*t5like.*use flex or auto"):
        spec.resolve_backend("fa2", ["t5like"])
    with pytest.raises(ValueError, match="fa2 adds ALiBi slopes only, not a object"):
        attention.fa2_kernel(*qkv(), bias=object(), causal=True, scale=None)
    missing.update({"fa2", "flex"})
    assert spec.resolve_backend("auto", ["alibi"]) == "sdpa"


def test_compile_is_fullgraph_static_and_logs_recompiles(capfd, monkeypatch):
    """The settings FlexAttention is compiled with, on a cheap function (the eager backend, no
    inductor build): a new shape recompiles and says so; a graph break raises."""
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    torch._dynamo.reset()
    double = attention.compile_static(lambda x: x * 2, backend="eager")
    double(torch.ones(4))
    double(torch.ones(8))  # a new static shape: a recompile, logged with its reason
    err = capfd.readouterr().err
    assert "Recompiling function" in err and "size mismatch" in err, err
    broken = attention.compile_static(lambda x: torch._dynamo.graph_break() or x + 1, backend="eager")
    with pytest.raises(Exception, match="graph_break|Graph break|graph break"):
        broken(torch.ones(4))
    torch._logging.set_logs()
    torch._dynamo.reset()
