"""Training data through megatron-core's GPTDataset / BlendedMegatronDatasetBuilder over
data_prep/preprocess.py output directories, and the one reader of a split's token stream.

Each source's manifest is read once (`load_data`) and the resulting `TrainingData` is passed
on: preflight checks, the tokenizer record, the blend and validation all use it.

Deterministic by construction: sample i of the (blended) dataset is fixed by the seed, the
sources and L; step k reads global samples [k*G, (k+1)*G) (G = global batch), this
data-parallel rank the contiguous slice dp_rank*G/dp ... (dp_rank+1)*G/dp, cut into
micro-batches. The checkpoint stores `consumed_samples` (step * G), so a resumed run reads
exactly the samples an uninterrupted run would have; a run resumed with another G (allowed by
--allow-config-change) continues at the next unread sample rather than at step * G.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import load_manifest, shard_prefixes
from data_prep.tokenizer import DatasetTokenizer
from pretrain.config import Config, ConfigError

# megatron-core is imported where used: preflight and `train.py --dry-run` read manifests without it.


@dataclass(frozen=True)
class Source:
    """One preprocess output directory, its blend weight, and its manifest (read once)."""

    path: Path
    weight: float
    manifest: dict

    def prefixes(self, split: str) -> list[str]:
        """Absolute prefixes of the merged shards of `split` that hold documents."""
        return shard_prefixes(self.path, split, manifest=self.manifest)

    def shards(self, split: str) -> list[dict]:
        return [s for s in self.manifest.get("merged", []) if s["split"] == split and s["documents"] > 0]


@dataclass(frozen=True)
class TrainingData:
    sources: list[Source]

    @property
    def tokenizer(self) -> dict:
        """The tokenizer record of the data (path, sha256, vocab_size, eod, pad): all sources share it."""
        return self.sources[0].manifest["tokenizer"]


def load_data(cfg: Config) -> TrainingData:
    """Read every source's manifest once and check the data against the config: sources exist,
    their shard files are complete, they share one tokenizer, the model's vocab covers it, and
    there is at least one training sequence. Raises ConfigError listing every problem."""
    if not cfg.data.sources:
        raise ConfigError(["no training data: pass --data DIR (a data_prep/preprocess.py output directory) "
                           "or set data.sources in the config"])
    errors, sources = [], []
    for src in cfg.data.sources:
        root = Path(src.path).resolve()
        try:
            source = Source(root, src.weight, load_manifest(root))
        except (FileNotFoundError, ValueError) as e:
            errors.append(str(e))
            continue
        sources.append(source)
        tok = source.manifest["tokenizer"]
        if tok["vocab_size"] > cfg.model.vocab_size:
            errors.append(
                f"{root} was tokenized with a {tok['vocab_size']}-token vocabulary ({tok['path']}) but "
                f"model.vocab_size={cfg.model.vocab_size}: set model.vocab_size >= {tok['vocab_size']} "
                f"(a multiple of 128, e.g. {-(-tok['vocab_size'] // 128) * 128})"
            )
        train_tokens = source.manifest["splits"]["train"]["tokens"]
        if train_tokens <= cfg.model.seq_length:
            errors.append(f"{root} has {train_tokens} training tokens, fewer than one sequence of "
                          f"seq_length={cfg.model.seq_length}: use more data or a shorter L")
        errors += _shard_file_errors(source)
    if cfg.validation.interval and sources and \
            (valid := sources[0].manifest["splits"]["valid"]["tokens"]) <= cfg.model.seq_length:
        errors.append(f"{sources[0].path} has {valid} valid tokens, fewer than one validation window of "
                      f"seq_length+1={cfg.model.seq_length + 1}: preprocess into a new --output-dir with "
                      f"--valid-tokens {4 * (cfg.model.seq_length + 1)} (or a larger --valid-fraction), or set "
                      f"validation.interval=0")
    tokenizers = {str(s.path): s.manifest["tokenizer"] for s in sources}
    if len({(t["sha256"], t["eod"]) for t in tokenizers.values()}) > 1:
        listing = ", ".join(f"{d}: {t['path']} ({t['sha256'][:12]}, eod {t['eod']})" for d, t in tokenizers.items())
        errors.append(f"data sources use different tokenizers ({listing}): re-tokenize them with one tokenizer")
    if errors:
        raise ConfigError(errors)
    return TrainingData(sources)


def _shard_file_errors(source: Source) -> list[str]:
    """Merged shards the manifest lists but the directory lacks, or holds at another size (an
    interrupted copy, a partial rsync): megatron would fail on them mid-run, or read garbage."""
    for split in ("train", "valid"):
        for s in source.shards(split):
            bin_path = source.path / f"{s['prefix']}.bin"
            size = os.path.getsize(bin_path) if bin_path.is_file() else None
            if size != s["bin_bytes"] or not bin_path.with_suffix(".idx").is_file():
                found = "missing" if size is None else f"{size} bytes"
                return [f"{bin_path} is incomplete ({found}, manifest.json says {s['bin_bytes']} bytes, "
                        f"or its .idx is missing): copy the directory again or re-run preprocess"]
    return []


def _blend(data: TrainingData, split: str) -> tuple[list[str], list[float]] | None:
    """Shard prefixes of every source and their weights: the source weight spread over its
    shards in proportion to their tokens (so each source is sampled at its configured rate)."""
    prefixes, weights = [], []
    total_w = sum(s.weight for s in data.sources)
    for src in data.sources:
        shards = src.shards(split)
        tokens = sum(s["tokens"] for s in shards)
        prefixes += src.prefixes(split)
        weights += [src.weight / total_w * s["tokens"] / tokens for s in shards]
    return (prefixes, weights) if prefixes else None


def build_train_dataset(cfg: Config, data: TrainingData, origin: tuple[int, int] = (0, 0)):
    """The training dataset of samples of L+1 tokens: steps x global_batch of them, or enough to
    finish from `origin` = (step, consumed samples) of a checkpoint when the batch changed."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    g = cfg.train.global_batch_size
    num_samples = max(cfg.train.steps * g, origin[1] + (cfg.train.steps - origin[0]) * g)
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend_per_split=[_blend(data, "train"), None, None],
        tokenizer=DatasetTokenizer.of(data.tokenizer),
        reset_position_ids=cfg.data.reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=cfg.data.eod_mask_loss,
        create_attention_mask=False,  # the model builds its causal mask / ALiBi bias itself
        # "" (not None, which megatron reads as <prefix>/cache/ inside the data directory): the
        # indices are built in memory on every rank, nothing is written beside the shards, and no
        # cache keyed by path and settings (not contents) survives data regenerated in place
        path_to_cache="",
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, config).build()
    return train


