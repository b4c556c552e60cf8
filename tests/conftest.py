"""Test-wide settings: one thread per test process (pytest-xdist runs one process per core), denormals
flushed as the library's hot loops expect, and a fixed seed per test."""

import pytest
import torch

torch.set_num_threads(1)
torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
