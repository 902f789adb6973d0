"""The tokenizer of a data-prep run, SentencePiece or Hugging Face, behind one interface: the
only module that knows which kind a tokenizer is.

Two kinds are accepted wherever a tokenizer is:
  * `sentencepiece`: a `.model` file (data_prep/train_tokenizer.py writes one);
  * `hf`: a Hugging Face `tokenizer.json` (the `tokenizers` library's format: GPT-2's byte-level
    BPE, Llama, NeoX, WordPiece, Unigram, ...), or a folder holding one.
Each gives the same attributes: `kind`, `sha256` (of the .model or the tokenizer.json file: the
manifest records it so that shards are never mixed across tokenizers, and training, export and
evaluation check it), `vocab_size`, `eod`, `pad`, `encode`/`encode_batch`, `decode`, and
`to_hf()` / `save_hf()` (the same tokenizer for an HF export). GPTDatasetConfig reads `.eod`,
`.pad`, `.vocab_size` and `.unique_identifiers`: of a `Tokenizer`, or of a `DatasetTokenizer`
built from the record a manifest keeps (training reads no tokenizer file).

Encoding: no BOS/EOS or template tokens are added (the preprocessor appends eod per document),
and special tokens written in the text are encoded as text (SentencePiece's own rule; for a
tokenizer.json, the `tokenizers` setting `encode_special_tokens`, = transformers'
`split_special_tokens=True`), so a document quoting `<|endoftext|>` does not end there.
SentencePiece runs in C++, or with encoder="fastokens" the fast exact encoder
(data_prep/encoders.py: the same ids, checked before it is used); a tokenizer.json runs in the
`tokenizers` library's batch encode (Rust), one thread per process (the workers are the
parallelism).

eod: SentencePiece's eos id (train_tokenizer.py: unk=0, bos=1, eod=2 `<|endoftext|>`, pad=3
`<pad>`); a tokenizer.json's end-of-text token: the `eos_token` of a tokenizer_config.json beside
it, else the first of EOD_NAMES it has. `eod_token` (preprocess --eod-token) names another; a
tokenizer without one is refused with that fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

from data_prep.encoders import FAST, FastEncoder

SENTENCEPIECE, HF = "sentencepiece", "hf"  # kinds
HF_ENCODER = "tokenizers"
EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
PAD_NAMES = ("<pad>", "[PAD]", "<|padding|>", "<|pad|>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be used; the message says what to pass instead."""


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_file(path: str | Path) -> Path:
    """The file a --tokenizer argument names: the path itself, or a folder's tokenizer.json."""
    p = Path(path).resolve()
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer folder {p} holds no tokenizer.json: pass a SentencePiece .model, a "
                                    "Hugging Face tokenizer.json, or a folder holding one")
        return p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"tokenizer {p} does not exist; train one with `python data_prep/train_tokenizer.py --input ... "
            f"--output PREFIX` and pass PREFIX.model, or pass a Hugging Face tokenizer.json (or its folder)")
    return p


def tokenizer_kind(path: str | Path) -> str:
    """`hf` for a tokenizer.json (any *.json), else `sentencepiece`."""
    return HF if Path(path).suffix == ".json" else SENTENCEPIECE


