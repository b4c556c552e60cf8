"""Liquid-S4's core over a whole sequence in parallel: Vandermonde kernels and FFT convolutions.

The same function as :func:`~ssmkit.ops.liquid_s4.reference.liquid_s4_ref` (see there for the equations):
the order-q correlation signals c^(q) are formed for all steps at once (products of shifted copies of the
input, the ``history`` prepended), and

* ``"kb"``: s = K * u + sum_q K^(q) * c^(q) + D u, with K^(q)_j = 2 Re(C Abar^j Bbar^q): one Vandermonde
  kernel per order, computed in one call (Bbar^q stacked on a leading axis) and one FFT convolution each;
* ``"polyb"``: s = K * u + D u + sum_q 2 Re(C . Bbar^q) c^(q), a pointwise term per order.

The initial state adds 2 Re(C Abar^{k+1} h0) to each output; the final state is the S4D final state of u
plus, for "kb", that of each correlation signal driven by Bbar^q.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..fftconv import fft_conv
from ..lti_kernels import final_state, initial_state_response, kernel_vandermonde
from .reference import check_liquid_args


def input_correlations(u: torch.Tensor, degree: int, history: Optional[torch.Tensor] = None) -> torch.Tensor:
    """c^(q)_k = u_k u_{k-1} ... u_{k-q+1} for q = 2..degree: u (batch, H, L), history (batch, H, degree - 1)
    or None (zeros) -> (degree - 1, batch, H, L)."""
    batch, H, L = u.shape
    if history is None:
        history = u.new_zeros(batch, H, degree - 1)
    extended = torch.cat([history, u], -1)                                   # (B, H, degree - 1 + L)
    past = degree - 1
    correlations, c = [], u
    for q in range(2, degree + 1):
        c = c * extended[..., past - (q - 1): past - (q - 1) + L]            # times u_{k-q+1}
        correlations.append(c)
    return torch.stack(correlations) if correlations else u.new_zeros(0, batch, H, L)


def liquid_s4_fft(u: torch.Tensor, dtA: torch.Tensor, Bbar: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                  degree: int, kernel: str = "polyb", h0: Optional[torch.Tensor] = None,
                  history: Optional[torch.Tensor] = None, return_state: bool = False):
    """Liquid-S4's core by FFT convolutions.

    Args:
        u: (batch, H, L) real.  dtA, Bbar, C: (H, N2) complex.  D: (H,) real.  degree: p >= 1.
        kernel: "kb" or "polyb".  h0: (batch, H, N2) complex or None.  history: (batch, H, p - 1) or None.
        return_state: also return the final h and history.

    Returns:
        s (batch, H, L), and with ``return_state`` (s, h (batch, H, N2), history (batch, H, p - 1)).
    """
    check_liquid_args(u, dtA, Bbar, C, D, degree, kernel, h0, history, time=True)
    L = u.shape[-1]
    correlations = input_correlations(u, degree, history)                    # (p - 1, B, H, L)
    powers = torch.stack([Bbar ** q for q in range(1, degree + 1)])          # (p, H, N2): Bbar^1..Bbar^p
    if kernel == "kb":
        K = kernel_vandermonde(dtA, powers, C, L)                            # (p, H, L)
        s = fft_conv(u, K[0], D=D)
        for q in range(degree - 1):
            s = s + fft_conv(correlations[q], K[q + 1])
    else:
        s = fft_conv(u, kernel_vandermonde(dtA, Bbar, C, L), D=D)
        gains = 2 * (C * powers[1:]).sum(-1).real                            # (p - 1, H): 2 Re(C . Bbar^q)
        s = s + (gains[:, None, :, None] * correlations).sum(0)
    if h0 is not None:
        s = s + initial_state_response(dtA, C, h0, L)
    if not return_state:
        return s
    h = final_state(dtA, Bbar, u, h0)
    if kernel == "kb":
        for q in range(degree - 1):
            h = h + final_state(dtA, powers[q + 1], correlations[q])
    past = degree - 1
    if history is None:
        history = u.new_zeros(u.shape[0], u.shape[1], past)
    new_history = torch.cat([history, u], -1)[..., -past:] if past else history
    return s, h, new_history
