"""Process-wide torch settings that library calls may change only for their own duration.

``torch.set_num_threads`` and ``torch.set_flush_denormal`` act on the whole process (denormal flushing on
the calling thread's floating-point unit), so a library call that sets them must put them back, or the
caller's later code, another test, or the next call runs under settings it never chose.

    with process_settings(threads=2, flush_denormal=True):
        ...   # the previous thread count and denormal mode are back afterwards, also after an exception
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


def flush_denormal_enabled() -> bool:
    """Whether denormal floats are flushed to zero on this thread now (probed: torch has no getter).
    1e-30 * 1e-15 = 1e-45 is a float32 denormal, so the product is 0 exactly when flushing is on."""
    tiny = torch.tensor([1e-30], dtype=torch.float32)
    return bool((tiny * 1e-15).item() == 0.0)


@contextlib.contextmanager
def process_settings(threads: Optional[int] = None, flush_denormal: Optional[bool] = None) -> Iterator[None]:
    """Set torch's intra-op thread count and denormal flushing inside the block (None leaves one as it
    is) and restore both on exit, exceptions included.

    Flushing denormals to zero matters on CPUs: decaying SSM states pass through denormal magnitudes, which
    run many times slower than normal floats (a ~6x slower scan was measured), and flushing changes values
    only below ~1e-38 (float32).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None; got {threads!r}")
    previous_threads = torch.get_num_threads()
    previous_flush = flush_denormal_enabled()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if flush_denormal is not None:
            torch.set_flush_denormal(flush_denormal)
        yield
    finally:
        if torch.get_num_threads() != previous_threads:
            torch.set_num_threads(previous_threads)
        torch.set_flush_denormal(previous_flush)
