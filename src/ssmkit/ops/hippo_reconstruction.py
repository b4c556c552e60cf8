"""Online function approximation with HiPPO: feed a signal through the HiPPO ODE, rebuild its history.

HiPPO (Gu et al. 2020) keeps, at every time ``t``, the coefficients ``x(t)`` of the projection of
the history ``u(s), s <= t`` onto an orthonormal basis under a measure; ``x`` obeys the linear ODE of
:func:`ssmkit.ops.hippo_operators.hippo`. From the final state alone the history is rebuilt as
``u(s) ~ sum_n x_n g_n(s)``. This module runs the discretised ODE over a sampled signal and evaluates that
reconstruction (HiPPO's function-reconstruction experiment).

Glossary (code name = HiPPO symbol):

==========  ==========================================================================================
``u``       the input signal f, samples u_k = u(t_k) (..., T); sample k is held over (t_{k-1}, t_k]
``dt``      the sampling step; t_k = k dt for k = 1..T
``N``       the number of coefficients (state size)
``theta``   the window length of the sliding measures (LegT, FouT)
``states``  c(t_k), the HiPPO coefficients after each sample (..., T, N)
``g_n``     the reconstruction basis of the measure (below)
==========  ==========================================================================================

Bases and their arguments, as used here (each verified numerically against the ODE of
:func:`ssmkit.ops.hippo_operators.hippo` by the tests in ``tests/ops/test_hippo_reconstruction.py``):

* ``legs`` (uniform on [0, t]): ``g_n(s) = sqrt(2n+1) P_n(2 s / t - 1)``, the whole history.
* ``legt`` (uniform on [t - theta, t]): ``g_n(s) = sqrt(2n+1) P_n(2 (s - t) / theta + 1)``, the last window
  (P_n(+1) at the newest sample, matching ``B_n = sqrt(2n+1) / theta``; the mirrored orientation
  ``P_n(2 (t - s) / theta - 1)`` differs by (-1)^n and belongs to ``B_n = sqrt(2n+1) (-1)^n / theta``).
* ``lagt`` (e^{-(t - s)} on s <= t): ``g_n(s) = L_n(t - s)`` (Laguerre polynomials), the whole history,
  accurate only over the last few time units, where the measure has weight.
* ``fout`` (uniform on [t - theta, t]): ``1, sqrt2 cos(2 pi k r), sqrt2 sin(2 pi k r)`` with
  ``r = (s - t) / theta + 1``, ordered ``[1, cos1, sin1, cos2, sin2, ...]``, the last window.

Discretisation. LTI measures (legt, lagt, fout) use ``discretize_dense(A, B, dt, method)``. LegS is
time-varying, ``x' = (A x + B u) / t``: ``bilinear`` takes step ``dt / t_k = 1 / k`` at step k (HiPPO's LegS recurrence);
``zoh`` is exact for held samples, because in log time ``tau = ln t`` LegS is LTI
(``dx/dtau = A x + B u``): step k spans ``ln(t_k / t_{k-1}) = ln(k / (k-1))``, and the first step (from
t = 0, tau = -inf) gives the state of a constant history, ``x_1 = -A^{-1} B u_1``.

The reconstruction is compared with the samples at the midpoints ``t_k - dt/2`` of their hold intervals
(``times``): the ODE sees a held, piecewise-constant input, and the bilinear rule's ``B_bar u_k`` is the
trapezoid rule with its input half a step late, so the midpoint is where both methods place sample k.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._checks import check_choice, check_positive_int, check_tensor
from .discretize import discretize_dense
from .hippo_operators import MEASURES, hippo

METHODS = ("bilinear", "zoh")


class HippoReconstruction(NamedTuple):
    """Result of :func:`hippo_reconstruct`.

    states: (..., T, N) the coefficients after each sample.
    times: (M,) the times (hold-interval midpoints) of the samples the final state covers: all T for legs
        and lagt, the last ``round(theta / dt)`` for legt and fout.
    reconstruction: (..., M) the signal rebuilt at ``times`` from the final state.
    target: (..., M) the samples of u at ``times``.
    """

    states: torch.Tensor
    times: torch.Tensor
    reconstruction: torch.Tensor
    target: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Test signal
# --------------------------------------------------------------------------------------------------
def band_limited_noise(T: float, dt: float, cutoff: float, seed: int = 0, batch: int | None = None,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """White noise low-passed at ``cutoff`` Hz in the Fourier domain, zero mean, unit RMS.

    ``n = round(T / dt)`` samples: Gaussian white noise, its real FFT zeroed above ``cutoff`` (and at 0 Hz),
    transformed back and scaled to RMS 1 (per row). The signal is periodic with period T (a Fourier
    series with frequencies 1/T, 2/T, ... <= cutoff), the test signal of HiPPO's reconstruction experiment.

    Returns:
        (n,) or (batch, n) tensor.
    """
    for name, value in (("T", T), ("dt", dt), ("cutoff", cutoff)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0; got {value!r}")
    n = int(round(T / dt))
    if n < 2:
        raise ValueError(f"T / dt must give at least 2 samples; got T={T}, dt={dt} ({n} samples)")
    if cutoff < 1.0 / (n * dt):
        raise ValueError(f"cutoff must be at least the lowest frequency 1/T = {1.0 / (n * dt):.4g} Hz; got {cutoff}")
    if batch is not None:
        check_positive_int("batch", batch)
    generator = torch.Generator().manual_seed(int(seed))
    shape = (n,) if batch is None else (batch, n)
    white = torch.randn(shape, generator=generator, dtype=torch.float64)
    spectrum = torch.fft.rfft(white, dim=-1)
    freqs = torch.fft.rfftfreq(n, d=dt, dtype=torch.float64)
    spectrum[..., (freqs > cutoff) | (freqs == 0)] = 0
    signal = torch.fft.irfft(spectrum, n=n, dim=-1)
    signal = signal / signal.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return signal.to(dtype)


# --------------------------------------------------------------------------------------------------
# Bases
# --------------------------------------------------------------------------------------------------
def legendre_basis(N: int, x: torch.Tensor) -> torch.Tensor:
    """Normalised Legendre polynomials ``sqrt(2n+1) P_n(x)``, n < N: x (...) -> (..., N).

    Three-term recurrence ``(n+1) P_{n+1} = (2n+1) x P_n - n P_{n-1}``; orthonormal under dx/2 on [-1, 1].
    """
    check_positive_int("N", N)
    polys = [torch.ones_like(x), x]
    for n in range(1, N - 1):
        polys.append(((2 * n + 1) * x * polys[n] - n * polys[n - 1]) / (n + 1))
    scale = torch.sqrt(2 * torch.arange(N, dtype=x.dtype, device=x.device) + 1)
    return torch.stack(polys[:N], dim=-1) * scale


def laguerre_basis(N: int, x: torch.Tensor) -> torch.Tensor:
    """Laguerre polynomials ``L_n(x)``, n < N: x (...) -> (..., N); orthonormal under e^{-x} dx on [0, inf).

    Recurrence ``(n+1) L_{n+1} = (2n+1-x) L_n - n L_{n-1}``.
    """
    check_positive_int("N", N)
    polys = [torch.ones_like(x), 1 - x]
    for n in range(1, N - 1):
        polys.append(((2 * n + 1 - x) * polys[n] - n * polys[n - 1]) / (n + 1))
    return torch.stack(polys[:N], dim=-1)


def fourier_basis(N: int, r: torch.Tensor) -> torch.Tensor:
    """``[1, sqrt2 cos(2 pi r), sqrt2 sin(2 pi r), sqrt2 cos(4 pi r), ...]`` (N functions): r (...) -> (..., N).

    Orthonormal on [0, 1]; the order matches the FouT state of :func:`ssmkit.ops.hippo_operators.hippo`.
    """
    check_positive_int("N", N)
    k = torch.arange(1, N // 2 + 1, dtype=r.dtype, device=r.device)
    angle = 2 * math.pi * r[..., None] * k  # (..., N//2)
    pairs = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1).flatten(-2) * math.sqrt(2.0)
    return torch.cat([torch.ones_like(r)[..., None], pairs], dim=-1)[..., :N]


def reconstruction_basis(measure: str, N: int, s: torch.Tensor, t: float, theta: float = 1.0) -> torch.Tensor:
    """The basis ``g_n(s)`` (..., N) that rebuilds ``u(s)`` from the state at time ``t`` (module docstring)."""
    check_choice("measure", measure, MEASURES)
    if measure == "legs":
        return legendre_basis(N, 2 * s / t - 1)
    if measure == "legt":
        return legendre_basis(N, 2 * (s - t) / theta + 1)
    if measure == "lagt":
        return laguerre_basis(N, t - s)
    return fourier_basis(N, (s - t) / theta + 1)


# --------------------------------------------------------------------------------------------------
# Running the ODE
# --------------------------------------------------------------------------------------------------
def hippo_states(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dt: float, method: str = "bilinear",
                 scale_invariant: bool = False, block: int = 256) -> torch.Tensor:
    """Feed samples ``u`` (..., T) through ``x' = A x + B u`` (or ``(A x + B u) / t`` when ``scale_invariant``,
    the LegS ODE) from ``x(0) = 0``; returns the state after every sample (..., T, N).

    ``A`` (N, N), ``B`` (N,). Discretisation as in the module docstring; for the time-varying case the
    per-step matrices are formed ``block`` steps at a time.
    """
    check_tensor("u", u)
    check_choice("method", method, METHODS)
    if u.dim() < 1 or u.shape[-1] < 1:
        raise ValueError(f"u must be (T,) or (batch, T) with T >= 1; got {tuple(u.shape)}")
    N = A.shape[-1]
    if tuple(A.shape) != (N, N) or tuple(B.shape) != (N,):
        raise ValueError(f"A must be (N, N) and B (N,); got A {tuple(A.shape)}, B {tuple(B.shape)}")
    A, B = A.to(u.dtype), B.to(u.dtype)
    T = u.shape[-1]
    samples = u.unbind(-1)
    x = torch.zeros(u.shape[:-1] + (N,), dtype=u.dtype, device=u.device)
    states = []
    if not scale_invariant:
        A_bar, B_bar = discretize_dense(A, B, torch.tensor(dt, dtype=u.dtype), method)
        for u_k in samples:
            x = x @ A_bar.T + u_k[..., None] * B_bar
            states.append(x)
        return torch.stack(states, dim=-2)
    if method == "bilinear":
        # x_k = (I - A/2k)^{-1} ((I + A/2k) x_{k-1} + B u_k / k): one solve per step with the state as its
        # right-hand side (O(N^2) for triangular A such as LegS), instead of forming A_bar (O(N^3))
        lower = bool(torch.equal(A, torch.tril(A)))
        eye = torch.eye(N, dtype=u.dtype, device=u.device)
        for k, u_k in enumerate(samples, start=1):
            rhs = x + (x @ A.T + 2 * u_k[..., None] * B) / (2 * k)  # (..., N)
            left = eye - A / (2 * k)
            if lower:
                x = torch.linalg.solve_triangular(left, rhs.reshape(-1, N).T, upper=False).T.reshape(rhs.shape)
            else:
                x = torch.linalg.solve(left, rhs.reshape(-1, N).T).T.reshape(rhs.shape)
            states.append(x)
        return torch.stack(states, dim=-2)
    for start in range(0, T, block):
        # exact in log time: step k spans ln(k / (k-1)); step 1 starts from tau = -inf
        k = torch.arange(start + 1, min(start + block, T) + 1, dtype=u.dtype, device=u.device)
        first = start == 0
        steps = torch.log(k[1:] / (k[1:] - 1)) if first else torch.log(k / (k - 1))
        A_bar, B_bar = discretize_dense(A, B, steps, "zoh")
        if first:
            A_bar = torch.cat([torch.zeros_like(A)[None], A_bar], dim=0)
            B_bar = torch.cat([-torch.linalg.solve(A, B)[None], B_bar], dim=0)
        for j in range(k.shape[0]):
            x = x @ A_bar[j].T + samples[start + j][..., None] * B_bar[j]
            states.append(x)
    return torch.stack(states, dim=-2)


def hippo_reconstruct(u: torch.Tensor, dt: float, measure: str, N: int, theta: float = 1.0,
                      method: str = "bilinear") -> HippoReconstruction:
    """Run HiPPO-``measure`` online over ``u`` and rebuild the history it covers from the final state.

    Args:
        u: (T,) or (batch, T) samples, u_k at t_k = k dt.
        dt: sampling step (> 0).
        measure: ``legs``, ``legt``, ``lagt`` or ``fout`` (:func:`ssmkit.ops.hippo_operators.hippo`).
        N: state size.
        theta: window length of legt / fout (ignored by legs and lagt).
        method: ``bilinear`` or ``zoh`` (module docstring).

    Returns:
        :class:`HippoReconstruction` (states over time, and the rebuilt history with its target samples).
    """
    check_tensor("u", u)
    if u.dim() not in (1, 2) or u.shape[-1] < 1:
        raise ValueError(f"u must be (T,) or (batch, T) with T >= 1; got {tuple(u.shape)}")
    check_choice("measure", measure, MEASURES)
    check_positive_int("N", N)
    for name, value in (("dt", dt), ("theta", theta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0; got {value!r}")
    A, B = hippo(measure, N, theta=theta, dtype=u.dtype)
    states = hippo_states(u, A, B, dt, method, scale_invariant=(measure == "legs"))
    T = u.shape[-1]
    t_end = T * dt
    first = 0 if measure in ("legs", "lagt") else max(T - int(round(theta / dt)), 0)
    times = (torch.arange(first + 1, T + 1, dtype=u.dtype, device=u.device) - 0.5) * dt
    basis = reconstruction_basis(measure, N, times, t_end, theta)  # (M, N)
    reconstruction = states[..., -1, :] @ basis.T
    return HippoReconstruction(states, times, reconstruction, u[..., first:])


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RMSE / RMS of the target over the last dimension: (..., M), (..., M) -> (...)."""
    return (estimate - target).pow(2).mean(-1).sqrt() / target.pow(2).mean(-1).sqrt()
