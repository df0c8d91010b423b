"""Fixtures of the OwLore tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread is ~100x faster than many on a shared,
    loaded CPU (thread contention), and results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
