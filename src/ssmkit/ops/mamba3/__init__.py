"""The Mamba-3 SSM core (Lahoti et al. 2026, arXiv 2603.15569, Sec. 3): exponential-trapezoidal update,
data-dependent rotations of B and C (the complex-valued state), SISO and MIMO. ``mamba3_ssm`` for whole
sequences, ``mamba3_ssm_step`` for one token; equations and glossary in ``reference.py``, the chunked form's
derivation in ``chunked.py``.

Backends of :func:`mamba3_ssm` (``backend=``):
    ``"chunked"``    quadratic inside chunks, the state passed between them (pure PyTorch);
    ``"reference"``  the step-by-step loop (``reference.py``), the specification;
    ``"auto"``       ``"chunked"``.
:func:`ssmkit.ops.last_backend` ("mamba3_ssm") names the backend that ran.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._checks import check_choice
from ..backends import register_op, resolve
from .args import ROTARY_PAIRINGS
from .chunked import DEFAULT_CHUNK_SIZE, mamba3_chunked
from .reference import mamba3_ref, mamba3_step_checked as mamba3_ssm_step, rotate

__all__ = ["mamba3_ssm", "mamba3_ssm_step", "mamba3_ref", "mamba3_chunked", "rotate", "BACKENDS",
           "ROTARY_PAIRINGS", "DEFAULT_CHUNK_SIZE"]

BACKENDS = ("auto", "chunked", "reference")
register_op("mamba3_ssm", BACKENDS[1:])


def mamba3_ssm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor,
               trap: torch.Tensor, angle_rates: torch.Tensor, D: Optional[torch.Tensor] = None,
               initial_state: Optional[Tuple[torch.Tensor, ...]] = None, return_final_state: bool = False,
               rotary_pairs: str = "adjacent", chunk_size: int = DEFAULT_CHUNK_SIZE, backend: Optional[str] = None):
    """The Mamba-3 core over a sequence.

    Args:
        q, k: (batch, L, R, H, N) C and B (biases added, not yet rotated); v: (batch, L, R, H, P);
        adt, dt, trap: (batch, L, H): Delta A (<= 0), Delta, lambda in (0, 1); angle_rates: (batch, L, H, S).
        D: (H,) skip, or None.
        initial_state: (theta (batch, H, S), S (batch, H, P, N), k_prev rotated (batch, R, H, N),
            v_prev (batch, R, H, P)), or None for zeros.
        return_final_state: also return the state after the last step.
        rotary_pairs: "adjacent" (the authors' SISO) or "halves" (their MIMO).
        chunk_size: chunk length of the "chunked" backend (execution only).
        backend: "auto", "chunked" or "reference".

    Returns:
        y (batch, L, R, H, P) in q's dtype, and the final state (compute dtype) when ``return_final_state``.
    """
    if backend is not None:
        check_choice("backend", backend, BACKENDS)
    chosen = resolve("mamba3_ssm", backend, lambda: "chunked")
    if chosen == "reference":
        return mamba3_ref(q, k, v, adt, dt, trap, angle_rates, D, initial_state, return_final_state, rotary_pairs)
    return mamba3_chunked(q, k, v, adt, dt, trap, angle_rates, D, initial_state, return_final_state, rotary_pairs,
                          chunk_size)
