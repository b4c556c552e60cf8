"""Hyena's recurrence by FFT convolutions (Poli et al. 2023, Sec. 3.3: O(N L log L)), held to
:mod:`.reference` by tests/ops/test_hyena.py; and the modal kernel of a distilled filter."""

from __future__ import annotations

import torch

from .. import fft_conv

__all__ = ["hyena_recurrence", "modal_kernel"]


def hyena_recurrence(gates: torch.Tensor, v: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Same arguments and result as :func:`ssmkit.ops.hyena.hyena_recurrence_ref`, each long convolution
    by :func:`ssmkit.ops.fft_conv` (gates (order, batch, D, L), v (batch, D, L), filters (order - 1, D, L),
    bias (order - 1, D) -> y (batch, D, L))."""
    order = gates.shape[0]
    if tuple(filters.shape[:1]) != (order - 1,) or tuple(bias.shape[:1]) != (order - 1,):
        raise ValueError(f"filters and bias must hold order - 1 = {order - 1} filters; got "
                         f"{tuple(filters.shape)} and {tuple(bias.shape)}")
    u = v
    for n in range(order - 1):
        u = fft_conv(u * gates[order - 1 - n], filters[n], bias[n])
    return u * gates[0]


def modal_kernel(poles: torch.Tensor, residues: torch.Tensor, L: int) -> torch.Tensor:
    """h_t = Re(sum_k R_k lambda_k^t) for t < L with lambda^t = exp(t log lambda) (no running product):
    poles, residues (..., n) complex -> (..., L) real."""
    t = torch.arange(L, dtype=poles.real.dtype, device=poles.device)
    powers = torch.exp(torch.log(poles)[..., None] * t)  # (..., n, L)
    return (residues[..., None] * powers).sum(-2).real
