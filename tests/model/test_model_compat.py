"""megatron-core on CPU (pretrain.model.compat): activation recompute replays dropout exactly,
and misuse is refused with a clear message."""

import pytest
import torch

from pretrain.model import build_model

from pretrain.parallel import init_model_parallel

from .model_helpers import batch, small_config

RECOMPUTE = {
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
}


def loss_and_grads(cfg, overrides):
    torch.manual_seed(0)
    model = build_model(cfg, transformer_overrides=overrides).train()
    ids, pos, labels = batch(cfg)
    torch.manual_seed(1)  # same dropout stream for every variant
    loss = model(ids, pos, None, labels=labels).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("position", ["alibi", "t5"])  # t5: one learned table shared by the recomputed layers
@pytest.mark.parametrize("mode", sorted(RECOMPUTE))
def test_recompute_with_dropout_matches_plain(single_process, mode, position):
    cfg = small_config(position, heads=4, hidden_dropout=0.2)
    loss0, grads0 = loss_and_grads(cfg, None)
    loss1, grads1 = loss_and_grads(cfg, RECOMPUTE[mode])
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for n in grads0:  # a recompute with different dropout masks would change these
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-7, msg=n)
    cfg_other = small_config(position, heads=4, hidden_dropout=0.2)
    torch.manual_seed(0)
    model = build_model(cfg_other).train()
    ids, pos, labels = batch(cfg_other)
    torch.manual_seed(2)  # a different dropout stream does change the loss (dropout is live)
    assert model(ids, pos, None, labels=labels).mean().item() != pytest.approx(loss0, rel=1e-6)


def test_misuse_is_refused(single_process):
    from megatron.core import parallel_state

    with pytest.raises(ValueError, match="not divisible by tp x pp"):
        init_model_parallel(tp=2)  # world size 1
    parallel_state.destroy_model_parallel()
    try:
        with pytest.raises(RuntimeError, match="init_model_parallel"):
            build_model(small_config("alibi", heads=4))
    finally:
        init_model_parallel(tp=1)
