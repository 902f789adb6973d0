"""One quick main job per test session (corpus, tokenizer, data, two trained runs, HF export,
evaluation), shared by the end-to-end tool tests so that CI pays for it once."""

import pytest


@pytest.fixture(scope="session")
def quick_job(tmp_path_factory):
    from tools.main_job import main

    out = tmp_path_factory.mktemp("main_job")
    summary = main(["--quick", "--output", str(out)])
    return out, summary
