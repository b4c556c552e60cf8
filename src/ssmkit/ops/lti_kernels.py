"""Convolution kernels of linear time-invariant (LTI) state space models, and the state terms beside them.

A discrete LTI SSM run over inputs u_0 .. u_{L-1}, starting from the state h0 held before u_0,

    h_k = Abar h_{k-1} + Bbar u_k,        y_k = C h_k             (h_{-1} = h0)

is a convolution with the kernel K_k = C Abar^k Bbar plus the free response of h0 (S4, Gu et al. 2022,
eq. 4-5; S4D, Gu et al. 2022, eq. 5):

    y_k = sum_{j<=k} K_{k-j} u_j  +  C Abar^{k+1} h0
    h_{L-1} = Abar^L h0 + sum_{j<L} Abar^{L-1-j} Bbar u_j          (the final state, "h_L" in S4D's wording)

For a diagonal A with conjugate symmetry (S4D) only one mode of each conjugate pair is kept and every
output is doubled in its real part: K_k = 2 Re(sum_n C_n Bbar_n Abar_n^k), y_k = 2 Re(sum_n C_n h_{k,n}).

Glossary (code name: paper symbol):

===========  ==========================================================================================
``H``        channels (d_model): independent single-input single-output SSMs
``N2``       complex modes kept per channel, N/2 for a real state of size N
``L``        sequence length
``dtA``      log Abar, (H, N2) complex; for zero-order hold exactly dt * A (Abar = exp(dt A)); for any
             other discretisation pass ``torch.log(Abar)`` (then Abar^k is computed as exp(k log Abar))
``Bbar, C``  discrete input and output vectors, (..., H, N2) complex
``h0``       state before the first input, (batch, H, N2) complex
``T``        block length of the two-level Vandermonde product (``block``)
===========  ==========================================================================================

Memory. The Vandermonde matrix Abar_n^k of size (H, N2, L) is never formed: writing k = c T + j with
0 <= j < T, Abar^k = Abar^{cT} Abar^j, so every sum over modes becomes one batched matrix product of a
(ceil(L/T), N2) matrix of block powers with an (N2, T) matrix of within-block powers. With T ~ sqrt(L) the
factors hold about 2 H N2 sqrt(L) numbers and the largest tensor is the output itself. For L = 65,536,
N2 = 32, H = 256 in float32 (where the complex64 Vandermonde matrix alone is 4 GiB) :func:`kernel_vandermonde`
raised the resident memory by 0.13 GiB forward and 0.39 GiB forward + backward (measured, CPU).
Each power is one ``exp`` of a product, never a running product, so no rounding accumulates along L.

Each fast function has its specification beside it: :func:`kernel_ref` (powers by repeated
multiplication) and :func:`diagonal_ssm_ref` (the recurrence, step by step).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._checks import check_positive_int, check_tensor

__all__ = [
    "kernel_ref",
    "kernel_vandermonde",
    "initial_state_response",
    "final_state",
    "diagonal_ssm_ref",
    "block_split",
]


# ------------------------------------------------------------------------------------------------------
# Specification
# ------------------------------------------------------------------------------------------------------
def kernel_ref(Abar: torch.Tensor, Bbar: torch.Tensor, C: torch.Tensor, L: int, *,
                 diagonal: bool = False) -> torch.Tensor:
    """The kernel K_k = C Abar^k Bbar for k < L, by repeated multiplication (the specification).

    Args:
        Abar: (..., N, N) dense transition, or with ``diagonal=True`` its diagonal (..., N).
        Bbar: (..., N) input vector.
        C: (..., N) output vector; extra leading dimensions broadcast (e.g. (M, H, N) for M outputs).
        L: kernel length, >= 1.
        diagonal: says which form ``Abar`` has; it is not guessed from the shape, since (H, N) with H == N
            would be ambiguous.

    Returns:
        K (..., L) with ``...`` the broadcast leading shape; complex if any input is complex. No real part
        is taken: for a conjugate-half system (S4D) the real kernel is ``2 * kernel_ref(...).real``.
    """
    for name, value in (("Abar", Abar), ("Bbar", Bbar), ("C", C)):
        check_tensor(name, value, complex_ok=True)
    check_positive_int("L", L)
    N = Bbar.shape[-1]
    if diagonal:
        if Abar.shape[-1] != N:
            raise ValueError(f"Abar (diagonal) must be (..., N={N}) to match Bbar; got {tuple(Abar.shape)}")
    elif Abar.dim() < 2 or Abar.shape[-2:] != (N, N):
        raise ValueError(f"Abar must be (..., N, N) with N={N} to match Bbar (pass diagonal=True for a "
                         f"diagonal (..., N) Abar); got {tuple(Abar.shape)}")
    if C.shape[-1] != N:
        raise ValueError(f"C must be (..., N={N}) to match Bbar; got {tuple(C.shape)}")
    x = Bbar  # Abar^k Bbar, (..., N)
    out = []
    for _ in range(L):
        out.append((C * x).sum(-1))
        x = Abar * x if diagonal else (Abar @ x[..., None])[..., 0]
    return torch.stack(out, -1)


def diagonal_ssm_ref(Abar: torch.Tensor, Bbar: torch.Tensor, C: torch.Tensor, u: torch.Tensor,
                           D: Optional[torch.Tensor] = None,
                           h0: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The conjugate-symmetric diagonal SSM run step by step (the specification of the parallel pass).

    h_k = Abar h_{k-1} + Bbar u_k,  y_k = 2 Re(sum_n C_n h_{k,n}) + D u_k,  h_{-1} = h0 (zeros if None).

    Args:
        Abar, Bbar, C: (H, N2) complex.  u: (batch, H, L) real.  D: (H,) real or None.
        h0: (batch, H, N2) complex or None.

    Returns:
        y (batch, H, L) real, final state h_{L-1} (batch, H, N2) complex.
    """
    batch, H, _ = u.shape
    h = h0 if h0 is not None else torch.zeros(batch, H, Abar.shape[-1], dtype=Abar.dtype, device=u.device)
    ys = []
    for u_k in u.unbind(-1):  # (batch, H)
        h = Abar * h + Bbar * u_k[..., None]
        y_k = 2 * (C * h).sum(-1).real
        if D is not None:
            y_k = y_k + D * u_k
        ys.append(y_k)
    return torch.stack(ys, -1), h


