"""Training data through megatron-core's GPTDataset / BlendedMegatronDatasetBuilder over
data_prep/preprocess.py output directories.

Deterministic by construction: sample i of the (blended) dataset is fixed by the seed, the
sources and L; step k reads global samples [k*G, (k+1)*G) (G = global batch), this
data-parallel rank the contiguous slice dp_rank*G/dp ... (dp_rank+1)*G/dp, cut into
micro-batches. The checkpoint stores only `consumed_samples` = step * G, so a resumed run reads
exactly the samples an uninterrupted run would have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pretrain.config import Config


def source_dirs(cfg: Config) -> list[Path]:
    return [Path(s.path) for s in cfg.data.sources]


def data_errors(cfg: Config) -> list[str]:
    """Sources exist, share one tokenizer, and the model's vocab covers it."""
    from data_prep.manifest import load_manifest

    if not cfg.data.sources:
        return ["no training data: pass --data DIR (a data_prep/preprocess.py output directory) "
                "or set data.sources in the config"]
    errors, tokenizers = [], {}
    for d in source_dirs(cfg):
        try:
            m = load_manifest(d)
        except (FileNotFoundError, ValueError) as e:
            errors.append(str(e))
            continue
        tok = m["tokenizer"]
        tokenizers[str(d)] = tok
        if tok["vocab_size"] > cfg.model.vocab_size:
            errors.append(
                f"{d} was tokenized with a {tok['vocab_size']}-token vocabulary ({tok['path']}) but "
                f"model.vocab_size={cfg.model.vocab_size}: set model.vocab_size >= {tok['vocab_size']} "
                f"(a multiple of 128, e.g. {-(-tok['vocab_size'] // 128) * 128})"
            )
        if m["splits"]["train"]["tokens"] <= cfg.model.seq_length:
            errors.append(f"{d} has {m['splits']['train']['tokens']} training tokens, fewer than one "
                          f"sequence of seq_length={cfg.model.seq_length}: use more data or a shorter L")
    if len({t["sha256"] for t in tokenizers.values()}) > 1:
        listing = ", ".join(f"{d}: {t['path']} ({t['sha256'][:12]})" for d, t in tokenizers.items())
        errors.append(f"data sources use different tokenizers ({listing}): re-tokenize them with one tokenizer")
    return errors


def tokenizer_info(cfg: Config) -> dict:
    """The tokenizer record of the first source's manifest (path, sha256, vocab_size, ...)."""
    from data_prep.manifest import load_manifest

    return load_manifest(source_dirs(cfg)[0])["tokenizer"]


def _blend(cfg: Config, split: str) -> tuple[list[str], list[float]] | None:
    """Shard prefixes of every source and their weights: the source weight spread over its
    shards in proportion to their tokens (so each source is sampled at its configured rate)."""
    from data_prep.manifest import load_manifest, shard_prefixes

    prefixes, weights = [], []
    total_w = sum(s.weight for s in cfg.data.sources)
    for src in cfg.data.sources:
        root = Path(src.path).resolve()
        shards = [s for s in load_manifest(root).get("merged", []) if s["split"] == split and s["documents"] > 0]
        if [str(root / s["prefix"]) for s in shards] != shard_prefixes(root, split):
            raise ValueError(f"{root}/manifest.json: merged shard list is inconsistent; re-run preprocess")
        tokens = sum(s["tokens"] for s in shards)
        for s in shards:
            prefixes.append(str(root / s["prefix"]))
            weights.append(src.weight / total_w * s["tokens"] / tokens)
    return (prefixes, weights) if prefixes else None


class _Tok:
    """What GPTDataset reads of a tokenizer (eod, pad, vocab_size), from the data manifest, so
    training needs no SentencePiece file on the compute nodes."""

    def __init__(self, info: dict):
        self.eod = info["eod"]
        self.pad = info.get("pad", -1)
        self.vocab_size = info["vocab_size"]
        self.unique_identifiers = {"class": "sentencepiece", "sha256": info["sha256"]}  # dataset descriptions


def build_train_dataset(cfg: Config):
    """The training dataset of steps x global_batch samples of L+1 tokens."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    num_samples = cfg.train.steps * cfg.train.global_batch_size
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend_per_split=[_blend(cfg, "train"), None, None],
        tokenizer=_Tok(tokenizer_info(cfg)),
        reset_position_ids=cfg.data.reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=cfg.data.eod_mask_loss,
        create_attention_mask=False,  # the model builds its causal mask / ALiBi bias itself
        path_to_cache=None,  # indices are rebuilt in memory on every rank: no shared-FS race
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, config).build()
    return train


class BatchReader:
    """Global-batch slicing by step: `micro_batches(step)` is this data-parallel rank's share."""

    def __init__(self, dataset, cfg: Config, dp_rank: int, dp_size: int):
        self.dataset, self.cfg = dataset, cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        g, mb = self.cfg.train.global_batch_size, self.cfg.train.micro_batch_size
        per_rank = g // self.dp_size
        start = step * g + self.dp_rank * per_rank
        out = []
        for m in range(0, per_rank, mb):
            samples = [self.dataset[i] for i in range(start + m, start + m + mb)]
            out.append({
                "tokens": torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long(),  # [b, s]
                "labels": torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long(),  # [b, s]
                "loss_mask": torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float(),
                "position_ids": torch.stack([torch.as_tensor(s["position_ids"]) for s in samples]).long(),
            })
        return out


def validation_tokens(cfg: Config, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` tokens of the valid split of the first source, documents
    concatenated in order (each ends with eod), as one 1-D stream for nonoverlapping windows."""
    from data_prep.manifest import shard_prefixes
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    chunks, n = [], 0
    for prefix in shard_prefixes(cfg.data.sources[0].path, "valid"):
        ds = IndexedDataset(prefix)
        for i in range(len(ds)):
            doc = np.asarray(ds[i], dtype=np.int64)
            chunks.append(doc)
            n += doc.size
            if n >= max_tokens:
                return torch.from_numpy(np.concatenate(chunks)[:max_tokens])
    if not chunks:
        raise ValueError(f"{cfg.data.sources[0].path} has no valid split: preprocess with --valid-fraction > 0")
    return torch.from_numpy(np.concatenate(chunks))
