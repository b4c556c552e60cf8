"""The RG-LRU of Griffin / Hawk (De et al. 2024, arXiv 2402.19427, Sec. 2.4): ``rglru`` for whole sequences,
``rglru_step`` for one token. Equations, glossary and the authors' details are in ``reference.py``.

Backends of :func:`rglru` (``backend=``):
    ``"chunked"``      gates for all steps at once, then the two-level chunked scan of :mod:`ssmkit.ops.scan`;
    ``"associative"``  the same gates, then the parallel associative scan (O(log L) depth);
    ``"reference"``    the loop of :func:`rglru_step` over time (``reference.py``), the specification.
    ``"auto"``         ``"chunked"`` (the faster scan on CPU in :mod:`ssmkit.ops.scan`'s measurements).
``backend=None`` (or "auto") defers to the innermost :func:`ssmkit.ops.use_backend` context, then to "auto";
:func:`ssmkit.ops.last_backend` ("rglru") names the backend that ran.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._checks import check_choice
from ..backends import register_op, resolve
from .parallel import rglru_scan
from .reference import MAX_SQRT_GRADIENT, RGLRU_C, rglru_ref, rglru_step, sqrt_bounded_derivative

__all__ = ["rglru", "rglru_ref", "rglru_scan", "rglru_step", "sqrt_bounded_derivative", "BACKENDS", "RGLRU_C",
           "MAX_SQRT_GRADIENT"]

BACKENDS = ("auto", "chunked", "associative", "reference")
register_op("rglru", BACKENDS[1:])


def rglru(x: torch.Tensor, recurrent_param: torch.Tensor, input_gate_weight: torch.Tensor,
          input_gate_bias: torch.Tensor, recurrent_gate_weight: torch.Tensor, recurrent_gate_bias: torch.Tensor,
          initial_state: Optional[torch.Tensor] = None, reset: Optional[torch.Tensor] = None,
          return_final_state: bool = False, c: float = RGLRU_C, backend: Optional[str] = None):
    """The RG-LRU over a sequence (Griffin Eqs. (1)-(4)).

    Args:
        x: (batch, L, width), any memory layout.
        recurrent_param: (width,), -Lambda; input_gate_weight, recurrent_gate_weight: (n_heads, block_width,
            block_width) blocks with n_heads * block_width = width; input_gate_bias, recurrent_gate_bias:
            (n_heads, block_width).
        initial_state: (batch, width), h before the first step; zeros if None.
        reset: (batch, L) bool: steps where a_t = 0 (a document starts there).
        return_final_state: also return h after the last step.
        c: the gate's exponent scale (8 in the paper).
        backend: "auto", "chunked", "associative" or "reference" (see the module docstring).

    Returns:
        h (batch, L, width) in the promoted dtype of x and the parameters, and h_{L-1} (batch, width) when
        ``return_final_state``.
    """
    if backend is not None:
        check_choice("backend", backend, BACKENDS)
    chosen = resolve("rglru", backend, lambda: "chunked")
    args = (x, recurrent_param, input_gate_weight, input_gate_bias, recurrent_gate_weight, recurrent_gate_bias,
            initial_state, reset, return_final_state, c)
    if chosen == "reference":
        return rglru_ref(*args)
    return rglru_scan(*args, scan=chosen)
