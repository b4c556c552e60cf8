"""The RG-LRU over a whole sequence in parallel: gates for every step at once, then one linear scan.

Eqs. (1)-(3) of Griffin (Sec. 2.4) have no dependence on the state, so r_t, i_t and a_t are computed for all
t in two batched block-diagonal products; Eq. (4) is then the diagonal linear recurrence
``h_t = a_t h_{t-1} + b_t`` with ``b_t = sqrt(1 - a_t^2) i_t x_t``, run by :mod:`ssmkit.ops.scan`'s
associative or chunked scan (both differentiable through their adjoint scan, saving only h).
Same arguments and results as :func:`~ssmkit.ops.rglru.reference.rglru_ref`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..scan import associative_scan, chunked_scan
from .reference import RGLRU_C, check_rglru_args, sqrt_bounded_derivative


def rglru_gates(x, recurrent_param, input_gate_weight, input_gate_bias, recurrent_gate_weight, recurrent_gate_bias,
                reset, c, n_heads, block):
    """x (B, L, W) -> a (B, L, W) and b = sqrt(1 - a^2) i x (B, L, W), with a = 0, normaliser 1 at resets."""
    batch, length, width = x.shape
    blocks = x.reshape(batch, length, n_heads, block)                                  # (B, L, H, bw)
    r = torch.sigmoid(torch.einsum("blhi,hij->blhj", blocks, recurrent_gate_weight) + recurrent_gate_bias)
    i = torch.sigmoid(torch.einsum("blhi,hij->blhj", blocks, input_gate_weight) + input_gate_bias)
    log_a = -c * r.reshape(x.shape) * F.softplus(recurrent_param)                      # (B, L, W), <= 0
    a = torch.exp(log_a)
    normaliser = sqrt_bounded_derivative(-torch.expm1(2.0 * log_a))                    # sqrt(1 - a_t^2)
    if reset is not None:
        a = torch.where(reset[..., None], torch.zeros_like(a), a)
        normaliser = torch.where(reset[..., None], torch.ones_like(normaliser), normaliser)
    return a, normaliser * (i.reshape(x.shape) * x)


def rglru_scan(x: torch.Tensor, recurrent_param: torch.Tensor, input_gate_weight: torch.Tensor,
               input_gate_bias: torch.Tensor, recurrent_gate_weight: torch.Tensor, recurrent_gate_bias: torch.Tensor,
               initial_state: Optional[torch.Tensor] = None, reset: Optional[torch.Tensor] = None,
               return_final_state: bool = False, c: float = RGLRU_C, scan: str = "chunked", chunk_size: int = 64):
    """The RG-LRU by gates in parallel + a linear scan; ``scan`` is "associative" or "chunked"."""
    n_heads, block = check_rglru_args(x, recurrent_param, input_gate_weight, input_gate_bias,
                                      recurrent_gate_weight, recurrent_gate_bias, initial_state, reset, time=True)
    if x.shape[1] == 0:
        raise ValueError(f"x must hold at least one time step; got shape {tuple(x.shape)}")
    a, b = rglru_gates(x, recurrent_param, input_gate_weight, input_gate_bias, recurrent_gate_weight,
                       recurrent_gate_bias, reset, c, n_heads, block)
    if scan == "associative":
        h = associative_scan(a, b, initial_state, dim=1)
    else:
        h = chunked_scan(a, b, initial_state, dim=1, chunk_size=chunk_size)
    return (h, h[:, -1]) if return_final_state else h
