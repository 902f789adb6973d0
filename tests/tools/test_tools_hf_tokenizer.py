"""The exported HF tokenizer gives the same ids as our SentencePiece model (and decodes alike)."""

import random

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from data_prep.train_tokenizer import train_tokenizer
from data_prep.hf_tokenizer import spm_to_hf_tokenizer

SAMPLES = [
    "Hello world", "  leading and   multiple   spaces  ", "digits 1234567890 and 3.14159 and 007",
    "unicode: café naïve 東京 Ωmega ß ﬁ ① ＡＢＣ", "tabs\tand\nnewlines\n\nend", "emoji 😀🚀 zwj 👩‍💻 (byte fallback)",
    "", " ", "x", "def f(x):\n        return x  # indented\n\n\n    \t  mixed", " " * 17 + "a" + " " * 33, "\n" * 9,
    "no-break\u00a0space thin\u2009space ideographic\u3000space", "<s> </s> <|endoftext|> <pad> <unk> as text",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    rng = random.Random(0)
    words = ("the attention linear bias extrapolation train short test long model token head slope position "
             "café naïve def return self import 12 345 6789").split()
    docs = []
    for _ in range(400):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(rng.randint(1, 4))]
        docs.append(("\n" + " " * rng.choice([0, 4, 8])).join(lines))
    path = tmp_path_factory.mktemp("tok") / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return train_tokenizer([path], 512, path.parent / "tok", sample_mb=1)


def test_hf_tokenizer_ids_equal_sentencepiece(sp_model, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    spm_to_hf_tokenizer(sp_model).save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)  # as a user loads it: no remote code
    assert hf.eos_token_id == sp.eos_id() and hf.pad_token_id == sp.pad_id()
    assert len(hf) == sp.get_piece_size()
    for text in SAMPLES:
        ids = sp.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids) == sp.decode(ids), text
    # byte fallback really happens in these samples (pieces <0xNN>), and identically
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode(SAMPLES[5]))
