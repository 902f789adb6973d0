"""Per-GPU memory estimate for a layout, computed from the config alone (the --dry-run table).

Why analytic: a 128-GPU layout must be checked on a laptop, before a queue slot is spent.
Bytes per parameter follow the ZeRO paper (Rajbhandari et al. 2020): with bf16 mixed
precision, 2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master, Adam m, v); ZeRO-1 shards
the 12, ZeRO-2 also the grads, ZeRO-3 also the weights, over the data-parallel ranks. In fp32
(CPU) weights and grads take 4 each and Adam 8 (the weights are the master copy).
DeepSpeed adds, in bf16, the fp32 copy of this rank's gradient partition that the optimizer
step reads (4 bytes per sharded parameter), and for ZeRO-1/2 its reduction buckets
(engine.ds_config, `parallel.zero_bucket_size` elements each): two gradient-dtype buffers
(one with pp > 1, where overlap_comm is off) and, in bf16, the fp32 copy of the bucket being
reduced (communication in fp32). The parameter all-gather writes into the flat weight buffer
(all_gather_into_tensor): no bucket of its own.
Activations follow Korthikanti et al. 2022 (per layer, no sequence parallelism):
s*b*h*(10 + 24/t) bytes in 16-bit plus 5*a*s^2*b/t for materialized attention scores (absent
with FlexAttention, which never stores [s, s]); full recompute keeps only 2*s*b*h per layer
plus one layer's working set. A pipeline stage holds up to `pp` micro-batches in flight (1F1B).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pretrain.config import Config
from pretrain.layout import Layout

GIB = 1024**3


def parameter_count(cfg: Config, tp: int = 1, pp: int = 1) -> int:
    """Parameters from the shape alone (no model built): the whole model at tp = pp = 1, else the
    busiest rank's share of a tp x pp layout. Tied embeddings counted once, LayerNorms without
    bias; a learned position bias (t5: buckets x heads, kerple: 2 x heads) is left out. The
    first stage holds the embedding; with pp > 1 the last holds a tied copy and the final LN."""
    m = cfg.model
    h = m.hidden_size
    per_layer = (4 * h * h + 2 * h * m.ffn_hidden_size) // tp + 2 * h
    return (m.num_layers // pp) * per_layer + m.vocab_size * h // tp + (h if pp == 1 else 0)


@dataclass
class MemoryEstimate:
    layout: Layout
    params_per_gpu: int
    """Parameters on the busiest rank (first/last pipeline stage hold the embedding)."""
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    fp32_grads_gb: float = 0.0
    """bf16: the fp32 gradient partition the optimizer step reads."""
    buckets_gb: float = 0.0
    """ZeRO-1/2: DeepSpeed's gradient-reduction buckets."""

    @property
    def total_gb(self) -> float:
        return (self.params_gb + self.grads_gb + self.fp32_grads_gb + self.buckets_gb + self.optimizer_gb
                + self.activations_gb)

    def table(self, cfg: Config) -> str:
        p, t, lay = cfg.parallel, cfg.train, self.layout
        rows = [
            ("layout", f"world {lay.world_size} = tp {lay.tp} x pp {lay.pp} x dp {lay.dp}"),
            ("batch", f"global {t.global_batch_size} = micro {t.micro_batch_size} x accum {lay.accumulation} x dp {lay.dp}"),
            ("parameters (model)", f"{parameter_count(cfg) / 1e9:.3f} B"),
            ("parameters (per GPU)", f"{self.params_per_gpu / 1e6:.1f} M"),
            ("weights", f"{self.params_gb:8.2f} GiB"),
            ("gradients", f"{self.grads_gb:8.2f} GiB"),
            ("fp32 gradient partition", f"{self.fp32_grads_gb:8.2f} GiB"),
            ("ZeRO reduction buckets", f"{self.buckets_gb:8.2f} GiB"),
            (f"optimizer (ZeRO-{p.zero_stage})", f"{self.optimizer_gb:8.2f} GiB"),
            ("activations", f"{self.activations_gb:8.2f} GiB"),
            ("total per GPU", f"{self.total_gb:8.2f} GiB of {cfg.hardware.gpu_memory_gb:g} GiB"),
        ]
        other = []
        for stage in (0, 1, 2, 3) if p.pipeline_parallel == 1 else (0, 1):
            alt = dataclasses.replace(cfg, parallel=dataclasses.replace(p, zero_stage=stage))
            other.append(f"ZeRO-{stage} {estimate_memory(alt, lay).total_gb:.1f}")
        rows.append(("total by ZeRO stage", " | ".join(other) + " GiB"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def estimate_memory(cfg: Config, layout: Layout, *, bf16: bool = True, flex_attention: bool = True) -> MemoryEstimate:
    """Estimate per-GPU memory of `cfg` laid out as `layout`."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, dp, accumulation = layout.tp, layout.pp, layout.dp, layout.accumulation
    h, s, b, a = m.hidden_size, m.seq_length, t.micro_batch_size, m.num_attention_heads
    params = parameter_count(cfg, tp, pp)

    w_bytes, g_bytes, o_bytes = (2, 2, 12) if bf16 else (4, 4, 8)
    shard = {0: (1, 1, 1), 1: (1, 1, dp), 2: (1, dp, dp), 3: (dp, dp, dp)}[p.zero_stage]
    weights = params * w_bytes / shard[0]
    grads = params * g_bytes / shard[1]
    optimizer = params * o_bytes / shard[2]
    fp32_grads = params * 4 / shard[2] if bf16 else 0
    in_flight = 2 if pp == 1 else 1
    buckets = p.zero_bucket_size * (in_flight * g_bytes + (4 if bf16 else 0)) if p.zero_stage in (1, 2) else 0

    act_bytes = 2 if bf16 else 4
    layer_act = s * b * h * (10 + 24 / tp) * act_bytes / 2
    if not flex_attention:
        layer_act += 5 * a * s * s * b / tp * act_bytes / 2
    layers = m.num_layers // pp
    if t.activation_checkpointing:
        acts = layers * 2 * s * b * h * act_bytes / 2 + layer_act
    else:
        acts = layers * layer_act
    acts *= min(pp, accumulation)
    logits = s * b * m.vocab_size / tp * 4 * 2  # fp32 logits + their gradient on the last stage
    return MemoryEstimate(
        layout=layout,
        params_per_gpu=params,
        params_gb=weights / GIB,
        grads_gb=grads / GIB,
        optimizer_gb=optimizer / GIB,
        activations_gb=(acts + logits) / GIB,
        fp32_grads_gb=fp32_grads / GIB,
        buckets_gb=buckets / GIB,
    )
