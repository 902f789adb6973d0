"""Attention kernel benchmark: forward+backward TFLOP/s and peak memory per variant.

Variants (causal, b = tokens // L sequences, h heads of d):
  alibi-flex         FlexAttention, ALiBi score_mod + causal block_mask (the model's GPU path)
  sinusoidal-flex    FlexAttention, causal block_mask only (sinusoidal/rope/none attention)
  sdpa-bias          SDPA with a materialized [h, L, L] float bias in the input dtype (the usual
                     way to add ALiBi; falls off the flash kernel)
  sdpa-ref-fp32bias  the model's reference path (pretrain.model.attention.sdpa_kernel: fp32 bias,
                     q/k/v upcast to fp32)
  sdpa-flash-nobias  SDPA is_causal, flash kernel, no bias
  sdpa-cudnn-nobias  SDPA is_causal, cuDNN kernel, no bias
  alibi-flex-flash, sinusoidal-flex-flash   FlexAttention on its FlashAttention-4 backend, and
  alibi-fa2, sinusoidal-fa2                 FlashAttention-2 (alibi_slopes): where installed
  t5-flex, kerple-flex          FlexAttention, the learned T5 table / KERPLE kernel as score_mod
                                (on a GPU the backward includes the bias parameters' gradients)
  t5-sdpa-ref, kerple-sdpa-ref  the model's reference path for them (dense fp32 bias)
The ceiling is the fastest no-bias variant at each L (`x ceil`: time over the ceiling's); `x fam`
compares each biased variant with the no-bias variant of its own kernel family (ALiBi's goal: <= 1.10).
q/k/v are laid out as the model hands them to the kernel: megatron's [s, b, np, hn] viewed as
[b, np, s, hn] (strided; --contiguous for contiguous [b, np, s, hn] tensors).
FLOPs counted for every variant as the causal half of 4*b*h*L^2*d forward, x3.5 forward+backward.
Outputs are checked (max abs diff in the table) against sdpa-ref-fp32bias for the ALiBi
variants, the method's own *-sdpa-ref for T5 and KERPLE, and sdpa-flash-nobias for the others.
A variant that fails is reported, not fatal; one that cannot run here (flex-flash, fa2: no
GPU, not installed, a torch without the feature) is listed as skipped with the reason, and the
other kernels are measured. Each row is printed and --out rewritten (atomically) the moment it
is measured, references first, then the model's kernels: a time-out keeps every row taken; the
table with the ratios comes last.

GPU:  python tools/bench/attention.py --out docs/bench_attention.json
CPU smoke (tiny sizes, flex forward-only in eager mode: CPU flex has no backward):
      python tools/bench/attention.py --smoke --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import TYPE_CHECKING

from data_prep.files import write_atomic
from pretrain.parallel import use_gpu

if TYPE_CHECKING:  # torch and the model's kernels are imported where used: --help stays instant
    import torch


REFERENCE = {"alibi": "sdpa-ref-fp32bias", "none": "sdpa-flash-nobias", "t5": "t5-sdpa-ref", "kerple": "kerple-sdpa-ref"}
"""Each method's reference variant: the others' outputs are compared with it (so it runs first)."""


def variants(h: int, L: int, dev: str, dtype: torch.dtype, smoke: bool) -> dict:
    """name -> (fn(q, k, v) or the reason it cannot run here, method), most valuable first after
    the references: the model's kernels (flex, flex-flash, fa2) before the usual and learned ones."""
    import torch.nn.functional as F

    from pretrain.model import AlibiBias
    from pretrain.model.attention import fa2_kernel, flex_flash_kernel, flex_kernel, kernel_unavailable, sdpa_kernel

    alibi = AlibiBias(h, 1, 0)
    flex = dict(compiled=not smoke)
    bias = alibi.dense(L, True, dev).to(dtype)  # [h, L, L], -inf above the diagonal

    def sdpa_nobias(backend_name):
        def run(q, k, v):
            if dev == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel as backend

                with backend(getattr(SDPBackend, backend_name)):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run

    out = {
        "sdpa-ref-fp32bias": (lambda q, k, v: sdpa_kernel(q, k, v, bias=alibi, causal=True, scale=None), "alibi"),
        "sdpa-flash-nobias": (sdpa_nobias("FLASH_ATTENTION"), "none"),
        "alibi-flex": (lambda q, k, v: flex_kernel(q, k, v, bias=alibi, causal=True, scale=None, **flex), "alibi"),
        "sinusoidal-flex": (lambda q, k, v: flex_kernel(q, k, v, bias=None, causal=True, scale=None, **flex), "none"),
    }
    for name, kernel in (("flex-flash", flex_flash_kernel), ("fa2", fa2_kernel)):
        # where a kernel cannot run here, its rows say why and the next kernels are measured
        reason = kernel_unavailable(name, dev == "cuda")
        out[f"alibi-{name}"] = (reason or (lambda q, k, v, f=kernel: f(q, k, v, bias=alibi, causal=True, scale=None)),
                                "alibi")
        out[f"sinusoidal-{name}"] = (reason or (lambda q, k, v, f=kernel: f(q, k, v, bias=None, causal=True, scale=None)),
                                     "none")
    out.update({
        "sdpa-bias": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), "alibi"),
        "sdpa-cudnn-nobias": (sdpa_nobias("CUDNN_ATTENTION"), "none"),
        **learned_variants(h, dev, flex),
    })
    return out


