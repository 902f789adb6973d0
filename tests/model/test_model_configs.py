"""Every shipped config loads and validates; the 1.3B model has the paper's size; the tiny
configs build and train a step; the spec and backend are what the config says."""

import logging
import math
from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.memory import parameter_count
from pretrain.model import build_model
from pretrain.model.attention import sdpa_kernel

from .model_helpers import batch, small_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
METHODS = {"alibi": "alibi", "sinusoidal": "sinusoidal", "rope": "rope", "t5": "t5", "kerple": "kerple", "nope": "none"}
REQUIRED = ["gpt_1p3b_alibi_L1024", "gpt_1p3b_sinusoidal_L2048", *(f"tiny_{m}" for m in METHODS),
            *(f"wt103_{m}_L{L}" for m in METHODS for L in (512, 1024)),
            *(f"main_job_{m}" for m in ("alibi", "sinusoidal", "rope", "t5"))]


def test_required_configs_exist():
    assert set(REQUIRED) <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_validates(path):
    cfg = load_config(path)
    cfg.validate(world_size=cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    m = cfg.model
    name = path.stem
    assert m.position == next(p for method, p in METHODS.items() if f"_{method}" in name)
    if "_L" in name:
        assert m.seq_length == int(name.rsplit("_L", 1)[1])
    if name.startswith("wt103_"):  # the paper's WikiText-103 model
        assert (m.num_layers, m.hidden_size, m.num_attention_heads) == (16, 1024, 8)
    if m.position == "sinusoidal":  # tokens at rms 1 over the unit table, fairseq's ratio (docs/design.md)
        assert m.embedding_scale * m.embedding_init_std == pytest.approx(1.0)
        assert m.embedding_init_std <= 0.035  # the 0.02-like init of the other methods (d^-0.5 from d >= 1024)
    else:
        assert m.embedding_scale == 1.0
    assert m.ffn_hidden_size == 4 * m.hidden_size


def test_1p3b_parameter_count(single_process):
    cfg = load_config(Path(__file__).parents[2] / "configs/gpt_1p3b_alibi_L1024.yaml")
    m = cfg.model
    with torch.device("meta"):  # the built model, without memory
        n = sum(p.numel() for p in build_model(m).parameters())
    assert parameter_count(cfg) == n  # the --dry-run estimate counts the same parameters
    d, f, V, L = m.hidden_size, m.ffn_hidden_size, m.vocab_size, m.num_layers
    # tied embedding + per layer (qkv 3d^2, proj d^2, fc1/fc2 2df, two LN weights) + final LN
    assert n == V * d + L * (4 * d * d + 2 * d * f + 2 * d) + d
    print(f"\n1.3B config: {n:,} parameters ({n / 1e9:.3f} B)")
    assert 1.3e9 < n < 1.4e9


@pytest.mark.parametrize("name", [f"tiny_{m}" for m in METHODS])
def test_tiny_config_builds_and_steps(single_process, name):
    m = load_config(Path(__file__).parents[2] / f"configs/{name}.yaml").model
    torch.manual_seed(0)
    model = build_model(m)
    ids, pos, labels = batch(m, b=2)
    loss = model(ids, pos, None, labels=labels).mean()
    loss.backward()
    # near-uniform predictions at init (sinusoidal's d^-0.5 tied embedding gives logits of std ~1)
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(m.vocab_size)) < 2.5
    assert all(p.grad is not None for p in model.parameters())


def test_mpt_block_and_auto_backend(single_process, caplog):
    from pretrain.model import spec

    spec._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="pretrain.model.spec"):
        model = build_model(small_config("alibi", heads=4, attention_backend="auto"))
    assert "attention backend: sdpa (requested auto" in caplog.text  # no CUDA here
    core = model.decoder.layers[0].self_attention.core_attention
    assert core.kernel is sdpa_kernel
    assert not any("bias" in n for n, _ in model.named_parameters())  # no LN or linear biases
    assert model.config.activation_func is torch.nn.functional.gelu
    assert model.share_embeddings_and_output_weights and model.output_layer.weight is None


def test_bad_configs_are_refused(single_process):
    with pytest.raises(ConfigError, match="embedding_scale"):
        build_model(small_config("alibi", heads=4, embedding_scale=2.0))
    with pytest.raises(ConfigError, match="not divisible by num_attention_heads"):
        build_model(small_config("rope", heads=4, hidden_size=30))
