"""WKV-7, the state update of RWKV-7 "Goose" (Peng et al. 2025, arXiv 2503.14456, Sec. 4): ``wkv7`` for whole
sequences, ``wkv7_step`` for one token. Equations and glossary are in ``reference.py``, the chunked form's
derivation in ``chunked.py``.

Backends of :func:`wkv7` (``backend=``):
    ``"chunked"``    in-chunk matrix products with a triangular solve, the state passed between chunks;
                     numerically stable (decays only as exp of non-positive differences);
    ``"reference"``  the step-by-step loop (``reference.py``), the specification;
    ``"auto"``       ``"chunked"``.
``backend=None`` (or "auto") defers to the innermost :func:`ssmkit.ops.use_backend` context, then to "auto";
:func:`ssmkit.ops.last_backend` ("wkv7") names the backend that ran.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._checks import check_choice
from ..backends import register_op, resolve
from .chunked import DEFAULT_CHUNK_SIZE, wkv7_chunked
from .reference import wkv7_ref, wkv7_step

__all__ = ["wkv7", "wkv7_ref", "wkv7_chunked", "wkv7_step", "BACKENDS", "DEFAULT_CHUNK_SIZE"]

BACKENDS = ("auto", "chunked", "reference")
register_op("wkv7", BACKENDS[1:])


def wkv7(r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
         initial_state: Optional[torch.Tensor] = None, return_final_state: bool = False,
         chunk_size: int = DEFAULT_CHUNK_SIZE, backend: Optional[str] = None):
    """The WKV-7 recurrence over a sequence: S_t = S_{t-1} diag(exp log_w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,
    y_t = S_t r_t.

    Args:
        r, log_w, k, a, b: (batch, L, H, key_dim), log_w <= 0; v: (batch, L, H, value_dim); any memory layout.
        initial_state: (batch, H, value_dim, key_dim), S before the first step; zeros if None.
        return_final_state: also return S after the last step.
        chunk_size: the chunk length of the "chunked" backend (execution only; the result does not depend on it).
        backend: "auto", "chunked" or "reference" (module docstring).

    Returns:
        y (batch, L, H, value_dim) in r's dtype, and S_L (batch, H, value_dim, key_dim) in the compute dtype
        (float32 for half-precision inputs) when ``return_final_state``.
    """
    if backend is not None:
        check_choice("backend", backend, BACKENDS)
    chosen = resolve("wkv7", backend, lambda: "chunked")
    if chosen == "reference":
        return wkv7_ref(r, log_w, k, v, a, b, initial_state, return_final_state)
    return wkv7_chunked(r, log_w, k, v, a, b, initial_state, return_final_state, chunk_size)