def learned_variants(h: int, dev: str, flex: dict) -> dict:
    """T5 (T5's 32 buckets, max distance 128) and KERPLE at their init, reference and flex; the
    bias parameters take gradients where the backward runs (GPU), as in training."""
    from pretrain.model.attention import flex_kernel, sdpa_kernel
    from pretrain.model.relative import KerpleBias, T5Bias

    out = {}
    for name, bias in (("t5", T5Bias(h, 1, 0, num_buckets=32, max_distance=128, hidden_size=1024)),
                       ("kerple", KerpleBias(h, 1, 0))):
        bias = bias.to(dev).requires_grad_(dev == "cuda")  # CPU flex refuses tensors that require grad
        out[f"{name}-sdpa-ref"] = (lambda q, k, v, b=bias: sdpa_kernel(q, k, v, bias=b, causal=True, scale=None), name)
        out[f"{name}-flex"] = (lambda q, k, v, b=bias: flex_kernel(q, k, v, bias=b, causal=True, scale=None, **flex), name)
    return out


def measure(fn, q, k, v, backward: bool, iters: int, dev: str) -> tuple[float, float | None, torch.Tensor]:
    """Median seconds per call and peak memory (GiB above the inputs; None on CPU)."""
    import torch

    grad = torch.randn_like(q)
    if not backward:  # CPU flex refuses inputs that require grad
        q, k, v = (t.detach() for t in (q, k, v))

    def step():
        out = fn(q, k, v)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)
        return out

    out = step()  # warm-up (compiles flex)
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev == "cuda" else None
    return sorted(times)[len(times) // 2], peak, out.detach()


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="sequence lengths L; None: 1024 2048 (--smoke: 64 128)")
    ap.add_argument("--heads", type=int, default=16, help="attention heads (the 1.3B model: 16)")
    ap.add_argument("--head-dim", type=int, default=128, help="head dimension (the 1.3B model: 128)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per batch (b = tokens // L)")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per variant (the median is reported)")
    ap.add_argument("--smoke", action="store_true", help="tiny run on the CPU (L 64/128, 4 heads of 16, fp32)")
    ap.add_argument("--contiguous", action="store_true",
                    help="contiguous [b, h, L, d] inputs instead of the model's strided views")
    ap.add_argument("--out", default="bench_attention.json", help="JSON results file")
    args = ap.parse_args(argv)
    import torch

    dev = "cuda" if use_gpu() and not args.smoke else "cpu"
    if args.smoke:
        args.lengths, args.heads, args.head_dim, args.tokens, args.iters = args.lengths or [64, 128], 4, 16, 512, 2
    elif dev == "cpu":
        ap.error("no CUDA device (or DS_ACCELERATOR names another accelerator): the full benchmark needs a GPU; "
                 "use --smoke for a CPU run")
    args.lengths = args.lengths or [1024, 2048]
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    device = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    print(f"device: {device}, torch {torch.__version__}")
    print(f"{'variant':<22}{'L':>6}{'b':>4} {'mode':<8}{'ms':>9}{'TFLOP/s':>9}{'peak GiB':>10}{'diff':>10}", flush=True)
    rows: list[dict] = []
    for L in args.lengths:
        b = max(1, args.tokens // L)
        shape = (b, args.heads, L, args.head_dim) if args.contiguous else (L, b, args.heads, args.head_dim)
        leaves = [torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]
        q, k, v = leaves if args.contiguous else (t.permute(1, 2, 0, 3) for t in leaves)  # [b, h, L, d]
        fwd_flops = 4 * b * args.heads * L * L * args.head_dim / 2
        refs = {}
        for name, (fn, method) in variants(args.heads, L, dev, dtype, args.smoke).items():
            backward = dev == "cuda" or "flex" not in name
            row = dict(variant=name, L=L, batch=b, heads=args.heads, head_dim=args.head_dim,
                       layout="contiguous" if args.contiguous else "model", dtype=str(dtype).removeprefix("torch."),
                       mode="fwd+bwd" if backward else "fwd", method=method, alibi=method == "alibi")
            if isinstance(fn, str):
                row["skipped"] = fn
            else:
                try:
                    sec, peak, out = measure(fn, q, k, v, backward, args.iters, dev)
                except Exception as e:  # one kernel failing must not cost the others' numbers
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                else:
                    if name == REFERENCE[method]:
                        refs[method] = out
                    ref = refs.get(method)
                    row.update(ms=sec * 1e3, tflops=fwd_flops * (3.5 if backward else 1.0) / sec / 1e12, peak_gib=peak,
                               max_abs_diff_vs_ref=None if ref is None else (out.float() - ref.float()).abs().max().item())
            rows.append(row)
            add_ratios(rows)
            write_atomic(args.out, json.dumps({"device": device, "torch": torch.__version__, "smoke": args.smoke,
                                               "rows": rows}, indent=1))  # after each row: a crash keeps every row
            print(format_row(row), flush=True)
    print(f"\n{'variant':<22}{'L':>6}{'b':>4} {'mode':<8}{'ms':>9}{'TFLOP/s':>9}{'peak GiB':>10}{'diff':>10}"
          f"{'x ceil':>8}{'x fam':>7}")
    for r in rows:
        print(format_row(r, ratios=True))
    return rows


def add_ratios(rows: list[dict]) -> None:
    """x_ceiling: a timed fwd+bwd row's time over the fastest no-bias fwd+bwd row at its L; x_family:
    a biased row's time over the no-bias row of its own kernel (alibi-flex / sinusoidal-flex)."""
    timed = {(r["variant"], r["L"]): r for r in rows if "ms" in r}
    for r in timed.values():
        ceiling = min((x["ms"] for x in timed.values() if x["L"] == r["L"] and x["method"] == "none"
                       and x["mode"] == "fwd+bwd"), default=None)
        r["x_ceiling"] = r["ms"] / ceiling if ceiling and r["mode"] == "fwd+bwd" else None
        method, _, kernel = r["variant"].partition("-")  # the same kernel without a score bias
        twin = timed.get((f"sinusoidal-{kernel}", r["L"])) if method in ("alibi", "t5", "kerple") else None
        r["x_family"] = r["ms"] / twin["ms"] if twin else None


def format_row(r: dict, ratios: bool = False) -> str:
    head = f"{r['variant']:<22}{r['L']:>6}{r['batch']:>4} "
    if "skipped" in r or "error" in r:
        return head + ("skipped: " + r["skipped"] if "skipped" in r else "failed: " + r["error"])
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    return (head + f"{r['mode']:<8}{r['ms']:>9.3f}{r['tflops']:>9.3g}{fmt(r['peak_gib'], '.2f'):>10}"
            f"{fmt(r['max_abs_diff_vs_ref'], '.1e'):>10}"
            + (f"{fmt(r['x_ceiling'], '.2f'):>8}{fmt(r['x_family'], '.2f'):>7}" if ratios else ""))


if __name__ == "__main__":
    main()
