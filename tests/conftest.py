"""Test-wide settings: one thread per test process (pytest-xdist runs one process per core), denormals
flushed as the library's hot loops expect, a fixed seed per test, and on a machine without CUDA Triton's
CPU interpreter for the whole session (set here, before anything imports triton, so that no test module
changes it for the tests that happen to run after it in the same worker)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(1)
torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
