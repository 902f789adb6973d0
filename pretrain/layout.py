"""The parallel layout: how `world_size` ranks split into tensor x pipeline x data parallel, and
the global batch into micro-batch x accumulation x data parallel.

Why here: the one statement of the layout rule (world = tp x pp x dp, global batch = micro x
accumulation x dp), shared by the config checks (`Config.validate`), `--dry-run`, the trainer,
process-group start-up and the checkpoint reader. Plain integers: this module imports neither
torch nor the config, so a 128-GPU layout is checked on a laptop in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    """How a run's `world_size` ranks split, built once per run (`Layout.of`) and passed wherever
    the world size is needed."""

    world_size: int
    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline-parallel degree."""
    dp: int
    """Data-parallel degree: world_size / (tp x pp)."""
    accumulation: int
    """Micro-batches per optimizer step per data-parallel rank: global / (micro x dp)."""

    @staticmethod
    def errors(world_size: int | None, tp: int, pp: int, micro_batch: int = 0, global_batch: int = 0) -> list[str]:
        """Why `tp` x `pp` cannot split `world_size` ranks, and why `global_batch` sequences are not
        micro_batch x accumulation x dp (checked when `micro_batch` > 0), each with the fix; [] if
        nothing is wrong. `world_size` None: the degrees themselves only."""
        if tp <= 0 or pp <= 0:
            return [f"parallel.tensor_parallel={tp} and pipeline_parallel={pp} must be positive"]
        if world_size is None:
            return []
        if world_size < 1:
            return [f"world size {world_size} must be positive: set --world-size (or WORLD_SIZE / SLURM_NTASKS) "
                    "to the number of GPUs"]
        if world_size % (tp * pp):
            return [f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = "
                    f"{tp * pp}: change the GPU count or the layout"]
        dp = world_size // (tp * pp)
        if micro_batch > 0 and global_batch % (micro_batch * dp):
            return [f"train.global_batch_size={global_batch} is not divisible by micro_batch_size x "
                    f"data_parallel = {micro_batch} x {dp}: global batch = micro x accumulation x dp, "
                    f"so use a multiple of {micro_batch * dp}"]
        return []

    @classmethod
    def split(cls, world_size: int, tp: int, pp: int, micro_batch: int, global_batch: int) -> Layout:
        """The layout of `world_size` ranks, defined (every count >= 1) even where `errors` says
        why it cannot run, so that --dry-run can still estimate the memory of a wrong layout."""
        dp = max(1, world_size // max(1, tp * pp))
        return cls(world_size=world_size, tp=tp, pp=pp, dp=dp,
                   accumulation=max(1, global_batch // (max(1, micro_batch) * dp)))

    @classmethod
    def of(cls, cfg: Any, world_size: int) -> Layout:
        """`split` with the sizes of `cfg`, a pretrain.config.Config (read, not imported: the config
        depends on this module, not the other way round)."""
        p, t = cfg.parallel, cfg.train
        return cls.split(world_size, p.tensor_parallel, p.pipeline_parallel, t.micro_batch_size, t.global_batch_size)
