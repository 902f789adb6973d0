"""The fast exact encoder: fastokens (a Rust BPE) loading the tokenizer.json that
data_prep/hf_tokenizer.py converts from the SentencePiece .model, checked against SentencePiece
before it is used, and never used where it could give different ids.

Why fastokens: on this project's tokenizers it gave SentencePiece's ids on every document of
~50 MB of prose and code at 8-15x SentencePiece's per-core rate; gigatoken was 6.5-7.8x and,
as shipped, turns the text `<s>` into the BOS id (docs/reference.md §10).

The fast path is used only when
  1. the model's settings are ones it is known to be exact for (`fast_unsupported`): a BPE model
     with byte fallback, identity normalization (no precompiled character map) and whitespace kept
     as written, which is what train_tokenizer.py writes; anything else uses SentencePiece;
  2. it gives SentencePiece's ids on fixed edge cases (control pieces written as text, alone too, literal
     U+2581, tabs, runs of spaces and newlines, CJK, emoji, byte-fallback characters, ...) and on
     a sample of the actual input (`check`, run by the coordinator before any chunk starts);
  3. and, in each chunk, on the documents whose split key is 0 mod SPOT_CHECK (about 0.1% of them;
     a difference redoes the chunk with SentencePiece, see worker.py).
Any failure is logged and the run falls back to SentencePiece: the output bytes are the same
whichever encoder runs; only the speed differs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from data_prep.files import fresh_tmp, tmp_name

FAST = "fastokens"
SPOT_CHECK = 1024  # a chunk re-checks the documents whose 64-bit split key is 0 mod this
SAMPLE_BYTES = 1 << 20  # input text checked at start-up (and used to estimate the token count)
SAMPLE_FILES = 64  # ... taken from the start of at most this many inputs, spread over the list
SPM_BPE = 2  # ModelProto.TrainerSpec.ModelType
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # ModelProto.SentencePiece.Type

EDGE_CASES = [
    "a <s> b </s> c <unk> <pad> <|endoftext|> written as text",
    "literal \u2581 U+2581 \u2581\u2581x \u2581",
    "tabs\tand\t\ttabs\t",
    "runs of   spaces      and\n\n\n\nnewlines\n",
    "  leading and trailing  ",
    " ",
    "\n",
    "x",
    "CJK 日本語の文章と中文的句子, 한국어",
    "emoji 😀🚀 zwj 👩\u200d💻 flags 🇫🇷",
    "byte fallback \x00\x01\x7f \U0001F9EA \u2603 \U00010348 \uFFFD ǅ ﬁ ①",
    "digits 1234567890 3.14159 0x7fff",
    "code:\n    def f(x):\n\treturn x  # comment\n\n",
    "line\r\nends\rmixed",
    "combining e\u0301 a\u030a, no-break\u00a0space",
]


def fast_version() -> str | None:
    """The installed fastokens version, or None."""
    if importlib.util.find_spec(FAST) is None:
        return None
    return importlib.metadata.version(FAST)


def fast_unsupported(model_path: str | Path) -> str | None:
    """Why the fast encoder may not be used for this model (None: it may, subject to the check)."""
    if fast_version() is None:
        return "fastokens is not installed (pip install fastokens)"
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    if ts.model_type != SPM_BPE:
        return f"the model is not BPE (SentencePiece model type {ts.model_type})"
    if ns.precompiled_charsmap:
        return f"the model normalizes text ({ns.name!r} character map); the fast path is known exact only for identity"
    if ns.remove_extra_whitespaces or not ns.escape_whitespaces or ts.treat_whitespace_as_suffix:
        return "the model rewrites whitespace (remove_extra_whitespaces, escape_whitespaces or " \
               "treat_whitespace_as_suffix differ from train_tokenizer.py's)"
    if not ts.byte_fallback:  # fastokens turned a document that is exactly `<s>` into the control id
        return "the model has no byte fallback (unknown characters become <unk>, where fastokens is not exact)"
    return None


def edge_cases(model_path: str | Path) -> list[str]:
    """EDGE_CASES plus every unknown, control and user-defined piece of the model written as text: all
    together, and each alone (a document that is exactly `<s>`)."""
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    pieces = [p.piece for p in proto.pieces if p.type in (UNKNOWN, CONTROL, USER_DEFINED)]
    return EDGE_CASES + [" ".join(pieces), "".join(pieces)] + pieces


def kept_tokenizer_json(model_path: str | Path, sha256: str) -> Path:
    """Where a model's converted tokenizer.json is kept: next to it, named by its checksum."""
    model = Path(model_path)
    return model.with_name(f"{model.stem}.{sha256[:12]}.tokenizer.json")


