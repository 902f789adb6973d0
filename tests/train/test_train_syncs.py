"""What makes the host wait for the device in a train step, checked on the CPU: DeepSpeed's
timers synchronize nothing unless asked, and micro-batches reach the device from pinned memory
without blocking (a pageable copy would wait for the device's queue)."""

from __future__ import annotations

import torch

from pretrain.config import load_config
from pretrain.layout import Layout
from pretrain.parallel import init_model_parallel

from helpers import TINY


def tiny_batches(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, cfg.model.vocab_size, (1, 65), generator=g)
        out.append({"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(1, 64),
                    "position_ids": torch.arange(64)[None]})
    return out


def test_deepspeed_timers_do_not_synchronize_the_device(monkeypatch):
    """DeepSpeed's throughput timer synchronizes the device at every forward and step from its
    third step on, unless turned off; PRETRAIN_DS_TIMERS=1 turns it (and the breakdown) back on."""
    from deepspeed.accelerator import get_accelerator

    from pretrain.engine import Trainer

    cfg = load_config(TINY, ["train.global_batch_size=2", "train.micro_batch_size=1", "model.num_layers=1"])
    init_model_parallel(1, 1, seed=cfg.train.seed)
    layout = Layout.of(cfg, 1)
    syncs = []
    monkeypatch.setattr(get_accelerator(), "synchronize", lambda *a, **k: syncs.append(1))
    for asked in (False, True):
        monkeypatch.setenv("PRETRAIN_DS_TIMERS", "1" if asked else "0")
        trainer = Trainer(cfg, layout)
        for step in range(3):  # the timer starts synchronizing at its third step
            syncs.clear()
            trainer.train_step(tiny_batches(cfg, layout.accumulation, seed=step), lr=1e-3)
        assert bool(syncs) == asked, f"PRETRAIN_DS_TIMERS={int(asked)}: {len(syncs)} device syncs in step 3"


def test_batches_are_copied_from_pinned_memory_without_blocking(monkeypatch):
    """Every tensor of a micro-batch is pinned and copied with non_blocking=True ("meta" stands in
    for the GPU: a CPU machine can pin nothing); on the CPU nothing is copied."""
    from pretrain.engine import to_device

    batch = tiny_batches(load_config(TINY), 1)[0]
    assert to_device(batch, torch.device("cpu")) is batch
    pinned, copies = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self) or self)
    to = torch.Tensor.to

    def recorded_to(self, *args, **kwargs):
        copies.append((self, kwargs.get("non_blocking", False)))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recorded_to)
    out = to_device(batch, torch.device("meta"))
    assert [id(t) for t in pinned] == [id(t) for t in batch.values()]
    assert [(id(t), nb) for t, nb in copies] == [(id(t), True) for t in batch.values()]
    assert {k: (v.device.type, v.shape) for k, v in out.items()} == {k: ("meta", v.shape) for k, v in batch.items()}
