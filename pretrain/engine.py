"""DeepSpeed wiring: this rank's megatron-core GPT shard -> a DeepSpeed engine -> one train step.

pp == 1: the GPTModel (wrapped to return the batch-mean loss) in a plain DeepSpeedEngine,
ZeRO 0-3. pp > 1: one megatron-core GPTModel *stage* (pre_process on the first stage,
post_process on the last, megatron picks the stage's global layers) per DeepSpeed
PipelineModule stage, ZeRO 0/1; why DeepSpeed's pipeline and not megatron-core's schedules is
in docs/design.md. Tensor parallelism is megatron-core's own (parallel_state groups), passed to
DeepSpeed as its `mpu` so gradient norms and ZeRO partitions span the right ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel

from pretrain.config import Config
from pretrain.model import build_model
from pretrain.model.params import init_weights
from pretrain.layout import Layout
from pretrain.parallel import MegatronMPU, accelerator_device, use_gpu


def use_bf16(cfg: Config) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_gpu())


def _avoid_deepspeed_jit() -> None:
    """On CPU, DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce op the first
    time it starts (~1 min of g++: Trainer start-up 59.7 s with it, 3.6 s without, docs/benchmarks.md);
    gloo does the same job here, so tell it the op is unavailable. (The other hidden build, CPU
    FusedAdam, is avoided by `torch_adam: true` in ds_config.)"""
    if get_accelerator().device_name() == "cpu":
        # (`import deepspeed.comm.torch` would bind the torch package: deepspeed.comm re-exports it)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# ---------------------------------------------------------------- modules


def _transformer_overrides(cfg: Config) -> dict[str, Any]:
    # init_weights below draws every parameter: megatron's own init (another ~1.4B normals on
    # one CPU thread for the 1.3B model) would only be overwritten.
    out: dict[str, Any] = {"perform_initialization": False}
    if cfg.parallel.pipeline_parallel > 1:
        out["pipeline_dtype"] = torch.bfloat16 if use_bf16(cfg) else torch.float32
    if cfg.train.activation_checkpointing:
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return out


def _build_gpt(cfg: Config, pre_process: bool, post_process: bool) -> GPTModel:
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    gpt = build_model(cfg.model, pre_process=pre_process, post_process=post_process, params_dtype=dtype,
                      transformer_overrides=_transformer_overrides(cfg))
    init_weights(gpt, cfg.model, cfg.train.seed)
    return gpt


class GPTWithLoss(torch.nn.Module):
    """pp == 1: the whole GPT, returning the mean token loss of a micro-batch."""

    def __init__(self, gpt: GPTModel):
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens, position_ids, labels, loss_mask):  # all [b, s]
        loss = self.gpt(tokens, position_ids, None, labels=labels)  # [b, s] fp32 per-token CE
        return (loss * loss_mask).sum() / loss_mask.sum()


class GPTStage(torch.nn.Module):
    """pp > 1: this rank's pipeline stage of the GPT. Inputs: (tokens, position_ids) on the first
    stage, hidden states [s, b, h] after it; output: hidden [s, b, h], or logits [b, s, V/tp] on
    the last stage (the loss is `_pipeline_loss`, which DeepSpeed calls with the labels)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.first = ps.is_pipeline_first_stage()
        self.last = ps.is_pipeline_last_stage()
        self.gpt = _build_gpt(cfg, pre_process=self.first, post_process=self.last)

    def forward(self, inputs):
        if self.first:
            tokens, position_ids = inputs
            return self.gpt(tokens, position_ids, None)
        self.gpt.set_input_tensor(inputs)  # megatron's way to feed a non-first stage
        return self.gpt(None, None, None)


@dataclass
class StepState:
    """One optimizer step's state, shared by `train_step`, the skip hook and the pipeline loss."""

    bad: torch.Tensor | bool = False
    """A non-finite loss on this rank (pp == 1: a device flag, read once, in the hook)."""
    loss_sum: torch.Tensor | float = 0.0
    """pp == 1: this rank's micro-batch losses, summed on the device."""
    world_loss_sum: float = 0.0
    """pp == 1: `loss_sum` summed over every rank, read by the hook."""
    skipped: bool = False


