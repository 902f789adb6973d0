"""The train step and validation as the GPU sees them, checked on the CPU: one host read per
optimizer step (not one per micro-batch), the reported loss is the global-batch mean, and
validation hands the model windows of one shape per length (a compiled attention kernel
compiles once per length, not again for a short last batch)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from pretrain.config import load_config
from pretrain.layout import Layout
from pretrain.parallel import init_model_parallel

from helpers import TINY

HOST_READS = ("__bool__", "__float__", "__int__", "item", "tolist")


def test_train_step_reads_the_device_once_and_reports_the_batch_mean(monkeypatch):
    from pretrain import engine
    from pretrain.engine import Trainer

    cfg = load_config(TINY, ["train.global_batch_size=4", "train.micro_batch_size=1", "model.num_layers=1"])
    init_model_parallel(1, 1, seed=cfg.train.seed)
    layout = Layout.of(cfg, 1)
    trainer = Trainer(cfg, layout)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(layout.accumulation):  # 4 micro-batches
        x = torch.randint(0, cfg.model.vocab_size, (1, 65), generator=g)
        batches.append({"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(1, 64),
                        "position_ids": torch.arange(64)[None]})
    with torch.no_grad():  # the reference: the same model's mean loss before the update
        want = sum(float(trainer.engine.module(b["tokens"], b["position_ids"], b["labels"], b["loss_mask"]))
                   for b in batches) / len(batches)

    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == engine.__file__:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    result = trainer.train_step(batches, lr=1e-3)
    monkeypatch.undo()
    assert reads == ["tolist"], f"host reads in pretrain/engine.py during one step: {reads}"
    assert not result.skipped and math.isfinite(result.grad_norm)
    assert result.loss == pytest.approx(want, rel=1e-6)


class FakeTrainer:
    """validate_ppl's view of a trainer (pp == 1): per-token NLL of a fixed toy model."""

    pp = 1

    def __init__(self):
        self.shapes = []
        self.engine = type("Engine", (), {"train": lambda self: None})()

    def nll(self, x, y):  # [b, L] -> [b, L]
        self.shapes.append(tuple(x.shape))
        return ((x * 7 + y) % 11).double() / 4


def test_validation_windows_have_one_shape_per_length():
    from pretrain.loop import validate_ppl

    init_model_parallel(1, 1, seed=0)
    cfg = load_config(TINY, ["train.micro_batch_size=4", "validation.length_multipliers=[1, 2]"])
    L = cfg.model.seq_length
    tokens = torch.randint(0, 100, (10 * L + 1,), generator=torch.Generator().manual_seed(0))
    trainer = FakeTrainer()
    ppl = validate_ppl(trainer, cfg, tokens)
    # 10 windows of L (3 batches of 4, the last padded), 5 of 2L (2 batches of 4)
    assert trainer.shapes == [(4, L)] * 3 + [(4, 2 * L)] * 2
    for length, n in ((L, 10), (2 * L, 5)):
        x = tokens[: n * length].view(n, length)
        y = tokens[1 : n * length + 1].view(n, length)
        assert ppl[length] == pytest.approx(math.exp(float(((x * 7 + y) % 11).double().mean() / 4)), rel=1e-12)


def test_gpu_deepspeed_config_hands_torch_fused_adamw_to_deepspeed(monkeypatch):
    """On a GPU (simulated): bf16 with fp32 gradient reduction, ZeRO-1 overlapping the
    reduction with backward from contiguous buckets, and torch's fused AdamW (no JIT build),
    which DeepSpeed really constructs from the config (built here on its CPU accelerator)."""
    import deepspeed

    from pretrain import engine

    cfg = load_config(TINY)
    monkeypatch.setattr(engine, "use_gpu", lambda: True)
    config = engine.ds_config(cfg, Layout.of(cfg, 1))
    bucket = cfg.parallel.zero_bucket_size
    assert config["bf16"] == {"enabled": True} and config["communication_data_type"] == "fp32"
    assert config["zero_optimization"] == {"stage": 1, "overlap_comm": True, "contiguous_gradients": True,
                                           "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    init_model_parallel(1, 1, seed=0)
    model = torch.nn.Linear(8, 8)
    ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    assert type(ds.basic_optimizer) is torch.optim.AdamW and ds.basic_optimizer.defaults["fused"] is True
    assert ds.communication_data_type == torch.float32 and ds.zero_overlap_comm()
