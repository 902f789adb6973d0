"""Shared test settings: the gpu marker skips where there is no CUDA device."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker); none on this machine")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `"gpu" in item.keywords`: that also matches a folder named gpu
            item.add_marker(skip)


_exit_status = None


def pytest_sessionfinish(session, exitstatus):
    """Tests that run megatron-core in this process leave a gloo process group behind."""
    global _exit_status
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _exit_status = int(exitstatus)
        dist.destroy_process_group()


def pytest_unconfigure(config):
    # torch 2.13's gloo can abort in its exit handlers after a finished run ("terminate called
    # without an active exception", about 1 run in 10, docs/reference.md §5), which would turn
    # a green run red: where a process group existed, leave without those handlers.
    if _exit_status is not None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)