def _config_token(tokenizer_json: Path, key: str) -> str | None:
    """A token named in the tokenizer_config.json beside a tokenizer.json (a string or {content})."""
    cfg = tokenizer_json.with_name("tokenizer_config.json")
    try:
        value = json.loads(cfg.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


@dataclass(frozen=True)
class DatasetTokenizer:
    """What megatron-core's GPTDataset reads of a tokenizer (`eod`, `pad`, `vocab_size`,
    `unique_identifiers`), from a tokenizer record (`Tokenizer.record`, as a manifest and the
    checkpoints keep it): training needs no tokenizer file on the compute nodes."""

    eod: int
    pad: int
    vocab_size: int
    kind: str
    sha256: str

    @classmethod
    def of(cls, record: dict) -> DatasetTokenizer:
        """From a record; manifests written before tokenizer.json support have no kind or pad."""
        return cls(eod=record["eod"], pad=record.get("pad", -1), vocab_size=record["vocab_size"],
                   kind=record.get("kind", SENTENCEPIECE), sha256=record["sha256"])

    @property
    def unique_identifiers(self) -> dict:
        """megatron-core JSON-dumps this into each dataset's description (a cache key; nothing is cached here)."""
        return {"class": "data_prep.tokenizer.Tokenizer", "kind": self.kind, "sha256": self.sha256,
                "vocab_size": self.vocab_size}


class Tokenizer:
    """`encode`, `decode`, `kind`, `sha256` and the special ids (`eod`, `pad`) of a SentencePiece
    model or a Hugging Face tokenizer.json."""

    def __init__(self, model_path: str | Path, encoder: str = "sentencepiece",
                 tokenizer_json: str | Path | None = None, eod_token: str | None = None):
        self.model_path = tokenizer_file(model_path)
        self.kind = tokenizer_kind(self.model_path)
        self.sha256 = file_sha256(self.model_path)
        self.eod_token = eod_token
        self.tokenizer_json = tokenizer_json
        self.sp = self._hf = self._fast = None
        if self.kind == HF:
            self._load_hf(eod_token)
            self.encoder = HF_ENCODER
            return
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load tokenizer {self.model_path}: {e}; pass a SentencePiece .model "
                                 "(data_prep/train_tokenizer.py) or a Hugging Face tokenizer.json") from e
        self.vocab_size: int = self.sp.get_piece_size()
        self.eod: int = self.sp.eos_id() if eod_token is None else self._id(eod_token)
        self.pad: int = self.sp.pad_id()
        self.bos: int = self.sp.bos_id()
        if self.eod < 0:
            raise TokenizerError(f"tokenizer {self.model_path} has no end-of-document (eos) id; retrain it with "
                                 "data_prep/train_tokenizer.py, or pass --eod-token NAME naming one of its pieces")
        if encoder == FAST:
            assert tokenizer_json is not None, "the fast encoder loads the tokenizer.json written at start-up"
            self._fast = FastEncoder(tokenizer_json)
        self.encoder = encoder if self._fast else "sentencepiece"

    def _load_hf(self, eod_token: str | None) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the pool's workers are the parallelism
        try:
            self._hf = HFTokenizer.from_file(str(self.model_path))
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on a malformed file
            raise TokenizerError(f"cannot load {self.model_path} as a Hugging Face tokenizer.json ({e}); pass a "
                                 "tokenizer.json saved by the `tokenizers` library or transformers") from e
        self._hf.encode_special_tokens = True  # special tokens written in the text are text
        vocab = self._hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        specials = [t.content for t in self._hf.get_added_tokens_decoder().values() if t.special]
        name = eod_token or _config_token(self.model_path, "eos_token") or next(
            (n for n in EOD_NAMES if n in vocab), None)
        if name is None:
            raise TokenizerError(
                f"tokenizer {self.model_path} has no end-of-text token (none of {', '.join(EOD_NAMES)}, no "
                f"eos_token in a tokenizer_config.json beside it): pass --eod-token NAME, one of its special tokens "
                f"({', '.join(specials[:8]) or 'it has none'})")
        self.eod, self.eod_token, self.bos = self._id(name), name, -1  # no BOS: documents end with eod only
        pad = _config_token(self.model_path, "pad_token") or next((n for n in PAD_NAMES if n in vocab), None)
        self.pad = vocab.get(pad, -1) if pad != name else -1  # a pad that is eod would mask eod out of the loss

    def _id(self, token: str) -> int:
        """The id of the end-of-text token named by --eod-token or a tokenizer_config.json, refused
        when the tokenizer does not have it."""
        i = self._hf.token_to_id(token) if self._hf is not None else self.sp.piece_to_id(token)
        if i is None or (self.sp is not None and i == self.sp.unk_id() and token != self.sp.id_to_piece(i)):
            raise TokenizerError(f"end-of-text token {token!r} is not a token of {self.model_path}: pass --eod-token "
                                 "NAME naming one of its tokens (e.g. <|endoftext|> or </s>)")
        return i

    @property
    def encoders(self) -> tuple[str, ...]:
        """The encoders that can run this tokenizer, the reference (exact by definition) first."""
        return (HF_ENCODER,) if self.kind == HF else ("sentencepiece", FAST)

    @property
    def record(self) -> dict:
        """What the manifest (and from it the checkpoints) record of the tokenizer."""
        return {"path": str(self.model_path), "kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eod": self.eod, "eod_token": self.id_to_token(self.eod), "pad": self.pad}

    @property
    def fingerprint(self) -> dict:
        """The tokenizer's part of a preprocess plan (a resume must match it). An eod chosen outside
        the file (--eod-token, tokenizer_config.json) is part of it."""
        out = {"tokenizer": str(self.model_path), "tokenizer_sha256": self.sha256}
        if self.kind == SENTENCEPIECE and self.eod == self.sp.eos_id():
            return out  # as before tokenizer.json support: plans of earlier runs still resume
        return dict(out, tokenizer_kind=self.kind, tokenizer_eod=self.eod)

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core's datasets record of the tokenizer (`DatasetTokenizer`)."""
        return DatasetTokenizer.of(self.record).unique_identifiers

    # megatron-core's MegatronTokenizer calls these `eos`; some of its code reads either name.
    @property
    def eos(self) -> int:
        return self.eod

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with the reference encoder, without bos/eod (the preprocessor appends eod)."""
        return self.reference_encode([text])[0]

    def reference_encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of many texts with the reference encoder (SentencePiece's, or the `tokenizers` library's)."""
        if self._hf is not None:
            return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]
        return self.sp.encode(texts)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Ids of many texts in one native call (SentencePiece's C++, the fast encoder's or the
        `tokenizers` library's Rust); integer arrays."""
        if self._fast is not None:
            return self._fast.encode_batch(texts)
        if self._hf is not None:
            encodings = self._hf.encode_batch_fast(texts, add_special_tokens=False)
            return [np.array(e.ids, dtype=np.int64) for e in encodings]
        return self.sp.encode(texts, out_type="numpy", num_threads=num_threads)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._hf.decode(ids, skip_special_tokens=False) if self._hf is not None else self.sp.decode(ids)

    def id_to_token(self, i: int) -> str | None:
        if i < 0:
            return None
        return self._hf.id_to_token(i) if self._hf is not None else self.sp.id_to_piece(i)

    def to_hf(self):
        """The same tokenizer as a transformers `PreTrainedTokenizerFast` (same ids, eos = eod)."""
        if self.kind == SENTENCEPIECE:
            from data_prep.hf_tokenizer import spm_to_hf_tokenizer

            return spm_to_hf_tokenizer(self.model_path)
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(self.model_path), eos_token=self.id_to_token(self.eod),
                                       pad_token=self.id_to_token(self.pad), clean_up_tokenization_spaces=False,
                                       split_special_tokens=True)  # as encoded here: special tokens in text are text

    def save_hf(self, hf_tokenizer, output: str | Path) -> None:
        """Write `hf_tokenizer` (from `to_hf`) into an HF model directory; a tokenizer.json is
        copied byte for byte, so the export's tokenizer.json has the run's sha256."""
        hf_tokenizer.save_pretrained(output)
        if self.kind == HF:
            shutil.copyfile(self.model_path, Path(output) / "tokenizer.json")

    def tokenize(self, text: str) -> list[int]:  # megatron-core naming
        return self.encode(text)

    def detokenize(self, ids) -> str:  # megatron-core naming
        return self.decode(ids)

    def __len__(self) -> int:
        return self.vocab_size

    def __getstate__(self):
        return {"model_path": str(self.model_path), "encoder": self.encoder, "tokenizer_json": self.tokenizer_json,
                "eod_token": self.eod_token}

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.model_path)!r}, kind={self.kind}, vocab_size={self.vocab_size}, eod={self.eod}, "
                f"encoder={self.encoder})")
