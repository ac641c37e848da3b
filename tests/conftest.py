"""Shared test setup."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run tiny models whose forward takes ~1 ms on one thread; with two intra-op
    threads on a busy 2-core machine each op can stall waiting for the second thread
    (~50 ms per forward), which makes the suite slow and erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
