"""Training throughput of a config: tokens/s/GPU, TFLOP/s/GPU, MFU and peak memory.

    python tools/bench/train.py --config configs/gpt_1p3b_alibi_L1024.yaml [--micro-batch auto|N]
        [--steps 10] [--warmup 3] [--out bench.json] [key.path=value ...]
    torchrun --nproc_per_node 8 tools/bench/train.py --config ...        # one node

Runs the real trainer (DeepSpeed engine, bf16 on GPU) on random tokens, so no dataset is needed
and nothing is written but --out; one micro-batch per optimizer step per rank. `--micro-batch
auto` doubles the micro-batch from 1 until the GPU runs out of memory and reports each size.
MFU as in docs/mfu.md; the per-GPU memory estimate of `--dry-run` (pretrain/memory.py) is
printed beside the measured peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

from pretrain.config import Config, load_config  # light (no torch): --help stays instant
from pretrain.layout import Layout
from pretrain.memory import estimate_memory
from pretrain.parallel import accelerator_device, init_model_parallel, read_env, use_gpu


def measure(cfg: Config, layout: Layout, steps: int, warmup: int) -> dict:
    """Train `warmup + steps` steps of random tokens; timings of the last `steps` only. Nothing
    is written (no checkpoint, no run directory)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pretrain.engine import Trainer
    from pretrain.metrics import peak_memory_gb, throughput

    gpu = use_gpu()
    trainer = Trainer(cfg, layout)
    m, mb = cfg.model, cfg.train.micro_batch_size
    gen = torch.Generator().manual_seed(ps.get_data_parallel_rank())

    def batch():
        x = torch.randint(0, m.vocab_size, (mb, m.seq_length + 1), generator=gen)
        return {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(mb, m.seq_length),
                "position_ids": torch.arange(m.seq_length).expand(mb, m.seq_length)}

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        trainer.train_step([batch() for _ in range(layout.accumulation)], cfg.optim.lr)
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        result = trainer.train_step([batch() for _ in range(layout.accumulation)], cfg.optim.lr)
    if gpu:
        torch.cuda.synchronize()
    step_time = (time.perf_counter() - t0) / steps
    bf16 = trainer.engine.bfloat16_enabled()
    estimate = estimate_memory(cfg, layout, bf16=bf16, flex_attention=trainer.attention_kernel != "sdpa")
    out = {"position": m.position, "micro_batch_size": mb, "global_batch_size": cfg.train.global_batch_size,
           "world_size": dist.get_world_size(), "data_parallel": ps.get_data_parallel_world_size(),
           "seq_length": m.seq_length, "tokens_per_step": cfg.train.global_batch_size * m.seq_length,
           "step_time_s": step_time, "loss": result.loss, "peak_mem_gb": peak_memory_gb(),
           "estimate_gb": estimate.total_gb, **throughput(cfg, layout, step_time),
           "device": torch.cuda.get_device_name() if gpu else accelerator_device(),
           "precision": "bf16" if bf16 else "fp32", "attention_kernel": trainer.attention_kernel}
    del trainer
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return out


def with_micro_batch(cfg: Config, micro: int, world_size: int) -> tuple[Config, Layout]:
    """`cfg` at `micro` sequences per rank and one micro-batch per step (no accumulation)."""
    dp = Layout.of(cfg, world_size).dp
    cfg.train.micro_batch_size, cfg.train.global_batch_size = micro, micro * dp
    return cfg, Layout.of(cfg, world_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    ap.add_argument("--micro-batch", default="auto", help="N, or auto: the largest that fits (GPU)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--out", default=None, help="write the result(s) as JSON here")
    ap.add_argument("overrides", nargs="*", help="key.path=value config overrides (YAML value)")
    args = ap.parse_args(argv)
    import torch  # not at the top: --help stays instant

    env = read_env()  # the launcher's ranks (torchrun, srun or one process), exactly as train.py reads them
    cfg = load_config(args.config, args.overrides)
    init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, seed=cfg.train.seed, env=env)
    if args.micro_batch == "auto" and use_gpu():
        candidates = [2**i for i in range(9)]
    else:
        candidates = [cfg.train.micro_batch_size if args.micro_batch == "auto" else int(args.micro_batch)]
    results = []
    for micro in candidates:
        run_cfg, layout = with_micro_batch(load_config(args.config, args.overrides), micro, env.world_size)
        try:
            results.append(measure(run_cfg, layout, args.steps, args.warmup))
        except torch.cuda.OutOfMemoryError:
            break
    if env.rank == 0:
        print(f"{'micro':>5} {'tokens/s/GPU':>13} {'TFLOP/s/GPU':>12} {'MFU':>6} {'step s':>8} {'peak GB':>8} "
              f"{'est. GB':>8}  kernel, device")
        for r in results:
            print(f"{r['micro_batch_size']:>5} {r['tokens_per_s_per_gpu']:>13.0f} {r['tflops_per_gpu']:>12.1f} "
                  f"{r['mfu']:>6.1%} {r['step_time_s']:>8.3f} {r['peak_mem_gb']:>8.1f} {r['estimate_gb']:>8.1f}  "
                  f"{r['attention_kernel']}, {r['device']}")
        if args.out:
            Path(args.out).write_text(json.dumps({"config": args.config, "results": results}, indent=1))
    return 0 if results else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
