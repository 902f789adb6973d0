"""Time and disk cost of an elastic resume: save at one layout, resume at another.

    torchrun --standalone --nproc-per-node 2 tools/bench/reshard.py --config configs/tiny_alibi.yaml \
        --out reshard.json [key.path=value ...]

On random tokens (no dataset): one training step at (tp 1, pp 1, dp = world, ZeRO-1), a
checkpoint (`checkpoint.save_checkpoint`, of which `reshard.save` writes the optimizer state),
then a new engine at (tp = world, dp 1) resumes it (`checkpoint.resume`: hashes verified,
`reshard.load`). Prints a table and writes --out (JSON); docs/benchmarks.md, "Elastic resume",
scales it to the 1.3B config.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from pretrain.config import load_config
from pretrain.memory import parameter_count
from pretrain.layout import Layout
from pretrain.parallel import init_model_parallel, read_env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    ap.add_argument("--out", default="reshard.json", help="JSON results")
    ap.add_argument("overrides", nargs="*", help="key.path=value (YAML value)")
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist

    from pretrain import checkpoint, reshard
    from pretrain.engine import Trainer

    env = read_env()
    world = env.world_size
    rows, timed = {}, {}

    def clock(name, fn, *a):
        dist.barrier()
        t0 = time.perf_counter()
        out = fn(*a)
        dist.barrier()
        timed[name] = time.perf_counter() - t0
        return out

    run = Path(tempfile.mkdtemp(prefix="reshard_bench_")) if env.rank == 0 else None
    for tp, name in ((1, "save"), (world, "resume")):
        cfg = load_config(args.config, [*args.overrides, f"parallel.tensor_parallel={tp}", "parallel.zero_stage=1",
                                        f"train.micro_batch_size={max(1, 4 // world)}", "train.global_batch_size=4"])
        init_model_parallel(tp, 1, seed=cfg.train.seed, env=env)
        layout = Layout.of(cfg, world)
        trainer = Trainer(cfg, layout)
        shared = [str(run)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
        if name == "save":
            m = cfg.model
            x = torch.randint(0, m.vocab_size, (cfg.train.micro_batch_size, m.seq_length + 1))
            batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones_like(x[:, 1:], dtype=torch.float),
                     "position_ids": torch.arange(m.seq_length).expand(x.shape[0], m.seq_length)}
            trainer.train_step([batch] * layout.accumulation, cfg.optim.lr)
            (run_dir / "scratch").mkdir(exist_ok=True)  # reshard.save alone, then the whole checkpoint
            clock("reshard.save", reshard.save, trainer, run_dir / "scratch")
            clock("save_checkpoint", checkpoint.save_checkpoint, trainer, run_dir, 1, {}, {"sha256": "x"})
            rows["params"] = parameter_count(cfg)
        else:
            found = checkpoint.scan(run_dir)
            ckpt, meta = found.usable[0]
            clock("reshard.load", reshard.load, trainer, ckpt, meta)
            clock("resume", checkpoint.resume, trainer, found)
            files = meta["files"]
            rows["optim_bytes"] = sum(r["size"] for rel, r in files.items() if rel.startswith("optim/"))
            rows["model_bytes"] = sum(r["size"] for rel, r in files.items() if rel.startswith("model/"))
            rows["checkpoint_bytes"] = sum(r["size"] for r in files.values())
        del trainer
        gc.collect()
    if env.rank == 0:
        result = {"config": args.config, "overrides": args.overrides, "world_size": world, **rows,
                  "seconds": timed, "from": f"tp 1 x dp {world}", "to": f"tp {world} x dp 1"}
        print(f"{'what':<20} {'value':>14}")
        for k, v in [("parameters", rows["params"]), ("optim/ bytes", rows["optim_bytes"]),
                     ("model/ bytes", rows["model_bytes"]), ("checkpoint bytes", rows["checkpoint_bytes"]),
                     *[(f"{k} (s)", f"{v:.3f}") for k, v in timed.items()]]:
            print(f"{k:<20} {v:>14}")
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
