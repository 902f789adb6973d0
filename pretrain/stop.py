"""Stop requests by signal, installed first thing in train.py so that a signal arriving while
the heavy imports and the preflight run is not lost (it would otherwise kill the process, and
the sbatch script would, rightly, not requeue a crashed step)."""

from __future__ import annotations

import signal


class StopRequest:
    """SIGUSR1 (SLURM's warning before the time limit) or SIGTERM (preemption, scancel): finish
    the current step, checkpoint, exit 0 so the sbatch script can requeue."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self) -> int:
        """The signal any rank received (all ranks see the same answer: one tiny all-reduce)."""
        import torch
        import torch.distributed as dist

        from pretrain.parallel import accelerator_device

        flag = torch.tensor([self.signum], dtype=torch.int64, device=accelerator_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

