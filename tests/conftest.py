"""Test-wide settings: one thread per test process (pytest-xdist runs one process per core), denormals
flushed as the library's hot loops expect, and a fixed seed per test."""

import os

import pytest
import torch

# Triton's interpreter is chosen when triton is first imported (its jit decorator reads TRITON_INTERPRET), so
# the flag cannot be scoped to single tests: it is set here, once per process (every xdist worker imports this
# conftest before collecting any test module), and only on machines without CUDA, where the triton tests run
# on the CPU. Setting it in one place makes every worker's state the same whatever the collection order; it
# changes no "auto" backend choice (auto never picks triton for CPU tensors), only lets backend="triton" run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
