"""Making megatron-core run on a CPU, in one place: patches that follow the tensors' device.

megatron-core 0.16 assumes CUDA in these places (docs/reference.md §5); each is handled here
(`apply_cpu_compat`) or by a choice elsewhere. The patches are applied on every machine and act
on the device of the tensors they see, never on whether a GPU exists: a CPU model on a GPU
machine (the CPU tests there) is still a CPU model, and a GPU model gets megatron's own path.

- parameters allocated on `torch.cuda.current_device()` -> builder: `use_cpu_initialization=True`
  always (full weights drawn on the CPU and sliced: also the same model for any TP degree);
- `RotaryEmbedding` keeps `inv_freq` as a plain attribute and moves it to CUDA in `get_emb` ->
  patched: a non-persistent buffer, so it moves with the model (`model.to(device)`), and
  `get_emb` leaves it there;
- `mappings._gather_along_last_dim` (TP logits gather) allocates on CUDA -> patched for
  non-CUDA inputs: list all_gather on the input's device (works on gloo);
- activation recompute saves/restores the CUDA RNG state -> patched where `use_gpu()` is false (a
  CPU run, also on a GPU machine): the CPU RNG state, so dropout masks replay exactly;
- PP > 1 with tied embeddings: `weight.data.cuda()` before the first/last-stage all-reduce ->
  patched: the all-reduce where the weight is (moved to the GPU and back only for nccl);
- the CUDA RNG tracker (`model_parallel_cuda_manual_seed`) -> `pretrain.parallel.seed_rng`: the
  inference tracker, whose fork is a no-op, on CPU runs;
- `attention_mask=None` makes megatron's attention build a causal mask on "cuda" ->
  attention.py builds mask and ALiBi bias itself; callers pass None;
- fused kernels (bias-GELU, masked softmax, rope, gradient-accumulation fusion) -> builder:
  every fusion flag off, so CPU and GPU compute the same thing (the native fused cross-entropy,
  plain torch.compile, is on for bf16 models);
- not handled: pipeline `schedules.py` / `p2p_communication.py` (use "cuda"; the training side
  runs pipelines through DeepSpeed), `GlobalMemoryBuffer` (CUDA; used only by sequence
  parallelism and megatron's own attention, neither used here), `get_megatron_optimizer`.

Typical use (tests, tools, single-process evaluation):

    from pretrain.model import build_model
    from pretrain.parallel import init_model_parallel
    init_model_parallel(tp=1)                # or from each of 2 gloo processes: init_model_parallel(tp=2)
    model = build_model(cfg.model)
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel import random as mrandom

from pretrain.parallel import use_gpu

_APPLIED = False


def apply_cpu_compat() -> None:
    """Patch megatron-core's CUDA-only code paths listed above (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    for patch in (_rope, _tp_gather, _recompute_rng, _tied_embedding_allreduce):
        patch()
    _APPLIED = True


def _rope() -> None:
    init = RotaryEmbedding.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.register_buffer("inv_freq", self.__dict__.pop("inv_freq"), persistent=False)

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        # megatron's body minus the move of inv_freq to torch.cuda.current_device()
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]  # [s, 1, 1, dim]

    RotaryEmbedding.__init__ = __init__
    RotaryEmbedding.get_emb = get_emb


def _tp_gather() -> None:
    original = mappings._gather_along_last_dim

    def gather_along_last_dim(input_, group):
        # [..., h/tp] on each rank -> [..., h]
        if group.size() == 1 or input_.is_cuda:
            return original(input_, group)
        parts = [torch.empty_like(input_) for _ in range(group.size())]
        torch.distributed.all_gather(parts, input_.contiguous(), group=group)
        return torch.cat(parts, dim=-1).contiguous()

    mappings._gather_along_last_dim = gather_along_last_dim


def _recompute_rng() -> None:
    get_states, set_states = mrandom._get_all_rng_states, mrandom._set_all_rng_states

    def get_all_rng_states():
        # (cpu, cuda, tracker) as megatron's on a GPU run; a CPU run has no CUDA state to keep
        if use_gpu():
            return get_states()
        return torch.get_rng_state(), None, mrandom.get_cuda_rng_tracker().get_states()

    def set_all_rng_states(cpu_rng_state, cuda_rng_state, tracker_states):
        if cuda_rng_state is not None:
            return set_states(cpu_rng_state, cuda_rng_state, tracker_states)
        torch.set_rng_state(cpu_rng_state)
        mrandom.get_cuda_rng_tracker().set_states(tracker_states)

    mrandom._get_all_rng_states = get_all_rng_states
    mrandom._set_all_rng_states = set_all_rng_states


def _tied_embedding_allreduce() -> None:
    setup = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self):
        # megatron's setup with its `.cuda()` all-reduce skipped, then that all-reduce where the
        # weight is (first stage's embedding + last stage's zeroed output weight -> the same weight)
        dist = torch.distributed
        in_group = dist.is_initialized() and self._is_in_embd_group()
        self._is_in_embd_group = lambda: False  # instance attribute shadows the method
        try:
            setup(self)
        finally:
            del self._is_in_embd_group
        if in_group:
            weight = self.shared_embedding_or_output_weight().data
            nccl_needs_gpu = dist.get_backend(self.embd_group) == "nccl" and not weight.is_cuda
            buf = weight.cuda() if nccl_needs_gpu else weight
            dist.all_reduce(buf, group=self.embd_group)
            weight.copy_(buf)

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer
