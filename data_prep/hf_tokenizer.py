"""Our SentencePiece model as a Hugging Face fast tokenizer that gives the same ids.

Built with the `tokenizers` library from the .model protobuf, following the trainer's own
normalizer settings (precompiled NFKC map, whitespace collapsing, dummy prefix) so that it
holds for any SentencePiece model, BPE or unigram, with or without byte fallback:
- BPE: vocab in id order and merges derived from it (SentencePiece merges the pair whose piece
  scores highest; for BPE the score order is the id order, so merge rank = piece id);
- byte fallback: characters outside the vocab become `<0xNN>` pieces in both;
- control pieces (<s>, </s>, ...) are special tokens; user-defined pieces are added tokens.
No BOS/EOS is added when encoding, and control pieces written in the text are encoded as text,
like `SentencePieceProcessor.encode`. (Decoding differs only for <unk>: SentencePiece writes ' ⁇ '.)
`write_tokenizer_json` writes its `tokenizer.json`, which data prep's fast encoder loads.
"""

from __future__ import annotations

from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
from tokenizers.models import BPE, Unigram
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from data_prep.files import write_atomic

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.Type
UNIGRAM, SPM_BPE = 1, 2


def spm_to_hf_tokenizer(model_file: str | Path) -> PreTrainedTokenizerFast:
    """Convert a SentencePiece `.model` file into an equivalent `PreTrainedTokenizerFast`."""
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    if ts.model_type == SPM_BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        skip = {p.piece for p in pieces if p.type != NORMAL}
        model = BPE(vocab, generate_merges(vocab, skip_tokens=skip), unk_token=ts.unk_piece, fuse_unk=True,
                    byte_fallback=ts.byte_fallback)
    elif ts.model_type == UNIGRAM:
        model = Unigram([(p.piece, p.score) for p in pieces], unk_id=ts.unk_id, byte_fallback=ts.byte_fallback)
    else:
        raise ValueError(f"{model_file}: SentencePiece model type {ts.model_type} is neither BPE nor unigram")
    tok = Tokenizer(model)

    # SentencePiece normalization order: char map, whitespace collapsing, dummy prefix, space -> U+2581.
    steps = []
    if ns.precompiled_charsmap:
        steps.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if ns.add_dummy_prefix else [])
    )
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=False) for p in pieces if p.type == USER_DEFINED])
    tok.add_special_tokens([AddedToken(p.piece, normalized=False, special=True) for p in pieces if p.type == CONTROL])

    def piece(i: int) -> str | None:
        return pieces[i].piece if 0 <= i < len(pieces) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=piece(ts.unk_id), bos_token=piece(ts.bos_id),
        eos_token=piece(ts.eos_id), pad_token=piece(ts.pad_id), clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # like SentencePiece, "<s>" in text is text, not the BOS id
    )


def write_tokenizer_json(model_file: str | Path, path: str | Path) -> None:
    """Write the converted tokenizer's `tokenizer.json` (what data_prep/encoders.py's fast encoder
    loads) to `path`, atomically."""
    write_atomic(path, spm_to_hf_tokenizer(model_file).backend_tokenizer.to_str())