# ------------------------------------------------------------------------------------------------------
# Fast paths: two-level Vandermonde products
# ------------------------------------------------------------------------------------------------------
def block_split(L: int, block: Optional[int] = None) -> Tuple[int, int]:
    """Block length T and number of blocks ceil(L / T) of the two-level product over a length L.

    ``block=None`` picks T = ceil(sqrt(L)), which makes both factors about sqrt(L) long; a given block is
    capped at L. Always T * n_blocks >= L > T * (n_blocks - 1).
    """
    check_positive_int("L", L)
    if block is None:
        block = math.isqrt(L - 1) + 1  # ceil(sqrt(L))
    else:
        check_positive_int("block", block)
    block = min(block, L)
    return block, -(-L // block)


def _powers(dtA: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """exp(dtA * e) = Abar^e for each exponent: dtA (H, N2), exponents (P,) -> (H, P, N2)."""
    return torch.exp(dtA[:, None, :] * exponents[:, None])


def _check_modes(dtA: torch.Tensor, **vectors: torch.Tensor) -> Tuple[int, int]:
    """dtA must be complex (H, N2); each vector complex (..., H, N2) (leading dims broadcast)."""
    check_tensor("dtA", dtA, complex_ok=True)
    if not dtA.is_complex():
        raise TypeError(f"dtA (log Abar) must be a complex tensor; got dtype {dtA.dtype}")
    if dtA.dim() != 2:
        raise ValueError(f"dtA (log Abar) must be (H, N2); got {tuple(dtA.shape)}")
    H, N2 = dtA.shape
    for name, value in vectors.items():
        check_tensor(name, value, complex_ok=True)
        if not value.is_complex():
            raise TypeError(f"{name} must be a complex tensor; got dtype {value.dtype}")
        if value.dim() < 2 or tuple(value.shape[-2:]) != (H, N2):
            raise ValueError(f"{name} must be (..., H={H}, N2={N2}) to match dtA; got {tuple(value.shape)}")
    return H, N2


def kernel_vandermonde(dtA: torch.Tensor, Bbar: torch.Tensor, C: torch.Tensor, L: int, *,
                       block: Optional[int] = None) -> torch.Tensor:
    """S4D kernel K_k = 2 Re(sum_n C_n Bbar_n Abar_n^k), k < L, with Abar^k = exp(k dtA) (S4D eq. 5).

    Args:
        dtA: (H, N2) complex, log Abar (dt * A for ZOH; ``torch.log(Abar)`` for bilinear or any other rule).
        Bbar: (..., H, N2) complex.
        C: (..., H, N2) complex; leading dimensions of C and Bbar broadcast, so C (M, H, N2) gives M
            kernels (e.g. the two directions of a bidirectional layer) for the cost of M output rows.
        L: kernel length, >= 1.
        block: block length T of the two-level product (default ceil(sqrt(L))); it changes speed and
            memory, never the result beyond rounding.

    Returns:
        K (..., H, L) real, in the real dtype of dtA.

    Memory: the largest tensors are the output and its gradient; the factors hold 2 H N2 (T + L / T)
    numbers per leading index (module docstring).
    """
    H, N2 = _check_modes(dtA, Bbar=Bbar, C=C)
    T, n_blocks = block_split(L, block)
    real = dtA.real.dtype
    j = torch.arange(T, dtype=real, device=dtA.device)
    starts = torch.arange(n_blocks, dtype=real, device=dtA.device) * T
    # K[c T + j] = 2 Re(sum_n (C_n Bbar_n Abar_n^{cT}) Abar_n^j): the left factor carries the block powers.
    left = 2 * (C * Bbar)[..., :, None, :] * _powers(dtA, starts)  # (..., H, n_blocks, N2)
    right = _powers(dtA, j).transpose(-1, -2)  # (H, N2, T)
    # Re(a b) = Re a Re b - Im a Im b, done as one real matmul over the stacked 2 N2 axis (half the flops
    # of a complex matmul followed by .real).
    left = torch.cat([left.real, -left.imag], -1)  # (..., H, n_blocks, 2 N2)
    right = torch.cat([right.real, right.imag], -2)  # (H, 2 N2, T)
    K = left @ right  # (..., H, n_blocks, T)
    return K.reshape(*K.shape[:-2], n_blocks * T)[..., :L]


def initial_state_response(dtA: torch.Tensor, C: torch.Tensor, h0: torch.Tensor, L: int, *,
                           block: Optional[int] = None) -> torch.Tensor:
    """What the initial state adds to each output: y_k += 2 Re(sum_n C_n Abar_n^{k+1} h0_n), k < L.

    This is the kernel of a system whose "input vector" is Abar h0, so it reuses :func:`kernel_vandermonde`
    and never forms a (batch, H, N2, L) tensor.

    Args:
        dtA: (H, N2) complex log Abar.  C: (H, N2) complex.  h0: (batch, H, N2) complex.  L: length.

    Returns:
        (batch, H, L) real.
    """
    _check_modes(dtA, C=C, h0=h0)
    if C.dim() != 2:
        raise ValueError(f"C must be (H, N2) for the initial-state response; got {tuple(C.shape)}")
    if h0.dim() != 3:
        raise ValueError(f"h0 must be (batch, H, N2); got {tuple(h0.shape)}")
    return kernel_vandermonde(dtA, torch.exp(dtA) * h0, C, L, block=block)


def final_state(dtA: torch.Tensor, Bbar: torch.Tensor, u: torch.Tensor, h0: Optional[torch.Tensor] = None, *,
                block: Optional[int] = None) -> torch.Tensor:
    """State after the last input: h_{L-1} = Abar^L h0 + Bbar sum_k Abar^{L-1-k} u_k.

    With r = L-1-k = c T + j the sum over k is a matmul of the time-reversed input, cut into blocks of T,
    with the within-block powers (H, T, N2), followed by a weighted sum over the ceil(L/T) blocks.

    Args:
        dtA: (H, N2) complex log Abar.  Bbar: (H, N2) complex.
        u: (batch, H, L) real, in the real dtype of dtA.  h0: (batch, H, N2) complex or None (zeros).

    Returns:
        (batch, H, N2) complex.
    """
    H, N2 = _check_modes(dtA, Bbar=Bbar)
    check_tensor("u", u)
    if u.dim() != 3 or u.shape[1] != H:
        raise ValueError(f"u must be (batch, H={H}, L); got {tuple(u.shape)}")
    if u.dtype != dtA.real.dtype:
        raise TypeError(f"u must have dtype {dtA.real.dtype} to match dtA ({dtA.dtype}); got {u.dtype}")
    batch, _, L = u.shape
    T, n_blocks = block_split(L, block)
    real = u.dtype
    rev = F.pad(u.flip(-1), (0, n_blocks * T - L))  # rev_r = u_{L-1-r}; zeros past r = L-1 add nothing
    rev = rev.reshape(batch, H, n_blocks, T)
    within = _powers(dtA, torch.arange(T, dtype=real, device=u.device))  # (H, T, N2)
    S = rev @ torch.cat([within.real, within.imag], -1)  # (batch, H, n_blocks, 2 N2)
    S = torch.complex(S[..., :N2], S[..., N2:])  # sum_j rev_{cT+j} Abar^j
    starts = torch.arange(n_blocks, dtype=real, device=u.device) * T
    h = Bbar * (S * _powers(dtA, starts)).sum(-2)  # (batch, H, N2)
    if h0 is not None:
        _check_modes(dtA, h0=h0)
        if h0.dim() != 3 or h0.shape[0] != batch:
            raise ValueError(f"h0 must be (batch={batch}, H={H}, N2={N2}); got {tuple(h0.shape)}")
        h = h + torch.exp(dtA * L) * h0
    return h
