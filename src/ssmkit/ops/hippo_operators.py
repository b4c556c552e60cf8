"""HiPPO operators (Gu et al. 2020, "HiPPO: Recurrent Memory with Optimal Polynomial Projections").

Every function returns the continuous-time system ``x'(t) = A x(t) + B u(t)`` with the sign already in A
(so A is stable), as float64 tensors by default. Glossary:

=========  =====================================================================================
``N``      state size (number of basis functions / polynomial degree + 1)
``A, B``   (N, N) transition and (N,) input of the linear ODE
``theta``  window length of the sliding-window measures (LegT, FouT)
``Lambda`` diagonal of the normal part in the NPLR form  A = V (Lambda - P Q^*) V^*
``P, Q``   (rank, N) low-rank correction; for LegS rank 1 and Q = P
=========  =====================================================================================

Measures and the basis that reconstructs the signal from the state ``x(t)``
(used by :mod:`ssmkit.ops.hippo_reconstruction`):

* ``legs``  uniform on [0, t] (time-varying: the ODE is ``x' = (A x + B u) / t``);
  ``u(s) ~ sum_n x_n sqrt(2n+1) P_n(2 s / t - 1)``.
* ``legt``  uniform on [t - theta, t];  ``u(s) ~ sum_n x_n sqrt(2n+1) P_n(2 (s - t) / theta + 1)``.
* ``lagt``  exponentially decaying e^{-(t-s)}; ``u(s) ~ sum_n x_n L_n(t - s)`` (Laguerre polynomials).
* ``fout``  uniform on [t - theta, t], Fourier basis 1, sqrt2 cos(2 pi k r), sqrt2 sin(2 pi k r) with
  r = (s - t) / theta + 1 in [0, 1], ordered [1, cos1, sin1, cos2, sin2, ...].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._checks import check_choice, check_positive_int

MEASURES = ("legs", "legt", "lagt", "fout")


def hippo(measure: str, N: int, theta: float = 1.0, dtype=torch.float64):
    """The HiPPO matrices ``(A (N, N), B (N,))`` of ``measure`` (one of legs, legt, lagt, fout)."""
    check_choice("measure", measure, MEASURES)
    check_positive_int("N", N)
    if theta <= 0:
        raise ValueError(f"theta must be > 0; got {theta}")
    n = torch.arange(N, dtype=torch.float64)
    row, col = n[:, None], n[None, :]
    if measure == "legs":
        # A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k); B_n = sqrt(2n+1)
        r = torch.sqrt(2 * n + 1)
        A = -torch.where(row > col, r[:, None] * r[None, :], torch.zeros(()))
        A = A - torch.diag(n + 1)
        B = r.clone()
    elif measure == "legt":
        # Normalised Legendre basis on the window, oriented as in the module docstring (P_n(+1) at the newest
        # sample): A_nk = -r_n r_k for k <= n, -r_n r_k (-1)^(n-k) for k > n; B_n = r_n; all over theta.
        r = torch.sqrt(2 * n + 1)
        sign = torch.where(col <= row, torch.ones(()), (-1.0) ** (row - col))
        A = -(r[:, None] * r[None, :]) * sign / theta
        B = r / theta
    elif measure == "lagt":
        # Laguerre basis under e^{-(t-s)}: x' = -tril(1) x + 1 u
        A = -torch.tril(torch.ones(N, N, dtype=torch.float64))
        B = torch.ones(N, dtype=torch.float64)
    else:  # fout
        # Rotation of each (cos_k, sin_k) pair at angular speed 2 pi k, and a correction for the sample that
        # leaves the window. The window's Fourier series meets the jump at its ends at the midpoint, so
        # sum_k x_k g_k(0) ~ (u(t - theta) + u(t)) / 2, i.e. u(t - theta) ~ 2 b.x - u(t), b_k = g_k(0):
        # x' = (rotation - 2 b b^T) x + 2 b u, all divided by theta. With N even the last cosine has no sine
        # partner and is left out of b (its rotation cannot be closed).
        A = torch.zeros(N, N, dtype=torch.float64)
        for i in range(1, N - 1, 2):
            k = (i + 1) // 2
            A[i, i + 1] = 2 * math.pi * k
            A[i + 1, i] = -2 * math.pi * k
        b = torch.zeros(N, dtype=torch.float64)
        b[0] = 1.0
        b[1::2] = math.sqrt(2.0)
        if N % 2 == 0 and N > 1:
            b[N - 1] = 0.0
        A = (A - 2 * b[:, None] * b[None, :]) / theta
        B = 2 * b / theta
    return A.to(dtype), B.to(dtype)


class NPLR(NamedTuple):
    """Normal plus low-rank form A = V (diag(Lambda) - P Q^*) V^*, with P, Q, B already in V's basis.

    Lambda: (N,) complex; P, Q: (rank, N) complex; B: (N,) complex; V: (N, N) complex unitary.
    """

    Lambda: torch.Tensor
    P: torch.Tensor
    Q: torch.Tensor
    B: torch.Tensor
    V: torch.Tensor


def nplr_legs(N: int, dtype=torch.complex128) -> NPLR:
    """NPLR form of HiPPO-LegS (S4, Gu et al. 2022, Thm. 1).

    With P_n = sqrt(n + 1/2), S = A + P P^T equals -I/2 plus a skew-symmetric matrix, hence is normal and
    unitarily diagonalisable: S = V Lambda V^*. Then A = V (Lambda - (V^* P)(V^* P)^*) V^*.
    """
    check_positive_int("N", N)
    A, B = hippo("legs", N)
    P = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)
    S = A + P[:, None] * P[None, :]
    skew = S + 0.5 * torch.eye(N, dtype=torch.float64)  # skew-symmetric
    # -i * skew is Hermitian: eigh gives real w and unitary V with skew = V diag(i w) V^*
    w, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    Lambda = -0.5 + 1j * w
    Vh = V.conj().T
    P_t = (Vh @ P.to(torch.complex128))[None, :]
    B_t = Vh @ B.to(torch.complex128)
    return NPLR(Lambda.to(dtype), P_t.to(dtype), P_t.clone().to(dtype), B_t.to(dtype), V.to(dtype))


def nplr_reconstruct(nplr: NPLR) -> torch.Tensor:
    """Dense A = V (diag(Lambda) - P^T conj(Q)) V^* from an NPLR form (for checking)."""
    inner = torch.diag(nplr.Lambda) - nplr.P.T @ nplr.Q.conj()
    return nplr.V @ inner @ nplr.V.conj().T


def conjugate_half(nplr: NPLR) -> NPLR:
    """Keep one eigenvalue of each conjugate pair (positive imaginary part), N -> N/2 modes.

    Real-valued systems have eigenvalues in conjugate pairs; a kernel summed over the kept half and
    doubled in its real part equals the full one (conjugate symmetry, S4 Sec. 3.3). N must be even.
    """
    N = nplr.Lambda.shape[-1]
    if N % 2:
        raise ValueError(f"conjugate symmetry needs an even state size N; got N={N}")
    keep = torch.argsort(nplr.Lambda.imag, descending=True)[: N // 2]
    keep, _ = torch.sort(keep)
    return NPLR(nplr.Lambda[keep], nplr.P[:, keep], nplr.Q[:, keep], nplr.B[keep], nplr.V[:, keep])


S4D_INITS = ("lin", "inv", "real", "legs")


def s4d_init(kind: str, N: int, dtype=torch.complex128) -> torch.Tensor:
    """Diagonal A for S4D (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal SSMs").

    Returns N // 2 complex modes; each stands for itself and its complex conjugate (conjugate symmetry),
    so the real system has N states.

    * ``lin``:  A_n = -1/2 + i pi n
    * ``inv``:  A_n = -1/2 + i N/pi (N/(2n+1) - 1)
    * ``real``: A_n = -(n+1)  (imaginary part zero)
    * ``legs``: the diagonal Lambda of the NPLR form of HiPPO-LegS
    """
    check_choice("kind", kind, S4D_INITS)
    check_positive_int("N", N, minimum=2)
    if N % 2:
        raise ValueError(f"N (the state size) must be even for conjugate-symmetric S4D inits; got {N}")
    n = torch.arange(N // 2, dtype=torch.float64)
    if kind == "lin":
        A = torch.complex(-0.5 * torch.ones_like(n), math.pi * n)
    elif kind == "inv":
        A = torch.complex(-0.5 * torch.ones_like(n), N / math.pi * (N / (2 * n + 1) - 1))
    elif kind == "real":
        A = torch.complex(-(n + 1), torch.zeros_like(n))
    else:
        A = conjugate_half(nplr_legs(N)).Lambda
    return A.to(dtype)
