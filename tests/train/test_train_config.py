"""Config checks, --dry-run, the LR schedule, the memory estimate and the MFU formula (no
process groups, except the FLOP count, which runs the real model once in this process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import ConfigError, DataSource, load_config
from pretrain.memory import estimate_memory
from pretrain.metrics import flops_per_token, throughput
from pretrain.layout import Layout
from pretrain.parallel import read_env
from pretrain.schedule import lr_at
from pretrain.train import main

REPO = Path(__file__).resolve().parents[2]
BIG = [REPO / "configs" / "gpt_1p3b_alibi_L1024.yaml", REPO / "configs" / "gpt_1p3b_sinusoidal_L2048.yaml"]
# The paper's 1.3B model by hand (docs/reference.md §1: 25 layers, d 2048, FFN 8192 = 4d, vocabulary
# 50304; MPT-style block: LayerNorm without bias, no linear biases, tied embeddings). Per layer:
# qkv 3d^2 + output d^2 + fc1/fc2 2 x 4d^2 = 12d^2 = 50,331,648, plus two LN weights 2d = 4,096;
# 25 layers 1,258,393,600, embedding V d = 103,022,592, final LN d = 2,048.
N_1P3B = 1_361_418_240


@pytest.mark.parametrize("path", BIG, ids=lambda p: p.stem)
def test_train_dry_run_1p3b_on_128_gpus(path, capsys):
    assert main(["--config", str(path), "--dry-run", "--world-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "valid for 128 GPUs" in out and "world 128 = tp 1 x pp 1 x dp 128" in out
    for row in ("weights", "gradients", "optimizer (ZeRO-1)", "activations", "total per GPU"):
        assert row in out
    assert "1.361 B" in out  # 25 x (4d^2 + 2 d f + 2d) + V d + d with d 2048, f 8192, V 50304


def test_train_dry_run_broken_layout_lists_every_error(capsys):
    code = main(["--config", str(BIG[0]), "--dry-run", "--world-size", "96", "--tp", "3", "--pp", "4",
                 "--zero-stage", "2", "--micro-batch", "7", "optim.min_lr=1.0"])
    assert code == 2
    err = capsys.readouterr().err
    for needle in ("num_attention_heads=16 is not divisible by tensor_parallel=3",
                   "num_layers=25 is not divisible by pipeline_parallel=4",
                   "zero_stage=2 with pipeline_parallel=4",
                   "global_batch_size=1024 is not divisible by micro_batch_size x data_parallel = 7 x 8",
                   "optim.lr=0.0002 and optim.min_lr=1.0 need 0 <= min_lr <= lr"):
        assert needle in err, needle
    assert main(["--config", str(BIG[0]), "--dry-run", "--world-size", "100", "--tp", "8"]) == 2
    assert "world size 100 is not divisible by tensor_parallel x pipeline_parallel = 8" in capsys.readouterr().err


def test_train_dry_run_refuses_a_world_of_no_gpus(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "0")  # --world-size 0 reads as unset, so the launcher's 0 is used
    assert main(["--config", str(BIG[0]), "--dry-run", "--world-size", "0"]) == 2
    assert capsys.readouterr().err == ("train.py: invalid config: world size 0 must be positive: set --world-size "
                                       "(or WORLD_SIZE / SLURM_NTASKS) to the number of GPUs\n")


def test_train_dry_run_refuses_a_layout_that_does_not_fit(capsys):
    code = main(["--config", str(BIG[0]), "--dry-run", "--world-size", "1", "--micro-batch", "64",
                 "train.global_batch_size=64"])
    assert code == 2 and "exceeds hardware.gpu_memory_gb=80" in capsys.readouterr().err


def test_train_memory_estimate_shards_by_zero_stage():
    cfg = load_config(BIG[0])
    n = N_1P3B
    per_stage = {}
    for stage in (0, 1, 2, 3):
        cfg.parallel.zero_stage = stage
        per_stage[stage] = estimate_memory(cfg, Layout.of(cfg, 128))
    gib = 1024**3
    assert per_stage[0].optimizer_gb == pytest.approx(12 * n / gib)
    assert per_stage[1].optimizer_gb == pytest.approx(12 * n / 128 / gib)
    assert per_stage[1].grads_gb == pytest.approx(2 * n / gib)
    assert per_stage[2].grads_gb == pytest.approx(2 * n / 128 / gib)
    assert per_stage[3].params_gb == pytest.approx(2 * n / 128 / gib)
    cfg.parallel.zero_stage, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = 1, 4, 5
    est = estimate_memory(cfg, Layout.of(cfg, 128))  # dp 6.4 is invalid, but the per-GPU share is still defined
    # the first stage: 5 of the 25 layers, each with 12d^2 / 4 = 12,582,912 of its matrices and both
    # LN weights (4,096), plus a quarter of the embedding, 25,755,648 (the final LN is on the last stage)
    assert est.params_per_gpu == 5 * (12_582_912 + 4_096) + 25_755_648 == 88_690_688


def test_train_memory_estimate_counts_deepspeed_fp32_grads_and_buckets():
    """bf16 ZeRO-1/2: the fp32 gradient partition the step reads (4 bytes per sharded parameter)
    and the reduction buckets of engine.ds_config (two bf16 buffers with overlap_comm, one with
    pp > 1, plus the fp32 copy of the bucket being reduced), by hand."""
    cfg = load_config(BIG[0])
    n, bucket, gib = N_1P3B, cfg.parallel.zero_bucket_size, 1024**3
    est = estimate_memory(cfg, Layout.of(cfg, 128))
    assert est.fp32_grads_gb == pytest.approx(4 * n / 128 / gib)
    assert est.buckets_gb == pytest.approx(bucket * (2 * 2 + 4) / gib)
    assert est.total_gb == pytest.approx(est.params_gb + est.grads_gb + est.optimizer_gb + est.activations_gb
                                         + est.fp32_grads_gb + est.buckets_gb)
    cfg.parallel.zero_bucket_size = bucket // 4  # the config field sizes the buckets
    assert estimate_memory(cfg, Layout.of(cfg, 128)).buckets_gb == pytest.approx(est.buckets_gb / 4)
    cfg.parallel.zero_stage = 3  # no stage-1/2 buckets, the fp32 partition stays sharded
    z3 = estimate_memory(cfg, Layout.of(cfg, 128))
    assert z3.buckets_gb == 0 and z3.fp32_grads_gb == pytest.approx(est.fp32_grads_gb)
    cfg.parallel.zero_stage, cfg.parallel.pipeline_parallel = 1, 5  # pp: overlap_comm off, one buffer
    pp = estimate_memory(cfg, Layout.of(cfg, 125))
    assert pp.buckets_gb == pytest.approx(bucket / 4 * (2 + 4) / gib)
    fp32 = estimate_memory(cfg, Layout.of(cfg, 125), bf16=False)  # fp32: grads are already fp32
    assert fp32.fp32_grads_gb == 0 and fp32.buckets_gb == pytest.approx(bucket / 4 * 4 / gib)


def test_train_config_rejects_unknown_keys_and_types(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BIG[0].read_text().replace("\ntrain:\n", "\ntrain:\n  stepz: 3\n", 1))
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must be of type int"):
        load_config(BIG[0], ["train.steps=many"])
    assert load_config(BIG[0], ["optim.lr=3e-4"]).optim.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string


def test_train_lr_schedule_is_warmup_then_cosine():
    o = load_config(BIG[0]).optim  # lr 2e-4, min 1e-5, warm-up 500
    assert lr_at(0, o, 50000) == pytest.approx(2e-4 / 500)
    assert lr_at(499, o, 50000) == pytest.approx(2e-4)
    mid = 500 + (50000 - 500) // 2
    assert lr_at(mid, o, 50000) == pytest.approx(1e-5 + 0.5 * (2e-4 - 1e-5), rel=1e-4)
    assert lr_at(50000, o, 50000) == pytest.approx(1e-5) and lr_at(60000, o, 50000) == pytest.approx(1e-5)
    assert all(lr_at(s, o, 50000) >= lr_at(s + 1, o, 50000) for s in range(500, 50000, 997))


def test_train_mfu_formula_matches_counted_flops():
    """flops_per_token (docs/mfu.md) equals the FLOPs torch counts in one forward + backward of the
    real model (attention through SDPA's math path, counted as full [s, s] matrices); the MFU of
    throughput() is llm-foundry's published one for MPT-1b (docs/reference.md §7)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.model import build_model

    from pretrain.parallel import init_model_parallel

    cfg = load_config(REPO / "configs" / "tiny_alibi.yaml", ["model.seq_length=32", "model.vocab_size=512"])
    init_model_parallel(1, 1, seed=0)
    model = build_model(cfg.model)
    b, s = 2, cfg.model.seq_length
    tokens = torch.randint(0, 512, (b, s))
    pos = torch.arange(s).expand(b, s)
    with FlopCounterMode(display=False) as counter:
        model(tokens, pos, None, labels=tokens).sum().backward()
    counted = counter.get_total_flops()
    assert counted / (b * s) == pytest.approx(flops_per_token(cfg), rel=0.01)
    # MPT-1b (24 layers, d 2048, FFN 8192, a ~50k vocabulary: 100 ids more or less move F by under 0.02%)
    # on 8 H100s (989 TFLOP/s bf16 peak): 45.5k tokens/s/GPU at L=2048 is 41.8% MFU, 48.9k at L=1024 42.0%
    for L, per_gpu, mfu in ((2048, 45_500, 0.418), (1024, 48_900, 0.420)):
        mpt = load_config(BIG[0], ["model.num_layers=24", f"model.seq_length={L}", "hardware.peak_tflops=989"])
        step_time = mpt.train.global_batch_size * L / (8 * per_gpu)
        t = throughput(mpt, Layout.of(mpt, 8), step_time_s=step_time)
        assert t["tokens_per_s_per_gpu"] == pytest.approx(per_gpu)
        assert t["mfu"] == pytest.approx(mfu, rel=0.01)


def test_train_reads_torchrun_slurm_or_no_launcher():
    from pretrain.parallel import read_env

    torchrun = read_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr) == (5, 8, 1, "n1")
    srun = read_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "MASTER_ADDR": "n2",
                     "MASTER_PORT": "12345"})
    assert (srun.rank, srun.world_size, srun.local_rank, srun.master_port) == (9, 16, 1, 12345)
    alone = read_env({})
    assert (alone.rank, alone.world_size) == (0, 1) and alone.master_port > 0
    with pytest.raises(RuntimeError, match="MASTER_PORT is not set"):
        read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    with pytest.raises(RuntimeError, match="MASTER_PORT=0 names no port"):
        read_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "0"})