class BatchReader:
    """Global-batch slicing by step: `micro_batches(step)` is this data-parallel rank's share.
    `origin` = (step, consumed samples) of the checkpoint resumed (the same as step * G unless the
    global batch changed)."""

    def __init__(self, dataset, cfg: Config, dp_rank: int, dp_size: int, origin: tuple[int, int] = (0, 0)):
        self.dataset, self.cfg = dataset, cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.origin = origin

    def sample_at(self, step: int) -> int:
        """The first global sample of step `step` (= samples consumed before it)."""
        return self.origin[1] + (step - self.origin[0]) * self.cfg.train.global_batch_size

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        g, mb = self.cfg.train.global_batch_size, self.cfg.train.micro_batch_size
        per_rank = g // self.dp_size
        start = self.sample_at(step) + self.dp_rank * per_rank
        out = []
        for m in range(0, per_rank, mb):
            samples = [self.dataset[i] for i in range(start + m, start + m + mb)]
            for i, s in enumerate(samples):
                _check_ids(s["tokens"], self.dataset, s, start + m + i)
                _check_ids(s["labels"], self.dataset, s, start + m + i)
            out.append({
                "tokens": torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long(),  # [b, s]
                "labels": torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long(),  # [b, s]
                "loss_mask": torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float(),
                "position_ids": torch.stack([torch.as_tensor(s["position_ids"]) for s in samples]).long(),
            })
        return out


def _check_ids(ids, dataset, sample: dict, index: int) -> None:
    """Token ids must be below the data's vocabulary: a shard changed in place at the same size
    (which the preflight size check cannot see) would else crash the embedding lookup, or train
    on wrong ids. Costs one max() per sample."""
    vocab = dataset.config.tokenizer.vocab_size
    if (top := int(ids.max())) >= vocab:
        part = dataset.datasets[sample["dataset_id"]] if "dataset_id" in sample else dataset  # blended or one prefix
        raise _damaged(part.dataset.path_prefix, top, vocab, f"sample {index}")


class DamagedShardError(ValueError):
    """A shard holds token ids past the vocabulary (train.py and the evaluation tool print it in one line)."""


def _damaged(prefix: str, top: int, vocab: int, where: str) -> DamagedShardError:
    return DamagedShardError(f"{prefix}.bin holds token id {top} ({where}), but the data's vocabulary has {vocab} ids: "
                             f"the shard is damaged. Run the same preprocess command on its directory again (it checks "
                             f"each merged shard's sha256 and redoes damaged ones), or copy the data again")


def split_tokens(data_dir: str | Path, split: str = "valid", max_tokens: int | None = None,
                 manifest: dict | None = None) -> torch.Tensor:
    """The documents of `split` ('train', 'valid' or 'all' = train then valid) of a preprocess
    output directory, concatenated in order (each ends with its eod token), as one int64 stream
    [N] for perplexity windows; only its first `max_tokens` when given (read no further).
    Training validation and tools/eval_extrapolation.py both read evaluation tokens here."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    manifest = manifest if manifest is not None else load_manifest(data_dir)
    splits = ("train", "valid") if split == "all" else (split,)
    chunks, n = [], 0
    for prefix in [p for s in splits for p in shard_prefixes(data_dir, s, manifest=manifest)]:
        ds = IndexedDataset(prefix, mmap=True)
        for i in range(len(ds)):
            chunks.append(np.asarray(ds[i], dtype=np.int64))
            if chunks[-1].size and (top := int(chunks[-1].max())) >= manifest["tokenizer"]["vocab_size"]:
                raise _damaged(prefix, top, manifest["tokenizer"]["vocab_size"], f"document {i}")
            n += chunks[-1].size
            if max_tokens is not None and n >= max_tokens:
                return torch.from_numpy(np.concatenate(chunks)[:max_tokens])
    if not chunks:
        raise ValueError(f"{data_dir} has no {split!r} documents: preprocess with --valid-fraction > 0 for a "
                         "valid split, or evaluate another split (--split all)")
    return torch.from_numpy(np.concatenate(chunks))
