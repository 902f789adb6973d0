"""One rank of the TP=2 / PP=2 vs single-model checks (run by test_model_parallel.py as a
plain subprocess; 2 ranks).

For each case both ranks first build the TP=1, PP=1 model (2 data-parallel copies) and record
logits, per-token loss and gradients. Then:
- TP=2: build from a DIFFERENT seed, load shards sliced from the full weights by name
  (independent of megatron's own partition attributes), compare logits, loss, gradients.
- PP=2: rank 0 = embedding + first half of the layers, rank 1 = the rest + final LN + output
  layer; activations and their gradients travel by send/recv. Compare the loss and the
  gradients; the tied embedding's gradient is the sum of the two stages' (the all-reduce that
  training does over the embedding group), and so is that of a learned position bias shared by
  all layers (t5, kerple: one copy per stage, all-reduced over the pipeline group).
Writes OUT_DIR/rank<RANK>.json: max relative errors per case. usage: parallel_worker.py OUT_DIR, with
torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set, as tests/helpers.py's launch sets them.
"""

import json
import os
import sys
import traceback

# dims along which megatron-core shards each weight under TP (others are replicated)
ROW_SPLIT = ("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight",  # output dim 0
             "position_bias.r1", "position_bias.r2")  # KERPLE [heads]
COL_SPLIT = ("linear_proj.weight", "linear_fc2.weight", "position_bias.weight")  # input dim 1; T5 [buckets, heads]
EMBEDDING = "embedding.word_embeddings.weight"


def shard(name, full, rank, tp):
    if name.endswith(ROW_SPLIT):
        return full.chunk(tp, dim=0)[rank]
    if name.endswith(COL_SPLIT):
        return full.chunk(tp, dim=1)[rank]
    return full


def stage_to_full(name, rank, layers_per_stage):
    """Stage-local parameter name -> name in the full model."""
    if name == "output_layer.weight":
        return EMBEDDING  # tied
    if name.startswith("decoder.layers."):
        idx, rest = name[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{int(idx) + rank * layers_per_stage}.{rest}"
    return name


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_full(model, ids, pos, labels):
    model.zero_grad(set_to_none=True)
    logits = model(ids, pos, None, runtime_gather_output=True).detach()
    loss = model(ids, pos, None, labels=labels)
    loss.sum().backward()
    return logits, loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def run_pipeline(torch, dist, model, rank, ids, pos, labels, hidden_shape):
    """Two-stage forward/backward by hand; returns (loss or None, grads by stage name)."""
    if rank == 0:
        hidden = model(ids, pos, None)  # [s, b, d]
        dist.send(hidden.detach().contiguous(), dst=1)
        grad = torch.empty(hidden_shape)
        dist.recv(grad, src=1)
        hidden.backward(grad)
        loss = None
    else:
        hidden = torch.empty(hidden_shape)
        dist.recv(hidden, src=0)
        hidden.requires_grad_()
        model.set_input_tensor(hidden)
        loss = model(ids, pos, None, labels=labels)  # input_ids unused on a non-first stage
        loss.sum().backward()
        dist.send(hidden.grad.contiguous(), dst=0)
        loss = loss.detach()
    return loss, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def main(rank):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from model_helpers import POSITIONS, batch, small_config

    from pretrain.model import build_model

    from pretrain.parallel import init_model_parallel

    results = {}
    for heads in (12, 16):
        for position in POSITIONS:
            cfg = small_config(position, heads)
            ids, pos, labels = batch(cfg)
            init_model_parallel(tp=1, seed=0)
            ref = build_model(cfg)
            full = {n: p.detach().clone() for n, p in ref.named_parameters()}
            logits1, loss1, grads1 = run_full(ref, ids, pos, labels)

            init_model_parallel(tp=2, seed=1)
            model = build_model(cfg)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(shard(n, full[n], rank, 2))
            logits2, loss2, grads2 = run_full(model, ids, pos, labels)
            results[f"tp-{position}-{heads}"] = {
                "logits": rel(logits2, logits1),
                "loss": rel(loss2, loss1),
                "grads": max(rel(grads2[n], shard(n, grads1[n], rank, 2)) for n in grads2),
                "n_grads": len(grads2),
            }

            if heads != 12:
                continue  # PP does not touch attention heads: one head count suffices
            init_model_parallel(tp=1, pp=2, seed=2)
            stage = build_model(cfg, pre_process=rank == 0, post_process=rank == 1)
            params = dict(stage.named_parameters())
            tied = params[EMBEDDING if rank == 0 else "output_layer.weight"].detach().clone()
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(full[stage_to_full(n, rank, cfg.num_layers // 2)])
            hidden_shape = (cfg.seq_length, ids.shape[0], cfg.hidden_size)
            loss_pp, grads_pp = run_pipeline(torch, dist, stage, rank, ids, pos, labels, hidden_shape)
            tied_name = EMBEDDING if rank == 0 else "output_layer.weight"
            dist.all_reduce(grads_pp[tied_name])  # the embedding-group all-reduce of training
            for n in grads_pp:
                if n.startswith("position_bias."):
                    dist.all_reduce(grads_pp[n])  # the pipeline-group all-reduce of training
            other = torch.empty_like(tied)
            dist.all_reduce(other.copy_(tied))  # both stages' init copies, summed
            results[f"pp-{position}"] = {
                "loss": rel(loss_pp, loss1) if loss_pp is not None else 0.0,
                "grads": max(rel(g, grads1[stage_to_full(n, rank, cfg.num_layers // 2)]) for n, g in grads_pp.items()),
                "n_grads": len(grads_pp),
                "tied_init_equal": bool(torch.equal(other, 2 * tied)),
            }
    return results


if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    try:
        res = main(rank)
    except Exception:
        res = {"error": traceback.format_exc()}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo on torch 2.13 can abort at interpreter exit (docs/reference.md §5)
