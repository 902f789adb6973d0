"""Fixtures for the model tests: one single-process megatron-core parallel_state per session."""

import pytest


@pytest.fixture(scope="session")
def single_process():
    from pretrain.parallel import init_model_parallel

    init_model_parallel(tp=1)
    yield
