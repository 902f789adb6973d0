"""A model trained at L evaluates at 8L: no maximum length, no NaN, and causal prefixes unchanged."""

import pytest
import torch

from pretrain.model import build_model

from .model_helpers import POSITIONS, batch, small_config


@pytest.mark.parametrize("position", POSITIONS)
def test_trained_at_L_evaluates_at_8L(single_process, position):
    torch.manual_seed(0)
    L = 16
    cfg = small_config(position, heads=4, seq_length=L)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids, pos, _ = batch(cfg, b=4, s=L + 1)
    first = None
    for _ in range(15):  # learn to predict the next token of a fixed batch at length L
        loss = model(ids[:, :L], pos[:, :L], None, labels=ids[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first  # it did train

    model.eval()
    long_ids, long_pos, long_labels = batch(cfg, b=2, s=8 * L, seed=1)
    with torch.no_grad():
        logits = model(long_ids, long_pos, None, runtime_gather_output=True)  # [2, 8L, V]
        loss = model(long_ids, long_pos, None, labels=long_labels)  # [2, 8L]
        short = model(long_ids[:, :L], long_pos[:, :L], None, runtime_gather_output=True)
    assert logits.shape == (2, 8 * L, cfg.vocab_size) and loss.shape == (2, 8 * L)
    assert torch.isfinite(logits).all() and torch.isfinite(loss).all()
    # causal: the first L positions see the same context whatever follows them
    torch.testing.assert_close(logits[:, :L], short, rtol=1e-5, atol=1e-5)


def test_attention_mask_is_refused(single_process):
    cfg = small_config("alibi", heads=4)
    model = build_model(cfg)
    ids, pos, _ = batch(cfg)
    mask = torch.ones(1, 1, cfg.seq_length, cfg.seq_length, dtype=torch.bool).triu(1)
    with pytest.raises(ValueError, match="attention_mask=None"):
        model(ids, pos, mask)
