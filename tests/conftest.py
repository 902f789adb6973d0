"""Shared test settings: the gpu marker skips where there is no CUDA device; no process a test
started through tests/helpers.py outlives it."""

import os

import pytest

from helpers import STARTED

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker); none on this machine")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `"gpu" in item.keywords`: that also matches a folder named gpu
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_leftover_ranks():
    """A failing test must not leave ranks running on the shared cores."""
    yield
    while STARTED:
        p = STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


_exit_status = None


def pytest_sessionfinish(session, exitstatus):
    """Tests that run megatron-core in this process leave a gloo process group behind."""
    global _exit_status
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _exit_status = int(exitstatus)
        dist.destroy_process_group()


def pytest_unconfigure(config):
    # torch 2.13's gloo can abort in its exit handlers after a finished run ("terminate called
    # without an active exception", about 1 run in 10, docs/reference.md §5), which would turn
    # a green run red: where a process group existed, leave without those handlers.
    if _exit_status is not None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)


def _training_text(root) -> list[str]:
    from data_prep.corpus import build_default_corpus

    lines = []
    for p in build_default_corpus(root, max_mb=0.3):
        if p.suffix == ".txt":
            lines += [x for x in p.read_text().splitlines() if x.strip()]
    return lines


@pytest.fixture(scope="session")
def bpe_tokenizer_json(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer.json with <|endoftext|>, trained locally (1000 ids:
    not a multiple of 128, so a model pads its vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("bpe_json")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(root / "corpus"), trainer)
    tok.save(str(root / "tokenizer.json"))
    return root / "tokenizer.json"


@pytest.fixture(scope="session")
def wordpiece_tokenizer_dir(tmp_path_factory):
    """A BERT-style WordPiece tokenizer in a folder (tokenizer.json): special tokens [PAD] [UNK]
    [CLS] [SEP] [MASK], no end-of-text token, a template that adds [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    root = tmp_path_factory.mktemp("wordpiece")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=800, show_progress=False,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(_training_text(root / "corpus"), trainer)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    return root / "tok"
