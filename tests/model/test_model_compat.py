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


@pytest.mark.parametrize("position", ["alibi", "sinusoidal"])
def test_skipped_megatron_init_changes_nothing(single_process, position):
    """The trainer builds with perform_initialization=False (init_weights draws every parameter
    anyway). The model is the same as with megatron's init then init_weights, bit for bit (a
    parameter init_weights missed would keep megatron's values in one and garbage in the other),
    and every weight keeps megatron's tensor-parallel attributes (what checkpoints and the
    gradient norm read)."""
    from pretrain.model.params import init_weights

    cfg = small_config(position, heads=4)
    models = []
    for skip in (False, True):
        model = build_model(cfg, params_dtype=torch.bfloat16,
                            transformer_overrides={"perform_initialization": False} if skip else None)
        init_weights(model, cfg, seed=3)
        models.append(model)
    attrs = ("tensor_model_parallel", "partition_dim", "partition_stride")
    reference, skipped = (dict(m.named_parameters()) for m in models)
    assert reference.keys() == skipped.keys()
    for name, p in reference.items():
        assert torch.equal(skipped[name], p), name
        assert [getattr(skipped[name], a, None) for a in attrs] == [getattr(p, a, None) for a in attrs], name


def test_fused_cross_entropy_matches_unfused_in_bf16(single_process):
    """megatron-core's native fused cross-entropy (on for bf16 models): the same per-token loss
    and the same gradients as the unfused vocab-parallel cross-entropy. (In fp32 it is off: its
    backward casts the logits gradient to bf16.)"""
    from pretrain.model.params import init_weights

    cfg = small_config("alibi", heads=4)
    ids, pos, labels = batch(cfg)
    results = []
    for fused in (False, True):
        model = build_model(cfg, params_dtype=torch.bfloat16,
                            transformer_overrides={"cross_entropy_loss_fusion": fused})
        assert model.config.cross_entropy_loss_fusion is fused
        init_weights(model, cfg, seed=0)
        loss = model(ids, pos, None, labels=labels)  # [b, s] fp32
        loss.sum().backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=0, msg=name)
    assert build_model(cfg).config.cross_entropy_loss_fusion is False  # fp32: the unfused path
    assert build_model(cfg, params_dtype=torch.bfloat16).config.cross_entropy_loss_fusion is True
