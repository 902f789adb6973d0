"""Train a SentencePiece BPE tokenizer for LM pretraining on a uniform sample of all inputs.

    python data_prep/train_tokenizer.py --input PATH [PATH ...] --vocab-size 50304 --output PREFIX

Sampling: every document gets a pseudo-random key (a hash of its text and the seed) and the
sample is the documents with the smallest keys that fit in `--sample-mb` (bottom-k sampling):
uniform over documents of *all* inputs, independent of input order, one streaming pass, memory
bounded by the sample budget whatever the corpus size. Training settings suit pretraining:
byte fallback (no <unk> on unseen bytes), digits split, identity normalization and kept
whitespace (decode(encode(text)) == text, code indentation survives), fixed special ids
unk=0, bos=1, eod=2 `<|endoftext|>`, pad=3 `<pad>`. PREFIX.json records settings and sample stats.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import time
from pathlib import Path

import sentencepiece as spm

from data_prep.progress import HelpFormatter
from data_prep.readers import ChunkReader, detect_format, expand_inputs

EOD_PIECE, PAD_PIECE = "<|endoftext|>", "<pad>"


def sample_documents(paths: list[Path], budget_bytes: int, seed: int = 0, text_key: str = "text"):
    """Bottom-k sample by hash key under a byte budget -> (docs sorted by key, stats)."""
    heap: list[tuple[int, bytes]] = []  # max-heap on key via negation
    held = seen_docs = seen_bytes = bad = 0
    salt = seed.to_bytes(8, "little")
    for path in paths:
        kind, comp = detect_format(path)
        for rec in ChunkReader(path, kind, comp, 0, None, text_key=text_key):
            if rec.data is None:
                bad += 1
                continue
            seen_docs += 1
            seen_bytes += len(rec.data)
            key = int.from_bytes(hashlib.blake2b(rec.data, digest_size=8, key=salt).digest(), "little")
            if held < budget_bytes or key < -heap[0][0]:
                heapq.heappush(heap, (-key, rec.data))
                held += len(rec.data)
                while held > budget_bytes and len(heap) > 1:
                    held -= len(heapq.heappop(heap)[1])
    docs = [d for _, d in sorted(heap, reverse=True)]
    stats = {"documents_seen": seen_docs, "bytes_seen": seen_bytes, "rejected_records": bad,
             "documents_sampled": len(docs), "bytes_sampled": held}
    return docs, stats


def _sentences(docs: list[bytes], max_len: int):
    """SentencePiece trains on 'sentences': feed lines, cut to max_len bytes."""
    for doc in docs:
        for line in doc.decode("utf-8").split("\n"):
            if line.strip():
                yield line[:max_len]


def train_tokenizer(inputs, vocab_size: int = 50304, output_prefix: str | Path = "tokenizer", *,
                    sample_mb: float = 1024.0, seed: int = 0, text_key: str = "text",
                    character_coverage: float = 0.9999, num_threads: int | None = None,
                    max_sentence_length: int = 8192) -> Path:
    """Train PREFIX.model (+ .vocab, .json) and return the .model path."""
    t0 = time.time()
    paths = expand_inputs(list(inputs))
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    docs, stats = sample_documents(paths, int(sample_mb * 1e6), seed, text_key)
    if not docs:
        raise ValueError(f"no usable document in {[str(p) for p in paths]}; check --text-key")
    settings = dict(
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        character_coverage=character_coverage, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_by_whitespace=True, max_sentence_length=max_sentence_length,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, eos_piece=EOD_PIECE, pad_piece=PAD_PIECE,
        hard_vocab_limit=True, seed_sentencepiece_size=1000000, shuffle_input_sentence=True,
        train_extremely_large_corpus=False, num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    spm.SentencePieceTrainer.train(sentence_iterator=_sentences(docs, max_sentence_length),
                                   model_prefix=str(prefix), **settings)
    model = prefix.with_name(prefix.name + ".model")
    info = {"model": str(model), "inputs": [str(p) for p in paths], "sample_mb": sample_mb,
            "seed": seed, "text_key": text_key, "sampling": "bottom-k by blake2b(text, seed) under a byte budget",
            "settings": settings, "sample": stats, "elapsed_s": round(time.time() - t0, 2)}
    prefix.with_name(prefix.name + ".json").write_text(json.dumps(info, indent=2) + "\n")
    return model


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="input files, directories or globs (any format "
                    "preprocess.py reads)")
    ap.add_argument("--vocab-size", type=int, default=50304, help="pieces in the model; a multiple of 128 is fastest")
    ap.add_argument("--output", required=True, help="PREFIX: writes PREFIX.model/.vocab/.json")
    ap.add_argument("--sample-mb", type=float, default=1024.0,
                    help="MB of documents sampled uniformly from all inputs to train on (bounds RAM)")
    ap.add_argument("--text-key", default="text", help="JSON key or Parquet column holding the text")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample's hash keys")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    model = train_tokenizer(args.input, args.vocab_size, args.output, sample_mb=args.sample_mb,
                            seed=args.seed, text_key=args.text_key)
    print(f"wrote {model} (vocab {args.vocab_size}); settings and sample stats in "
          f"{model.with_suffix('.json')}")


if __name__ == "__main__":
    main()
