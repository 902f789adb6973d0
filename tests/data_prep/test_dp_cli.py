"""Entry points: every option documented with its default, `python -m` and the script path both
work; the typed settings reject bad values together. (That data_prep imports neither pretrain nor
tools is tests/test_structure.py's layering check.)"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import corpus, preprocess, train_tokenizer
from data_prep.settings import PrepSettings, SettingsError
from tools.bench import preprocess as bench

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", [preprocess, train_tokenizer, corpus, bench], ids=lambda m: m.__name__)
def test_every_option_has_a_description_and_shows_its_default(module):
    ap = module.parser()
    assert issubclass(ap.formatter_class, argparse.ArgumentDefaultsHelpFormatter) and ap.description
    for action in ap._actions:
        assert action.help, f"{module.__name__}: {action.option_strings or action.dest} has no description"
    text = ap.format_help()
    for action in ap._actions:  # the defaults formatter shows every real default
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            assert f"(default: {action.default})" in " ".join(text.split()), action.dest


def test_preprocess_runs_as_a_module_and_as_a_script():
    for cmd in ([sys.executable, "-m", "data_prep.preprocess", "--help"],
                [sys.executable, "data_prep/preprocess.py", "--help"]):
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0 and "--encoder" in r.stdout and "(default: auto)" in r.stdout, r.stderr


def test_settings_collect_every_error_and_pickle():
    with pytest.raises(SettingsError) as e:
        PrepSettings(valid_fraction=1.5, workers=0, encoder="tiktoken")
    assert len(e.value.errors) == 3
    assert "encoder='tiktoken': choose one of auto, sentencepiece, fastokens" in str(e.value)
    with pytest.raises(TypeError):
        PrepSettings(valid_fractoin=0.1)  # unknown keys are rejected
    s = PrepSettings(out_dir="/x", tokenizer="/t.model", chunk_mb=4.0, valid_tokens=1000)
    assert pickle.loads(pickle.dumps(s)) == s and s.chunk_bytes == 4 << 20

