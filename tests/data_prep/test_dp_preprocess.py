"""End to end: the default corpus -> shards, read back with megatron-core, against a direct
SentencePiece encode of every document; determinism across worker counts and launchers."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest

from data_prep.manifest import load_manifest, shard_prefixes
from data_prep.preprocess import preprocess
from data_prep.tokenizer import Tokenizer

from .conftest import is_valid, reference_docs, reference_tokens, shard_bytes

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

VALID = 0.1
CHUNK_MB = 0.05  # ~52 KB: several chunks per input, the .zst one included


def read_split(out_dir, split, merged=True) -> list[list[int]]:
    docs = []
    for prefix in shard_prefixes(out_dir, split, merged=merged):
        ds = IndexedDataset(prefix)
        assert ds.index.dtype == np.uint16  # vocab 2048 fits
        docs.extend(ds[i].tolist() for i in range(len(ds)))
    return docs


@pytest.fixture(scope="module")
def run1(corpus, tokenizer_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    m = preprocess(corpus, tokenizer_model, out, workers=1, valid_fraction=VALID, chunk_mb=CHUNK_MB,
                   keep_chunk_shards=True, quiet=True)
    return out, m


def test_tokens_equal_direct_encode_plus_eod(corpus, tokenizer_model, run1):
    out, m = run1
    tok = Tokenizer(tokenizer_model)
    want = {"train": [], "valid": []}
    for path in corpus:
        docs = reference_docs(path)
        for d, ids in zip(docs, reference_tokens(tokenizer_model, docs, tok.eod)):
            want["valid" if is_valid(d, VALID) else "train"].append(ids)
    for split in ("train", "valid"):
        got = read_split(out, split)
        assert read_split(out, split, merged=False) == got
        assert len(shard_prefixes(out, split)) == 1 < len(shard_prefixes(out, split, merged=False))
        assert len(got) == len(want[split]) > 0
        assert got == want[split]
        assert m["splits"][split]["documents"] == len(got)
        assert m["splits"][split]["tokens"] == sum(map(len, got))
    assert m["rejected"] == {}
    assert len(m["shards"]) > 12  # really chunked
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["settings"]["dtype"] == "uint16"
    for inp in m["inputs"]:
        assert inp["checksum"].startswith("sha256") and inp["documents"] > 0


def test_gpt_dataset_reads_the_shards(run1, tokenizer_model):
    """megatron-core's own GPTDataset over our shards: every whole document inside a sample is
    one of ours, and the samples stitch documents together with eod."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    out, _ = run1
    tok = Tokenizer(tokenizer_model)
    train = shard_prefixes(out, "train")
    valid = shard_prefixes(out, "valid")
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=1024, blend_per_split=[(train, None), (valid, None), None],
                           tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, path_to_cache=None, mid_level_dataset_surplus=0.005)
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(GPTDataset, [50, 10, None], lambda: True, cfg).build()
    docs = {tuple(d) for d in read_split(out, "train")}
    whole = 0
    for i in range(len(train_ds)):
        tokens = train_ds[i]["tokens"].tolist()  # [seq_len]
        cuts = [j for j, t in enumerate(tokens) if t == tok.eod]
        for a, b in zip(cuts, cuts[1:]):  # a whole document between two eods
            assert tuple(tokens[a + 1:b + 1]) in docs
            whole += 1
        if cuts:  # the sample starts with the tail of a document
            head = tuple(tokens[:cuts[0] + 1])
            assert any(d[-len(head):] == head for d in docs)
    assert whole > 0 and len(valid_ds) > 0


def test_workers_1_vs_2_byte_identical(corpus, tokenizer_model, run1, tmp_path):
    out1, m1 = run1
    m2 = preprocess(corpus, tokenizer_model, tmp_path, workers=2, valid_fraction=VALID, chunk_mb=CHUNK_MB,
                    keep_chunk_shards=True, quiet=True)
    assert shard_bytes(tmp_path) == shard_bytes(out1)
    strip = lambda m: {k: v for k, v in m.items() if k not in ("run", "output_dir")}  # noqa: E731
    assert strip(m2) == strip(m1)


