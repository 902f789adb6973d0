"""One rank of the layout-equivalence test: trains the tiny config for 5 steps in each layout
given on the command line (tp,pp,zero[,activation checkpointing 0/1[,bf16 0/1]]), in one process
group, and writes the losses and a checkpoint per layout. Run by tests/train/test_train_layouts.py."""

import gc
import json
import os
import sys
from pathlib import Path

import torch

out_dir, data_dir, config = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
layouts = [tuple(int(v) for v in (s + ",0,0").split(",")[:5]) for s in sys.argv[4:]]

from megatron.core import parallel_state as ps  # noqa: E402

from pretrain.checkpoint import resume, save_checkpoint, scan  # noqa: E402
from pretrain.config import DataSource, load_config  # noqa: E402
from pretrain.data import BatchReader, build_train_dataset, load_data, split_tokens  # noqa: E402
from pretrain.loop import validate_ppl  # noqa: E402
from pretrain.engine import Trainer  # noqa: E402
from pretrain.layout import Layout  # noqa: E402
from pretrain.parallel import init_model_parallel  # noqa: E402
from pretrain.schedule import lr_at  # noqa: E402

STEPS = 5
results = {}
for tp, pp, zero, recompute, bf16 in layouts:
    cfg = load_config(config, ["train.steps=5", "train.global_batch_size=4", "train.micro_batch_size=1",
                               "optim.warmup_steps=1", "optim.lr=3.0e-3", "optim.grad_clip=1.0",
                               f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
                               f"parallel.zero_stage={zero}", f"train.activation_checkpointing={bool(recompute)}",
                               f"train.precision={'bf16' if bf16 else 'fp32'}"])
    cfg.data.sources = [DataSource(path=data_dir)]
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg.validate(world)
    init_model_parallel(tp, pp, seed=cfg.train.seed)
    data, layout = load_data(cfg), Layout.of(cfg, world)
    trainer = Trainer(cfg, layout)
    reader = BatchReader(build_train_dataset(cfg, data), cfg, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    name = f"tp{tp}_pp{pp}_z{zero}_w{world}" + ("_recompute" if recompute else "") + ("_bf16" if bf16 else "")
    engine = trainer.engine
    setup = {"bf16": engine.bfloat16_enabled(), "communication": str(engine.communication_data_type),
             "overlap_comm": engine.zero_overlap_comm(), "contiguous_gradients": engine.zero_contiguous_gradients(),
             "optimizer": type(engine.optimizer).__name__}
    losses = [trainer.train_step(reader.micro_batches(s), lr_at(s, cfg.optim, STEPS)).loss for s in range(STEPS)]
    cfg.validation.tokens, cfg.validation.length_multipliers = 2048, [1, 2, 4]
    ppl = validate_ppl(trainer, cfg, split_tokens(data_dir, "valid", cfg.validation.tokens))
    save_checkpoint(trainer, out_dir / name, STEPS, {}, data.tokenizer)
    if world == 1 and pp == 1:  # the single-process model's own state dict, for load_consolidated
        torch.save({k: v for k, v in trainer.gpt.state_dict().items() if "_extra_state" not in k},
                   out_dir / f"{name}_state_dict.pt")
    # resume: steps 6-7 of a fresh engine loaded from the checkpoint == steps 6-7 continued
    continued = [trainer.train_step(reader.micro_batches(s), lr_at(s, cfg.optim, STEPS)).loss for s in (5, 6)]
    del trainer
    gc.collect()
    trainer = Trainer(cfg, layout)
    _, meta = resume(trainer, scan(out_dir / name))
    assert meta["step"] == STEPS and meta["consumed_samples"] == STEPS * 4, meta
    resumed = [trainer.train_step(reader.micro_batches(s), lr_at(s, cfg.optim, STEPS)).loss for s in (5, 6)]
    results[name] = {"losses": losses, "ppl": ppl, "continued": continued, "resumed": resumed, "setup": setup}
    del trainer, reader
    gc.collect()

if int(os.environ.get("RANK", 0)) == 0:
    (out_dir / f"losses_w{os.environ.get('WORLD_SIZE', 1)}.json").write_text(json.dumps(results))
sys.stdout.flush()
os._exit(0)