def test_train_preflight_reports_every_bad_value_before_any_process_group(tiny_data, tmp_path, monkeypatch):
    """Optimizer values, NaN, the seed range and LayerNorm eps are found with the other config
    errors, all at once, before a process group exists (or anything is written); wrong element
    types in lists already at load time."""
    import torch.distributed

    import pretrain.parallel
    from pretrain.loop import train

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was started before the config was checked")

    monkeypatch.setattr(pretrain.parallel, "init_model_parallel", no_process_group)
    monkeypatch.setattr(torch.distributed, "init_process_group", no_process_group)
    bad = {"optim.beta1=1.5": "optim.beta1=1.5 must be in [0, 1)", "optim.beta2=-0.1": "optim.beta2=-0.1 must be in",
           "optim.eps=0": "optim.eps=0.0 must be positive", "optim.weight_decay=-0.1": "optim.weight_decay=-0.1 must be",
           "optim.lr=.nan": "optim.lr=nan must be a finite number", "train.seed=4294967296": "train.seed=4294967296 must",
           "model.layernorm_epsilon=-1e-5": "model.layernorm_epsilon=-1e-05 must be positive"}
    cfg = load_config(REPO / "configs" / "tiny_alibi.yaml", list(bad))
    cfg.data.sources = [DataSource(path=str(tiny_data))]
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "run", read_env({}))
    assert len(e.value.errors) == len(bad), e.value.errors
    for needle in bad.values():
        assert needle in str(e.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny_alibi.yaml", ["validation.length_multipliers=[1, 2.5]", "wandb.tags=[a, 3]"])
    assert e.value.errors == ["validation.length_multipliers[1]=2.5 must be of type int",
                              "wandb.tags[1]=3 must be of type str"]


def test_train_config_file_and_override_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 2\n  hidden_size: [128\n")
    tiny = str(REPO / "configs" / "tiny_alibi.yaml")
    cases = [([str(bad)], f"{bad}:4:1: YAML syntax error: expected ',' or ']'"),
             ([str(tmp_path / "missing.yaml")], f"cannot read config file {tmp_path / 'missing.yaml'}: No such file"),
             ([tiny, "train.steps"], "override 'train.steps' is not of the form key.path=value"),
             ([tiny, "train.steps=[1,"], "override 'train.steps=[1,':1:4: YAML syntax error"),
             ([tiny, "model.seq_length.x=1"], "override 'model.seq_length.x=1': model.seq_length is a value, not a section"),
             ([tiny, "--allow-config-change", "model.seq_len"], "--allow-config-change model.seq_len: not a config key")]
    for (config, *rest), needle in cases:
        assert main(["--config", config, "--dry-run", *rest]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"train.py: invalid config: {needle}"), err


def test_train_zero_sizes_and_unvalidatable_lengths_are_errors_not_crashes(capsys):
    tiny = str(REPO / "configs" / "tiny_alibi.yaml")
    for args, needle in ((["--tp", "0"], "parallel.tensor_parallel=0 and pipeline_parallel=1 must be positive"),
                         (["model.num_attention_heads=0"], "model.num_attention_heads=0 must be positive"),
                         (["validation.tokens=256"], "validation.tokens=256 holds no window of 512 tokens")):
        assert main(["--config", tiny, "--dry-run", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("backend", ["fa2", "flex"])
def test_train_preflight_finds_what_used_to_fail_late(tiny_data, tmp_path, monkeypatch, backend):
    """A sample index bigger than the machine (train.steps=1e12 allocated 13 TiB), a GPU-only
    attention kernel on a CPU machine, wandb online without credentials: one line each in
    preflight, before any process group, instead of a traceback minutes later."""
    import psutil

    import pretrain.parallel
    from pretrain.loop import train

    monkeypatch.setattr(pretrain.parallel, "init_model_parallel", lambda *a, **k: pytest.fail("process group"))
    monkeypatch.setattr(pretrain.parallel, "use_gpu", lambda: False)
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    (tmp_path / "netrc").write_text("machine example.org login a password b\n")
    cfg = load_config(REPO / "configs" / "tiny_alibi.yaml", [
        "train.steps=1000000000000", f"model.attention_backend={backend}", "wandb.mode=online"])
    cfg.data.sources = [DataSource(path=str(tiny_data))]
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "run", read_env({}))
    memory = psutil.virtual_memory().total / 2**30
    assert e.value.errors[0].startswith("train.steps=1000000000000 x train.global_batch_size=") and \
        f"more than this machine's {memory:,.0f} GiB: lower train.steps" in e.value.errors[0], e.value.errors
    assert e.value.errors[1:] == [
        f"model.attention_backend={backend} needs a CUDA GPU (FlexAttention has no CPU backward, FlashAttention no "
        f"CPU kernel): this process runs on the CPU; use model.attention_backend=auto (or sdpa)",
        "wandb.mode=online but no wandb credentials (no WANDB_API_KEY, no `wandb login` entry in ~/.netrc): run "
        "`wandb login`, or use wandb.mode=offline and `wandb sync` later"]
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    cfg = load_config(REPO / "configs" / "tiny_alibi.yaml", ["wandb.mode=online", "train.steps=1000"])
    cfg.data.sources = [DataSource(path=str(tiny_data))]
    from pretrain.loop import preflight

    assert preflight(cfg, read_env({}), tmp_path / "run").data is not None  # logged in: no error
    assert not (tmp_path / "run").exists()


def test_train_dry_run_with_data_makes_the_real_runs_data_checks(tiny_data, capsys):
    tiny = str(REPO / "configs" / "tiny_alibi.yaml")
    assert main(["--config", tiny, "--data", str(tiny_data), "--dry-run"]) == 0
    assert main(["--config", tiny, "--data", str(tiny_data), "--dry-run", "model.vocab_size=1024"]) == 2
    err = capsys.readouterr().err
    assert "was tokenized with a 4096-token vocabulary" in err and "set model.vocab_size >= 4096" in err, err
