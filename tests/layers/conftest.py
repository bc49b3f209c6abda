"""Layer tests share one single-rank gloo world in the pytest process (multi-rank tests spawn their
own processes)."""

import pytest


@pytest.fixture(scope="session")
def single_rank():
    from .mcore_setup import init_single_process

    init_single_process()
    yield
