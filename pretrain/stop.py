"""Stop requests by signal, installed first thing in train.py so that a signal arriving while
the heavy imports and the preflight run is not lost (it would otherwise kill the process, and
the sbatch script would, rightly, not requeue a crashed step)."""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130
"""The exit code of a second Ctrl-C (128 + SIGINT, what a shell reports for a process it ended)."""


class StopRequest:
    """SIGUSR1 (SLURM's warning before the time limit), SIGTERM (preemption, scancel) or SIGINT
    (Ctrl-C): finish the current step, checkpoint, exit 0 so the sbatch script can requeue. A
    second Ctrl-C exits at once (no checkpoint, no traceback)."""

    def __init__(self):
        self.signum = 0
        self.interrupts = 0
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # os._exit: no clean-up that could wait on other ranks
                os.write(sys.stderr.fileno(), b"second Ctrl-C: exiting now, without a checkpoint\n")
                os._exit(INTERRUPTED)
            os.write(sys.stdout.fileno(), b"Ctrl-C: checkpoint at the next step boundary, then exit "
                                          b"(Ctrl-C again to exit at once)\n")
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal any rank received (all ranks see the same answer: one tiny all-reduce)."""
        import torch  # here: this module is imported before argument parsing, torch after --help
        import torch.distributed as dist

        from pretrain.parallel import accelerator_device

        flag = torch.tensor([self.signum], dtype=torch.int64, device=accelerator_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
