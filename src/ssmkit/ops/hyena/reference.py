"""The specification of Hyena's recurrence (Poli et al. 2023, Def. 3.1, eq. 5-6):

    z^1 = v,    z^{n+1}_t = x^n_t * (h^n conv z^n)_t     for n = 1 .. N,     y = z^{N+1}

with (h conv z)_t = sum_{s <= t} h_{t-s} z_s + b z_t (a causal long convolution with a skip term b, the
``bias`` of the authors' ``HyenaFilter``). The authors' operator multiplies by the gate before the
convolution and by the last gate after the last one (``v = v * x_i; v = conv(v)``, then ``y = v * x_0``):

    u^1 = v;  for n = 1 .. N-1:  u^{n+1} = h^n conv (x^{N+1-n} * u^n);   y = x^1 * u^N    (N = order)

which is the same recurrence with the gates renumbered. We use the authors' form (an order-N operator has
N gates and N - 1 long filters) so their weights apply unchanged.

Glossary: ``gates`` (order, batch, D, L) = x^1 .. x^N as the authors split them (``gates[0]`` multiplies
last); ``v`` (batch, D, L); ``filters`` (order - 1, D, L) = h^n at lags 0 .. L-1 (``filters[0]`` applied
first); ``bias`` (order - 1, D) = the skip terms b.
"""

from __future__ import annotations

import torch

__all__ = ["hyena_recurrence_ref", "modal_kernel_ref"]


def hyena_recurrence_ref(gates: torch.Tensor, v: torch.Tensor, filters: torch.Tensor,
                         bias: torch.Tensor) -> torch.Tensor:
    """Hyena's order-N recurrence with every convolution as an explicit sum over the past (O(L^2)).

    Args: gates (order, batch, D, L); v (batch, D, L); filters (order - 1, D, L); bias (order - 1, D).
    Returns: y (batch, D, L).
    """
    order, L = gates.shape[0], v.shape[-1]
    u = v
    for n in range(order - 1):
        u = u * gates[order - 1 - n]  # the authors' reversed(x[1:]): the last gate first
        h = filters[n]
        out = []
        for t in range(L):
            out.append((h[:, : t + 1].flip(-1) * u[..., : t + 1]).sum(-1) + bias[n] * u[..., t])
        u = torch.stack(out, -1)
    return u * gates[0]


def modal_kernel_ref(poles: torch.Tensor, residues: torch.Tensor, L: int) -> torch.Tensor:
    """Real filter of a diagonal SSM in modal form, h_t = Re(sum_k R_k lambda_k^t), t < L, by repeated
    multiplication. poles, residues: (..., n) complex -> (..., L) real."""
    power = torch.ones_like(poles)
    out = []
    for _ in range(L):
        out.append((residues * power).sum(-1).real)
        power = power * poles
    return torch.stack(out, -1)
