"""H3's core in parallel over the sequence: both SSMs as FFT convolutions (H3 Sec. 3.3, "FlashConv" without
the fused kernel). Held to :mod:`.reference` (outputs, final states, gradients) by tests/ops/test_h3.py.

Shift SSM (per channel, N taps): its kernel is K_j = C S^j B = sum_{n >= j} C_n B_{n-j} for j < N and 0
beyond (S^N = 0), so the convolution is short; an initial register x0 adds sum_m C_{m+t+1} x0_m to output t
(its taps move out of the register after N - 1 steps), and the final register is
x_{L-1}[n] = sum_{j <= min(n, L-1)} B_{n-j} u_{L-1-j} + x0[n-L] (the last term only while n >= L).

Diagonal SSM on kv: every entry (i, j) of each head's outer product is one more "batch row" of an S4D
convolution with that head's kernel (:func:`ssmkit.ops.kernel_vandermonde`), its initial-state response and
its final state (:mod:`ssmkit.ops.lti_kernels`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import fft_conv, kernel_vandermonde
from ..lti_kernels import final_state, initial_state_response
from .reference import H3System, check_system

__all__ = ["shift_ssm_kernel", "shift_ssm", "h3_fft"]


def _lower_toeplitz(B: torch.Tensor) -> torch.Tensor:
    """(H, N) -> (H, N, N) with T[h, n, j] = B[h, n - j] for n >= j, else 0 (the matrix sum_j S^j B e_j^T)."""
    N = B.shape[-1]
    lag = torch.arange(N, device=B.device)[:, None] - torch.arange(N, device=B.device)[None, :]
    return B[:, lag.clamp(min=0)] * (lag >= 0).to(B.dtype)


def shift_ssm_kernel(B: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """The shift SSM's kernel K_j = C S^j B (j < L): (H, N) B and C -> (H, L), zero from lag N on."""
    N = B.shape[-1]
    K = torch.einsum("hn,hnj->hj", C, _lower_toeplitz(B))  # (H, N)
    return K[:, :L] if L <= N else F.pad(K, (0, L - N))


def shift_ssm(u: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
              x0: Optional[torch.Tensor] = None, return_state: bool = False):
    """The shift SSM of :func:`ssmkit.ops.h3.shift_ssm_ref` by one FFT convolution.

    Args: u (batch, H, L); B, C (H, N); D (H,) or None; x0 (batch, H, N) or None (zeros).
    Returns: y (batch, H, L), and the final register (batch, H, N) when ``return_state`` (else None).
    """
    L = u.shape[-1]
    N = B.shape[-1]
    y = fft_conv(u, shift_ssm_kernel(B, C, L), D)
    if x0 is not None:
        # output t reads the old taps still in the register: sum_m C_{m+t+1} x0_m (a Hankel matrix of C)
        T = min(L, N)
        idx = torch.arange(T, device=u.device)[:, None] + torch.arange(N, device=u.device)[None, :] + 1
        hankel = C[:, idx.clamp(max=N - 1)] * (idx < N).to(C.dtype)  # (H, T, N)
        y = y + F.pad(torch.einsum("htm,bhm->bht", hankel, x0), (0, L - T))
    if not return_state:
        return y, None
    recent = u[..., max(L - N, 0):].flip(-1)  # u_{L-1-j}, j < min(L, N)
    recent = F.pad(recent, (0, N - recent.shape[-1]))
    x = torch.einsum("hnj,bhj->bhn", _lower_toeplitz(B), recent)
    if x0 is not None and L < N:
        x = x + F.pad(x0[..., : N - L], (L, 0))
    return y, x


def h3_fft(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, system: H3System, head_dim: int,
           shift_state: Optional[torch.Tensor] = None, kv_state: Optional[torch.Tensor] = None,
           return_state: bool = False) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """H3's core by FFT convolutions; same arguments and result as :func:`ssmkit.ops.h3.h3_ref`.

    Args:
        q, k, v: (batch, d_model, L) real.  system: :class:`H3System`.  head_dim: d.
        shift_state: (batch, d_model, N) or None.  kv_state: (batch, H, d, d, N2) complex or None.
        return_state: also compute the final states.

    Returns:
        y (batch, d_model, L) (channel j * H + h), and (shift_state, kv_state) or None.
    """
    batch, d_model, L = k.shape
    H, _, N2 = check_system(system, d_model, head_dim)
    d = head_dim
    kbar, shift_final = shift_ssm(k, system.shift_B, system.shift_C, system.shift_D, shift_state, return_state)
    kv = kbar.view(batch, H, d, 1, L) * v.view(batch, H, 1, d, L)  # (batch, H, d_i, d_j, L)
    rows = kv.permute(0, 2, 3, 1, 4).reshape(batch * d * d, H, L)  # each (i, j) entry: one S4D batch row
    K = kernel_vandermonde(system.dtA, system.Bbar, system.C, L)  # (H, L)
    s = fft_conv(rows, K, system.D)
    z0 = None
    if kv_state is not None:
        z0 = kv_state.permute(0, 2, 3, 1, 4).reshape(batch * d * d, H, N2)
        s = s + initial_state_response(system.dtA, system.C, z0, L)
    s = s.view(batch, d, d, H, L)
    y = (q.view(batch, H, d, L).transpose(1, 2)[:, :, None] * s).sum(1)  # (batch, d_j, H, L): sum over i
    y = y.reshape(batch, d_model, L)
    if not return_state:
        return y, None
    z = final_state(system.dtA, system.Bbar, rows, z0)  # (batch d d, H, N2)
    kv_final = z.view(batch, d, d, H, N2).permute(0, 3, 1, 2, 4)
    return y, (shift_final, kv_final)
