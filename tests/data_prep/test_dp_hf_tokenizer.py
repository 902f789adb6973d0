"""A Hugging Face tokenizer.json as --tokenizer: the shards hold, document by document, exactly the
ids a direct `tokenizers` encode gives (and transformers' fast tokenizer with
split_special_tokens), whatever the worker count; eod is the tokenizer's end-of-text token, a
literal `<|endoftext|>` in a document stays text; bad input is counted, resume works, the
manifest records the kind and hash; a tokenizer without an end-of-text token is refused with
the fix (--eod-token), and another kind (WordPiece, from a folder) works the same way."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from transformers import PreTrainedTokenizerFast

from data_prep.pipeline import RefusedError
from data_prep.preprocess import main, preprocess
from data_prep.tokenizer import file_sha256

from .conftest import is_valid, reference_docs, shard_bytes
from .test_dp_preprocess import read_split

EOT = "<|endoftext|>"
EDGE_DOCS = [
    f"a document quoting {EOT} in its text, and {EOT}{EOT} twice, then more text",
    EOT,
    "emoji 😀 🚀 👩\u200d💻 🇫🇷 and math 𝔘𝔫𝔦 and CJK 日本語の文章",
    "a replacement character \ufffd where a decoder met invalid UTF-8: caf\ufffd",
    "a long run of spaces" + " " * 3000 + "then tabs" + "\t" * 500 + "then newlines" + "\n" * 400 + "end",
    "    def f(x):\n\t\treturn {'a': [1, 2, 3]}  # code\n",
    " leading and trailing whitespace  ",
]
BAD = b"good text\n\nbad \xff\xfe bytes are not UTF-8\n\nmore good text\n"


@pytest.fixture(scope="module")
def inputs(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_inputs")
    (d / "edge.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in EDGE_DOCS))
    (d / "bad.txt").write_bytes(BAD)
    return [*corpus, d / "edge.jsonl", d / "bad.txt"]


def direct(tokenizer_json, docs: list[str], eod: int) -> list[list[int]]:
    """The reference: the `tokenizers` library itself, special tokens in the text encoded as text."""
    tok = HFTokenizer.from_file(str(tokenizer_json))
    tok.encode_special_tokens = True
    return [e.ids + [eod] for e in tok.encode_batch(docs, add_special_tokens=False)]


@pytest.fixture(scope="module")
def bpe_runs(inputs, bpe_tokenizer_json, tmp_path_factory):
    outs = {}
    for workers in (1, 2):
        out = tmp_path_factory.mktemp(f"bpe_w{workers}")
        outs[workers] = out, preprocess(inputs, bpe_tokenizer_json, out, workers=workers, valid_fraction=0.1,
                                        chunk_mb=0.1, quiet=True)
    return outs


def test_bpe_shards_equal_a_direct_tokenizers_encode(inputs, bpe_tokenizer_json, bpe_runs):
    docs = [d for p in inputs for d in reference_docs(p)]
    assert all(d in docs for d in EDGE_DOCS) and len(docs) > 100
    eod = HFTokenizer.from_file(str(bpe_tokenizer_json)).token_to_id(EOT)
    want = direct(bpe_tokenizer_json, docs, eod)
    out, m = bpe_runs[1]
    assert m["run"]["chunks"] > 3 and m["encoder"]["used"] == "tokenizers"
    assert m["encoder"]["chunks"] == {"tokenizers": m["run"]["chunks"]}
    for split, valid in (("train", False), ("valid", True)):
        got = read_split(out, split)
        assert got == [w for d, w in zip(docs, want) if is_valid(d, 0.1) == valid] and got
    assert m["tokenizer"] == {"path": str(bpe_tokenizer_json.resolve()), "kind": "hf",
                              "sha256": file_sha256(bpe_tokenizer_json), "vocab_size": 1000, "eod": eod,
                              "eod_token": EOT, "pad": -1}
    assert m["rejected"]["invalid_utf8"]["count"] == 1
    # the same bytes whatever the worker count
    assert shard_bytes(bpe_runs[2][0]) == shard_bytes(out)


def test_literal_end_of_text_stays_text_as_in_transformers(bpe_tokenizer_json, bpe_runs):
    eod = HFTokenizer.from_file(str(bpe_tokenizer_json)).token_to_id(EOT)
    out, _ = bpe_runs[1]
    docs = read_split(out, "train") + read_split(out, "valid")
    assert all(d[-1] == eod and eod not in d[:-1] for d in docs)  # one eod per document, at its end
    hf = PreTrainedTokenizerFast(tokenizer_file=str(bpe_tokenizer_json), split_special_tokens=True)
    for text in EDGE_DOCS:  # an independent second reference: transformers' fast tokenizer
        ids = hf(text, add_special_tokens=False).input_ids
        assert ids + [eod] in docs and hf.decode(ids) == text  # byte-level BPE: exact round trip
    # without encode_special_tokens the library would have ended the document at the quoted token
    plain = HFTokenizer.from_file(str(bpe_tokenizer_json))
    assert eod in plain.encode(EDGE_DOCS[1], add_special_tokens=False).ids


def test_resume_and_plan_checks(inputs, bpe_tokenizer_json, bpe_runs, tmp_path):
    out, m = bpe_runs[1]
    again = preprocess(inputs, bpe_tokenizer_json.parent, out, workers=2, valid_fraction=0.1, chunk_mb=0.1,
                       quiet=True)  # the folder names the same tokenizer.json: everything resumes
    assert again["run"]["chunks_resumed"] == again["run"]["chunks"] and again["merged"] == m["merged"]
    with pytest.raises(RefusedError, match="different tokenizer_eod"):
        preprocess(inputs, bpe_tokenizer_json, out, eod_token="Ġ", valid_fraction=0.1, chunk_mb=0.1, quiet=True)
    with pytest.raises(RefusedError, match="--encoder sentencepiece cannot encode with hf tokenizer"):
        preprocess(inputs, bpe_tokenizer_json, tmp_path, encoder="sentencepiece", quiet=True)


def test_wordpiece_folder_needs_an_eod_token(corpus, wordpiece_tokenizer_dir, tmp_path, capsys):
    args = ["--input", str(corpus[0]), "--tokenizer", str(wordpiece_tokenizer_dir), "--valid-fraction", "0",
            "--workers", "1", "--quiet"]
    assert main([*args, "--output-dir", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no end-of-text token" in err and "pass --eod-token NAME" in err and "[SEP]" in err
    assert main([*args, "--output-dir", str(tmp_path / "typo"), "--eod-token", "[EOT]"]) == 2
    assert "end-of-text token '[EOT]' is not a token of" in capsys.readouterr().err
    assert main([*args, "--output-dir", str(tmp_path / "out"), "--eod-token", "[SEP]"]) == 0
    tok_json = wordpiece_tokenizer_dir / "tokenizer.json"
    sep = HFTokenizer.from_file(str(tok_json)).token_to_id("[SEP]")
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["tokenizer"]["kind"] == "hf" and (m["tokenizer"]["eod"], m["tokenizer"]["pad"]) == (sep, 0)
    # no [CLS] from the tokenizer's template: documents are the encoded text, then eod
    assert read_split(tmp_path / "out", "train") == direct(tok_json, reference_docs(corpus[0]), sep)



def test_what_a_slurm_task_receives_loads_the_same_tokenizer(wordpiece_tokenizer_dir, tmp_path):
    """A SLURM array task gets the settings and the tokenizer pickled: the same file, eod and ids."""
    import pickle

    from data_prep import worker
    from data_prep.settings import PrepSettings
    from data_prep.tokenizer import Tokenizer

    tok = Tokenizer(wordpiece_tokenizer_dir, eod_token="[SEP]")
    s = pickle.loads(pickle.dumps(PrepSettings(out_dir=str(tmp_path), tokenizer=str(tok.model_path),
                                               eod_token="[SEP]", encoder="tokenizers")))
    for other in (pickle.loads(pickle.dumps(tok)), worker.load_tokenizer(s, s.encoder)):
        assert other.record == tok.record and other.encoder == "tokenizers"
        assert other.encode(EDGE_DOCS[0]) == tok.encode(EDGE_DOCS[0]) and other.encode(EDGE_DOCS[0])


def test_eod_and_pad_from_a_tokenizer_config_beside_it(wordpiece_tokenizer_dir, bpe_tokenizer_json, tmp_path):
    from data_prep.tokenizer import Tokenizer

    folder = tmp_path / "wp"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((wordpiece_tokenizer_dir / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "[SEP]"}, "pad_token": "[PAD]"}))
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tok = Tokenizer(folder)
    assert (tok.kind, tok.eod_token) == ("hf", "[SEP]")
    assert (tok.eod, tok.pad) == (hf.token_to_id("[SEP]"), hf.token_to_id("[PAD]"))
    assert Tokenizer(folder, eod_token="[CLS]").eod == hf.token_to_id("[CLS]")  # the flag wins
    # GPT-2 style: pad set to the end-of-text token; pad -1, or megatron would mask every eod out of the loss
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "tokenizer.json").write_bytes(bpe_tokenizer_json.read_bytes())
    (gpt / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT, "pad_token": EOT}))
    assert (Tokenizer(gpt).eod, Tokenizer(gpt).pad) == (0, -1)