def _pipeline_loss(state: StepState):
    def loss_fn(logits, labels_and_mask):  # logits [b, s, V/tp]
        labels, loss_mask = labels_and_mask
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)  # [b, s]
        loss = (per_token * loss_mask).sum() / loss_mask.sum()
        state.bad = state.bad or not torch.isfinite(loss)  # DeepSpeed's pipeline reads the loss anyway
        return loss

    return loss_fn


class StagePipe(deepspeed.pipe.PipelineModule):
    """PipelineModule whose tied weights are megatron's: the embedding on the first stage and its
    copy as the output layer on the last, gradients all-reduced over megatron's embedding group;
    and a learned position bias shared by all layers (t5, kerple: `gpt.position_bias`), one copy
    per stage, gradients all-reduced over the pipeline group."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # marks every parameter ds_pipe_replicated = False
        stage = self.forward_funcs[0]
        copies = [] if stage.first else list(self._position_bias())
        if stage.last and not stage.first:
            copies.append(stage.gpt.output_layer.weight)
        for p in copies:  # tied copies: left out of the gradient norm and the checkpoint (the first stage has them)
            p.ds_pipe_replicated = True

    def _position_bias(self):
        bias = getattr(self.forward_funcs[0].gpt, "position_bias", None)
        return bias.parameters() if bias is not None else []

    def get_tied_weights_and_groups(self):
        stage = self.forward_funcs[0]
        tied = [(p, ps.get_pipeline_model_parallel_group()) for p in self._position_bias()]
        if ps.is_rank_in_embedding_group(ignore_virtual=True) and (stage.first or stage.last):
            tied.append((stage.gpt.shared_embedding_or_output_weight(), ps.get_embedding_group()))
        return tied

    def allreduce_tied_weight_gradients(self):
        for weight, group in self.get_tied_weights_and_groups():
            dist.all_reduce(weight.grad, group=group)


# ---------------------------------------------------------------- engine


@torch.no_grad()
def _clip_fp32_grads(module: torch.nn.Module, max_norm: float) -> float:
    """Global L2 norm of all gradients of the model (every TP/PP shard once), clipped to
    max_norm like DeepSpeed's ZeRO optimizer does. Parameters replicated over TP ranks count on
    TP rank 0 only; the last stage's tied embedding copy not at all."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    grads = [p.grad for p in module.parameters() if p.grad is not None
             and not getattr(p, "ds_pipe_replicated", False)
             and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
    sq = torch.zeros((), dtype=torch.float64, device=accelerator_device())
    for g in grads:
        sq += g.double().pow(2).sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    norm = float(sq.sqrt())
    if max_norm > 0 and (norm + 1e-6) / max_norm > 1:
        coef = max_norm / (norm + 1e-6)
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def ds_config(cfg: Config, layout: Layout, timers: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of `cfg` (the choices are explained in docs/design.md, "Speed");
    `timers`: DeepSpeed's synchronizing timers (the trainer asks for them when PRETRAIN_DS_TIMERS=1)."""
    t, o, bf16 = cfg.train, cfg.optim, use_bf16(cfg)
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage in (1, 2):
        bucket = cfg.parallel.zero_bucket_size
        # Gradients reduced bucket by bucket while backward still runs (DeepSpeed's pipeline
        # engine cannot overlap: off with pp > 1), copied into one flat buffer as they arrive.
        zero.update(overlap_comm=layout.pp == 1, contiguous_gradients=True, reduce_bucket_size=bucket,
                    allgather_bucket_size=bucket)
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": layout.accumulation,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: torch's AdamW instead of DeepSpeed's JIT-built FusedAdam (~1 min build on
            # CPU, a CUDA toolchain on GPU); on GPU torch's own fused kernel (fused=True).
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": True, "adam_w_mode": True, **({"fused": True} if use_gpu() else {})},
        },
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # bf16 gradients are summed over data-parallel ranks in fp32 (one rounding, not one per hop).
        **({"communication_data_type": "fp32"} if bf16 else {}),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        # DeepSpeed's timers synchronize the device: the throughput timer at every forward and
        # step (from its third step on), wall_clock_breakdown around every phase. Off unless asked.
        "wall_clock_breakdown": timers,
        "timers": {"throughput": {"enabled": timers, "synchronized": timers}},
    }


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The micro-batch on the accelerator without a host sync: a copy from pageable memory waits
    for the device to finish its queue, one from pinned memory with non_blocking is queued behind
    it (torch's pinned-memory cache keeps the buffer until the copy has run)."""
    if torch.device(device).type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class StepResult:
    loss: float
    """Mean token loss of the global batch (identical on every rank)."""
    skipped: bool
    """A non-finite loss was seen somewhere: the update was not applied."""
    raw_grad_norm: Any = None
    """DeepSpeed's gradient norm as it left the step (a device tensor on GPU)."""

    @property
    def grad_norm(self) -> float:
        """The global gradient norm (NaN for a skipped step); reading it waits for the GPU, so
        the loop reads it only when it logs."""
        return float("nan") if self.skipped or self.raw_grad_norm is None else float(self.raw_grad_norm)


class Trainer:
    """Owns the DeepSpeed engine; `train_step` runs one optimizer step over a global batch,
    `nll` (pp == 1) and `pipeline_mean_nll` (pp > 1) score windows for validation."""

    def __init__(self, cfg: Config, layout: Layout):
        _avoid_deepspeed_jit()
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # joins our running process group
        self.cfg = cfg
        self.layout, self.pp = layout, layout.pp
        self.state = StepState()
        config = ds_config(cfg, layout, timers=os.environ.get("PRETRAIN_DS_TIMERS") == "1")
        if self.pp == 1:
            self.gpt = _build_gpt(cfg, pre_process=True, post_process=True)
            module = GPTWithLoss(self.gpt)
            mpu = MegatronMPU()
        else:
            topo = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
            module = StagePipe(layers=[deepspeed.pipe.LayerSpec(GPTStage, cfg) for _ in range(self.pp)],
                               topology=topo, loss_fn=_pipeline_loss(self.state), partition_method="uniform")
            self.gpt = module.forward_funcs[0].gpt
            mpu = None  # the PipelineModule's grid (same rank order as megatron) is the mpu
        if cfg.parallel.zero_stage == 3:
            # The output layer reads the embedding's weight outside the embedding module, and every
            # layer reads the learned position bias (t5, kerple), whose own forward never runs.
            bias = getattr(self.gpt, "position_bias", None)
            for p in [self.gpt.shared_embedding_or_output_weight(), *(bias.parameters() if bias else [])]:
                deepspeed.zero.register_external_parameter(self.gpt, p)
        if config["zero_optimization"]["stage"] == 0 and not config["bf16"]["enabled"]:
            # DeepSpeed's plain fp32 clip counts the tied pipeline copy twice and pipeline stages'
            # LayerNorms not at all; the skip hook clips instead (same formula as ZeRO's).
            config["gradient_clipping"] = 0.0
        self.grad_norm: float | None = None
        # The GPU init_model_parallel selected for this task (DeepSpeed would take LOCAL_RANK,
        # which is no device index when each task sees only its own GPU).
        args = argparse.Namespace(device_rank=torch.cuda.current_device()) if use_gpu() else None
        self.engine, _, _, _ = deepspeed.initialize(
            args=args, model=module, model_parameters=_param_groups(module, cfg.optim.weight_decay), config=config,
            mpu=mpu)
        self.attention_kernel: str = self.gpt.attention_kernel
        self._install_skip_hook()

    @property
    def precision(self) -> str:
        """bf16 or fp32: what the engine computes in (named in the run's metrics)."""
        return "bf16" if self.engine.bfloat16_enabled() else "fp32"

    def _install_skip_hook(self) -> None:
        """Skip the optimizer update of a step that saw a non-finite loss on any rank. DeepSpeed
        skips only on fp16 overflow, so its step is wrapped here: the flag is all-reduced at the
        step (every rank reaches it, also inside the pipeline schedule), and a bad step gets the
        same clean-up as DeepSpeed's overflow path (gradients dropped, no update)."""
        engine, state, original = self.engine, self.state, self.engine._take_model_step
        device = accelerator_device()

        own_clip = not (engine.zero_optimization() or engine.bfloat16_enabled())

        def take_model_step(lr_kwargs=None):
            # The step's one host read: every rank's bad flag and loss sum in one all-reduce.
            stats = torch.zeros(2, dtype=torch.float64, device=device)
            stats[0], stats[1] = state.bad, state.loss_sum
            dist.all_reduce(stats)
            bad, state.world_loss_sum = stats.tolist()
            state.skipped = bad > 0
            if not state.skipped:
                if own_clip:
                    self.grad_norm = _clip_fp32_grads(engine.module, self.cfg.optim.grad_clip)
                return original(lr_kwargs)
            if engine.zero_optimization() or engine.bfloat16_enabled():
                engine.optimizer.zero_grad()
            else:
                engine.zero_grad()
            engine.skipped_steps += 1
            engine._step_applied = False

        engine._take_model_step = take_model_step

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float) -> StepResult:
        """One optimizer step over this rank's micro-batches (accumulation steps of them). With
        pp == 1 the host never waits for the device during the micro-batches (pinned,
        non-blocking batch copies; DeepSpeed's timers off). It waits at the step: ZeRO-1/2 with
        overlap_comm synchronizes the GPU once after the last backward (DeepSpeed's gradient
        epilogue, so the reduction stream is done); the skip hook reads every rank's bad flag and
        loss sum; with bf16, ZeRO's gradient-overflow check reads its flag and the norm's validity
        (kept: a non-finite gradient never reaches the weights); with fp32 and no ZeRO,
        `_clip_fp32_grads` reads the norm. (docs/reference.md §11)"""
        self.set_lr(lr)
        state, device = self.state, accelerator_device()
        state.bad, state.loss_sum, self.grad_norm = False, 0.0, None
        self.engine.train()
        if self.pp > 1:
            it = iter([((b["tokens"], b["position_ids"]), (b["labels"], b["loss_mask"])) for b in micro_batches])
            loss = float(self.engine.train_batch(data_iter=it))  # already averaged over micro-batches and dp
        else:
            state.bad = torch.zeros((), dtype=torch.bool, device=device)
            state.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for b in micro_batches:
                b = to_device(b, device)
                # DeepSpeed divides the loss by the accumulation steps in backward and averages
                # gradients over data-parallel ranks at the boundary step (the last micro-batch),
                # where the skip hook reads the flag and the sum.
                loss = self.engine(b["tokens"], b["position_ids"], b["labels"], b["loss_mask"])
                state.bad |= ~torch.isfinite(loss)
                state.loss_sum += loss.detach().double()
                self.engine.backward(loss)
                self.engine.step()
            # every rank holds one data-parallel replica's sum (tp ranks the same): the mean
            loss = state.world_loss_sum / (self.layout.world_size * len(micro_batches))
        grad_norm = self.engine.get_global_grad_norm() if self.grad_norm is None else self.grad_norm
        return StepResult(loss=loss, skipped=state.skipped, raw_grad_norm=grad_norm)

    # ---------------------------------------------------------------- evaluation

    @contextlib.contextmanager
    def _evaluating(self):
        """The engine in eval mode (no dropout) inside, back in train mode after."""
        self.engine.eval()
        try:
            yield
        finally:
            self.engine.train()

    @torch.no_grad()
    def nll(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token NLL [b, L] of `targets` given `inputs` (pp == 1; any length)."""
        device = accelerator_device()
        pos = torch.arange(inputs.shape[1]).expand_as(inputs)
        with self._evaluating():
            out = self.gpt(inputs.to(device), pos.to(device), None, labels=targets.to(device))
        return out.float()

    @torch.no_grad()
    def pipeline_mean_nll(self, windows: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """pp > 1: mean token NLL over this data-parallel rank's windows (same count on every rank),
        averaged over data-parallel ranks by DeepSpeed."""
        self.engine.reset_activation_shape()  # the evaluation length differs from training
        ones = torch.ones_like(windows[0][1], dtype=torch.float32)
        it = iter([((x, torch.arange(x.shape[1]).expand_as(x)), (y, ones)) for x, y in windows])
        with self._evaluating():  # eval_batch sets eval mode itself and leaves it on
            loss = self.engine.eval_batch(it, num_micro_batches=len(windows))
        self.engine.reset_activation_shape()
        return float(loss)
