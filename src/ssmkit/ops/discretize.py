"""Discretisation of ``x'(t) = A x(t) + B u(t)`` with step ``dt`` into ``x_k = Abar x_{k-1} + Bbar u_k``.

Methods (S4 Sec. 2.3; Mamba Sec. 2):

* ``zoh``      zero-order hold:   Abar = exp(dt A),            Bbar = A^{-1} (Abar - I) B
* ``bilinear`` Tustin:            Abar = (I - dt/2 A)^{-1} (I + dt/2 A),  Bbar = (I - dt/2 A)^{-1} dt B
* ``euler``    forward Euler:     Abar = I + dt A,              Bbar = dt B

``discretize_diag`` takes a diagonal A as its (..., N) diagonal; ``discretize_dense`` a full (..., N, N) A.
Both broadcast ``dt`` over the leading dimensions (``dt`` has A's shape without the state dimensions,
or any shape that broadcasts to it).
"""

from __future__ import annotations

import torch

from .._checks import check_choice

METHODS = ("zoh", "bilinear", "euler")


def discretize_diag(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, method: str = "zoh"):
    """Diagonal system: A (..., N), B (..., N), dt (...) -> (Abar (..., N), Bbar (..., N))."""
    check_choice("method", method, METHODS)
    dt = torch.as_tensor(dt, dtype=A.real.dtype if A.is_complex() else A.dtype, device=A.device)
    dtA = dt[..., None] * A
    if method == "zoh":
        Abar = torch.exp(dtA)
        # expm1 keeps precision for tiny dt*A; A = 0 (a pure integrator) has the limit dt * B
        safe_A = torch.where(A == 0, torch.ones_like(A), A)
        Bbar = torch.where(A == 0, dt[..., None] * B, torch.expm1(dtA) / safe_A * B)
    elif method == "bilinear":
        denom = 1 - dtA / 2
        Abar = (1 + dtA / 2) / denom
        Bbar = dt[..., None] * B / denom
    else:
        Abar = 1 + dtA
        Bbar = dt[..., None] * B
    return Abar, Bbar


def discretize_dense(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, method: str = "zoh"):
    """Dense system: A (..., N, N), B (..., N) -> (Abar (..., N, N), Bbar (..., N)).

    ZOH exponentiates the augmented matrix [[A, B], [0, 0]] * dt, whose exponential is [[Abar, Bbar], [0, 1]];
    this needs no inverse of A, so it also holds for singular A.
    """
    check_choice("method", method, METHODS)
    N = A.shape[-1]
    if A.shape[-2] != N:
        raise ValueError(f"A must be (..., N, N); got {tuple(A.shape)}")
    if B.shape[-1] != N:
        raise ValueError(f"B must be (..., N={N}); got {tuple(B.shape)}")
    dt = torch.as_tensor(dt, dtype=A.real.dtype if A.is_complex() else A.dtype, device=A.device)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-1], dt.shape)
    A = A.expand(*batch, N, N)
    B = B.expand(*batch, N)
    dt = dt.expand(batch)
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    if method == "zoh":
        M = torch.zeros(*batch, N + 1, N + 1, dtype=A.dtype, device=A.device)
        M[..., :N, :N] = A
        M[..., :N, N] = B
        E = torch.linalg.matrix_exp(M * dt[..., None, None])
        return E[..., :N, :N], E[..., :N, N]
    if method == "bilinear":
        left = eye - dt[..., None, None] / 2 * A
        Abar = torch.linalg.solve(left, eye + dt[..., None, None] / 2 * A)
        Bbar = torch.linalg.solve(left, (dt[..., None] * B)[..., None])[..., 0]
        return Abar, Bbar
    return eye + dt[..., None, None] * A, dt[..., None] * B