def prepare_tokenizer_json(model_path: str | Path, sha256: str, dest: Path) -> None:
    """Put the model's tokenizer.json at `dest`: a copy of the one kept next to the model, or
    converted by data_prep/hf_tokenizer.py (~1 CPU-s: importing transformers and deriving the
    merges; done in a child process, so the coordinator never imports transformers) and then
    kept there for the next run."""
    kept = kept_tokenizer_json(model_path, sha256)
    if kept.exists():
        shutil.copyfile(kept, fresh_tmp(dest))
        os.replace(tmp_name(dest), dest)
        return
    from data_prep.hf_tokenizer import write_tokenizer_json

    with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        pool.submit(write_tokenizer_json, str(model_path), dest).result()
    with contextlib.suppress(OSError):  # a read-only model directory: convert again next time
        shutil.copyfile(dest, fresh_tmp(kept))
        os.replace(tmp_name(kept), kept)


class FastEncoder:
    """fastokens on one thread (the pool's processes are the parallelism), with SentencePiece's
    conventions: no BOS/EOS added, control pieces written in the text encoded as text."""

    name = FAST

    def __init__(self, tokenizer_json: str | Path):
        # fastokens sizes its thread pool once per process, from this variable (default: all cores)
        os.environ["FASTOKENS_BPE_THREADS"] = "1"
        import fastokens

        self._tok = fastokens.Tokenizer.from_json_str(Path(tokenizer_json).read_text())

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """[len(texts)] uint32 arrays (views of one flat buffer: no Python int per token)."""
        ids, offsets = self._tok.encode_batch_flat(texts, split_special_tokens=True)
        ids = np.frombuffer(ids, np.uint32)  # [total tokens]
        offsets = np.frombuffer(offsets, np.uint64).astype(np.intp)  # [len(texts) + 1]
        return np.split(ids, offsets[1:-1])


def first_difference(texts: list[str], want: list[list[int]], got: list[np.ndarray]) -> str | None:
    """None when `got` (the fast encoder's ids) equals `want` (SentencePiece's) for every text;
    else the first difference, in words."""
    for text, w, g in zip(texts, want, got):
        g = g.tolist()
        if g != w:
            at = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            return f"text {text[:60]!r}: token {at} is {g[at:at + 1]}, SentencePiece's is {w[at:at + 1]}"
    return None


_CHECKED = None  # the encoder a forked check child runs


def _encode_in_child(texts: list[str]) -> list[np.ndarray]:
    return _CHECKED.encode_batch(texts)


def check(sp, fast, model_path: str | Path, texts: list[str], want: list[list[int]]) -> str | None:
    """The start-up check: the ids of `fast` (a loaded Tokenizer with the fast encoder) on the
    edge cases and on `texts` (a sample of the input, whose SentencePiece ids are `want`) against
    SentencePiece's. Returns None (the same) or what differed.

    The encoding runs in a forked child: the coordinator loads the fast encoder (so that the
    workers it forks share it) but never encodes with it, because its first encode starts a
    thread pool that forked workers would inherit without its threads."""
    global _CHECKED
    cases = edge_cases(model_path)
    _CHECKED = fast
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
            got = pool.submit(_encode_in_child, cases + texts).result()
    except Exception as e:  # noqa: BLE001 - any encode failure means: not this encoder
        return f"fastokens failed: {type(e).__name__}: {e}"
    finally:
        _CHECKED = None
    return first_difference(cases + texts, [sp.encode(c) for c in cases] + want, got)
