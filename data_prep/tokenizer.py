"""A SentencePiece model with the attributes megatron-core's GPTDataset and our tools need.

GPTDatasetConfig reads `.eod`, `.pad`, `.vocab_size` and `.unique_identifiers` of its tokenizer; the HF converter
reads `.sp` / `.model_path`; the manifest records `.sha256` so that shards are never mixed
across tokenizers. `encode_batch` runs SentencePiece, or with encoder="fastokens" the fast
exact encoder (data_prep/encoders.py: the same ids, checked before it is used). The special ids come from the model itself (see train_tokenizer.py:
unk=0, bos=1, eod=2 `<|endoftext|>`, pad=3 `<pad>`), so any SentencePiece model with an
eos and a pad id works.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_prep.encoders import FAST, FastEncoder


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """SentencePiece wrapper: `encode`, `decode`, and the special ids (`eod`, `pad`, `bos`)."""

    def __init__(self, model_path: str | Path, encoder: str = "sentencepiece",
                 tokenizer_json: str | Path | None = None):
        self.model_path = Path(model_path).resolve()
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {self.model_path} does not exist; train one with "
                f"`python data_prep/train_tokenizer.py --input ... --output PREFIX` or pass PREFIX.model")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.sha256 = file_sha256(self.model_path)
        self.vocab_size: int = self.sp.get_piece_size()
        self.eod: int = self.sp.eos_id()
        self.pad: int = self.sp.pad_id()
        self.bos: int = self.sp.bos_id()
        self.unk: int = self.sp.unk_id()
        if self.eod < 0:
            raise ValueError(f"tokenizer {self.model_path} has no end-of-document (eos) id; "
                             "retrain it with data_prep/train_tokenizer.py")
        self.tokenizer_json = tokenizer_json
        self._fast = None
        if encoder == FAST:
            assert tokenizer_json is not None, "the fast encoder loads the tokenizer.json written at start-up"
            self._fast = FastEncoder(tokenizer_json)
        self.encoder = encoder if self._fast else "sentencepiece"

    @property
    def unique_identifiers(self) -> dict:
        """megatron-core JSON-dumps this into each dataset's cache key (MegatronDataset)."""
        return {"class": "data_prep.tokenizer.Tokenizer", "sha256": self.sha256, "vocab_size": self.vocab_size}

    # megatron-core's MegatronTokenizer calls these `eos`; some of its code reads either name.
    @property
    def eos(self) -> int:
        return self.eod

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eod (the preprocessor appends eod per document)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Ids of many texts in one native call (SentencePiece's C++ or the fast encoder's Rust);
        integer arrays, no Python int per token."""
        if self._fast is not None:
            return self._fast.encode_batch(texts)
        return self.sp.encode(texts, out_type="numpy", num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def tokenize(self, text: str) -> list[int]:  # megatron-core naming
        return self.encode(text)

    def detokenize(self, ids) -> str:  # megatron-core naming
        return self.decode(ids)

    def __len__(self) -> int:
        return self.vocab_size

    def __getstate__(self):
        return {"model_path": str(self.model_path), "encoder": self.encoder, "tokenizer_json": self.tokenizer_json}

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, eod={self.eod}, "
                f"encoder={self.encoder})")