@pytest.mark.slow
def test_submitit_local_launcher_byte_identical(corpus, tokenizer_model, run1, tmp_path):
    out1, m1 = run1
    m = preprocess(corpus, tokenizer_model, tmp_path, workers=1, tasks=2, launcher="submitit-local",
                   valid_fraction=VALID, chunk_mb=CHUNK_MB, keep_chunk_shards=True, quiet=True)
    assert (tmp_path / ".work" / "submitit").is_dir()
    assert shard_bytes(tmp_path) == shard_bytes(out1)
    assert m["splits"] == m1["splits"]


def test_rerun_is_a_no_op_and_manifest_loads(corpus, tokenizer_model, run1):
    out, m1 = run1
    before = shard_bytes(out)
    m = preprocess(corpus, tokenizer_model, out, workers=1, valid_fraction=VALID, chunk_mb=CHUNK_MB,
                   keep_chunk_shards=True, quiet=True)
    assert m["run"]["chunks_resumed"] == m["run"]["chunks"] and m["run"]["bytes"] == 0
    assert shard_bytes(out) == before and load_manifest(out)["splits"] == m1["splits"]


def test_chunk_shards_are_removed_once_merged_and_no_bin_is_empty(corpus, tokenizer_model, run1, tmp_path):
    out1, m1 = run1  # --keep-chunk-shards
    m = preprocess(corpus, tokenizer_model, tmp_path, workers=2, valid_fraction=VALID, chunk_mb=CHUNK_MB, quiet=True)
    assert not list((tmp_path / "shards").iterdir()) and m["chunk_shards_removed"] and not m1["chunk_shards_removed"]
    assert shard_bytes(tmp_path) == {k: v for k, v in shard_bytes(out1).items() if k.startswith("merged/")}
    with pytest.raises(FileNotFoundError, match="--keep-chunk-shards"):
        shard_prefixes(tmp_path, "train", merged=False)
    m2 = preprocess(corpus, tokenizer_model, tmp_path, workers=1, valid_fraction=VALID, chunk_mb=CHUNK_MB, quiet=True)
    assert m2["run"]["chunks_resumed"] == m2["run"]["chunks"] and m2["merged"] == m["merged"]  # nothing redone
    # megatron-core cannot open an empty .bin: a chunk without valid documents has no valid shard
    bins = [*out1.glob("*/*.bin"), *tmp_path.glob("*/*.bin")]
    assert bins and all(p.stat().st_size > 0 for p in bins)
    assert sum(s["documents"] == 0 for s in m1["shards"]) > 0


def test_valid_tokens_sizes_the_split_and_a_small_split_is_warned_about(corpus, tokenizer_model, tmp_path, caplog):
    m = preprocess(corpus, tokenizer_model, tmp_path / "a", workers=1, valid_tokens=40_000, eval_length=1024,
                   quiet=True)
    total = m["splits"]["train"]["tokens"] + m["splits"]["valid"]["tokens"]
    assert 20_000 < m["splits"]["valid"]["tokens"] < 80_000 and m["warnings"] == []
    assert m["settings"]["valid_tokens"] == 40_000 and 0.5 < m["settings"]["valid_fraction"] * total / 40_000 < 2
    # the fraction that puts exactly one document (the one of smallest split key) into valid
    keys = sorted(int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
                  for p in corpus for t in reference_docs(p))
    m = preprocess(corpus, tokenizer_model, tmp_path / "b", workers=1, valid_fraction=(keys[0] + keys[1]) / 2 ** 65,
                   eval_length=2048, quiet=True)
    valid = m["splits"]["valid"]["tokens"]
    assert m["splits"]["valid"]["documents"] == 1
    assert valid < 4 * 2048 and len(m["warnings"]) == 1
    assert f"the valid split has {valid:,} tokens" in m["warnings"][0] and "--valid-tokens 16384" in m["warnings"][0]
    assert m["warnings"][0] in caplog.text  # logged at the end of the run
