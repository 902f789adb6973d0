"""One rank of the elastic-resume test: for each `CONFIG@tp,pp,zero,micro=RUN_DIR` on the command
line (in one process group), resume RUN_DIR's newest checkpoint (written on another layout) through
preflight and checkpoint.resume, write every parameter's master weight and Adam moments as this
rank now holds them (moments_rankN.safetensors, TP slices by global name), then train the
remaining steps and write their losses (elastic.json). Run by tests/train/test_train_elastic.py."""

import gc
import json
import os
import sys
from pathlib import Path

data_dir, overrides = sys.argv[1], json.loads(sys.argv[2])
jobs = [(config, tuple(int(v) for v in spec.split(",")), Path(run))
        for config, spec, run in (a.replace("@", "=", 1).split("=", 2) for a in sys.argv[3:])]

from megatron.core import parallel_state as ps  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pretrain import reshard  # noqa: E402
from pretrain.checkpoint import resume  # noqa: E402
from pretrain.config import DataSource, load_config  # noqa: E402
from pretrain.data import BatchReader, build_train_dataset  # noqa: E402
from pretrain.engine import Trainer  # noqa: E402
from pretrain.loop import preflight  # noqa: E402
from pretrain.model.params import global_names, partition_dim  # noqa: E402
from pretrain.parallel import init_model_parallel, read_env  # noqa: E402
from pretrain.schedule import lr_at  # noqa: E402

rank = int(os.environ.get("RANK", 0))
for config, (tp, pp, zero, micro), run_dir in jobs:
    cfg = load_config(config, overrides + [f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
                                           f"parallel.zero_stage={zero}", f"train.micro_batch_size={micro}"])
    cfg.data.sources = [DataSource(path=str(Path(data_dir).resolve()))]
    plan = preflight(cfg, read_env(), run_dir)  # raises if the layout change were refused
    init_model_parallel(tp, pp, seed=cfg.train.seed)
    trainer = Trainer(cfg, plan.layout)
    _, meta = resume(trainer, plan.checkpoints)
    names = global_names(trainer.gpt)
    tensors, table = {}, {}
    for local, p in trainer.gpt.named_parameters():
        if getattr(p, "ds_pipe_replicated", False):
            continue
        for key in reshard.KEYS:
            tensors[f"{key}/{names[local]}"] = reshard._get(trainer.engine, p, key).cpu().contiguous()
        table[names[local]] = partition_dim(p)
    if ps.get_data_parallel_rank() == 0:
        save_file(tensors, run_dir / f"moments_tp{ps.get_tensor_model_parallel_rank()}_pp"
                  f"{ps.get_pipeline_model_parallel_rank()}.safetensors",
                  metadata={"table": json.dumps(table), "adam_step": str(reshard.adam_step(trainer.engine))})
    origin = (meta["step"], meta["consumed_samples"])
    reader = BatchReader(build_train_dataset(cfg, plan.data, origin), cfg, ps.get_data_parallel_rank(),
                         ps.get_data_parallel_world_size(), origin)
    losses = {s + 1: trainer.train_step(reader.micro_batches(s), lr_at(s, cfg.optim, cfg.train.steps)).loss
              for s in range(meta["step"], cfg.train.steps)}
    if rank == 0:
        (run_dir / "elastic.json").write_text(json.dumps({"layout": plan.changes.layout, "losses": losses}))
    del trainer, reader
    gc.collect()

sys.stdout.flush()
os._exit(0)
