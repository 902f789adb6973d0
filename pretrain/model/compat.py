"""Making megatron-core run on a CPU, in one place, applied only when there is no GPU.

megatron-core 0.16 assumes CUDA in these places (REFERENCE.md section 5), each handled here or
by a choice elsewhere in this package:

| assumption                                                   | handled by                                    |
|--------------------------------------------------------------|-----------------------------------------------|
| parameters allocated on `torch.cuda.current_device()`        | builder: `use_cpu_initialization=True` always |
|                                                              | (also makes init identical for any TP degree) |
| `GlobalMemoryBuffer.get_tensor` allocates on CUDA            | `apply_cpu_compat`: buffer on the CPU         |
| `RotaryEmbedding.get_emb` moves `inv_freq` to CUDA           | `apply_cpu_compat`: keeps it where it is       |
| `mappings._gather_along_last_dim` (TP logits gather) on CUDA | `apply_cpu_compat`: gathers on the input's device |
| activation recompute saves/restores the CUDA RNG state     | `apply_cpu_compat`: saves/restores the CPU RNG state (dropout masks replay exactly) |
| PP > 1 with tied embeddings: `weight.data.cuda()` before the | `apply_cpu_compat`: the same all-reduce of the |
|   first/last-stage embedding all-reduce                       | tied weight, on the CPU                       |
| CUDA RNG tracker (`model_parallel_cuda_manual_seed`)         | `init_model_parallel`: inference tracker on CPU, whose fork is a no-op |
| `attention_mask=None` -> causal mask built on "cuda"         | attention.py: mask/bias built inside CoreAttention, callers pass None |
| fused kernels (bias-GELU, masked softmax, rope, grad-accum)   | builder: every fusion flag off                 |
| pipeline `schedules.py` / `p2p_communication.py` use "cuda"  | not patched: pipeline parallelism on CPU runs through DeepSpeed's PipelineModule (training side) |
| `get_megatron_optimizer`, `sequence_parallel`                | not used (DeepSpeed owns the optimizer; sequence_parallel stays off) |

Typical use (tests, tools, single-process evaluation):

    from pretrain.model import build_model, init_model_parallel
    init_model_parallel(tp=1)                # or from each of 2 gloo processes: init_model_parallel(tp=2)
    model = build_model(cfg.model)
"""

from __future__ import annotations

import os

import torch


def apply_cpu_compat() -> None:
    """Patch megatron-core's CUDA-only allocations to the CPU. No-op when CUDA is available;
    idempotent."""
    if torch.cuda.is_available():
        return
    from megatron.core import utils

    if getattr(utils.GlobalMemoryBuffer.get_tensor, "_cpu_compat", False):
        return

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        numel = 1
        for n in tensor_shape:
            numel *= n
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype, device="cpu")
        return buf[:numel].view(*tensor_shape)

    get_tensor._cpu_compat = True
    utils.GlobalMemoryBuffer.get_tensor = get_tensor

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        # megatron's body minus the move of inv_freq to torch.cuda.current_device()
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]  # [s, 1, 1, dim]

    RotaryEmbedding.get_emb = get_emb

    from megatron.core.tensor_parallel import mappings

    def gather_along_last_dim(input_, group):
        # [..., h/tp] on each rank -> [..., h]; list all_gather works on gloo
        if group.size() == 1:
            return input_
        parts = [torch.empty_like(input_) for _ in range(group.size())]
        torch.distributed.all_gather(parts, input_.contiguous(), group=group)
        return torch.cat(parts, dim=-1).contiguous()

    mappings._gather_along_last_dim = gather_along_last_dim

    from megatron.core.tensor_parallel import random as mrandom

    def get_all_rng_states():
        # (cpu, cuda, tracker) as megatron's; on CPU dropout draws from the CPU generator
        return torch.get_rng_state(), None, mrandom.get_cuda_rng_tracker().get_states()

    def set_all_rng_states(cpu_rng_state, cuda_rng_state, tracker_states):
        torch.set_rng_state(cpu_rng_state)
        mrandom.get_cuda_rng_tracker().set_states(tracker_states)

    mrandom._get_all_rng_states = get_all_rng_states
    mrandom._set_all_rng_states = set_all_rng_states

    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self):
        # megatron's setup with its CUDA all-reduce skipped, then that all-reduce on the CPU
        # (first stage's embedding + last stage's zeroed output weight -> the same weight)
        in_group = torch.distributed.is_initialized() and self._is_in_embd_group()
        self._is_in_embd_group = lambda: False  # instance attribute shadows the method
        try:
            setup(self)
        finally:
            del self._is_in_embd_group
        if in_group:
            torch.distributed.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def seed_rng(seed: int) -> None:
    """Seed torch, and megatron-core's model-parallel RNG tracker (CUDA) or its no-op CPU
    stand-in (the CUDA tracker cannot be created without a GPU)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def init_model_parallel(tp: int = 1, pp: int = 1, *, seed: int = 1234) -> None:
    """Initialize torch.distributed (if needed) and megatron-core's parallel_state, then seed.

    Without an initialized process group, starts a single-process one (world size 1) on a
    free-standing TCP store; under torchrun or with MASTER_ADDR/RANK/WORLD_SIZE set, joins that
    group. Backend: nccl with CUDA, gloo on CPU. Data parallel = world_size / (tp * pp).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    apply_cpu_compat()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp x pp = {tp} x {pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_rng(seed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
