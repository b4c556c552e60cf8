"""HiPPO operators (ssmkit.ops.hippo_operators): the matrices against their formulas, stability, the ODE against the
projection it is meant to track, the NPLR form of LegS, conjugate halves and the S4D initialisations."""

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import laguerre, legendre

from ssmkit.ops.hippo_operators import MEASURES, conjugate_half, hippo, nplr_legs, nplr_reconstruct, s4d_init


# ------------------------------------------------------------------------------------------------------
# The matrices
# ------------------------------------------------------------------------------------------------------
def test_legs_entries_match_the_formula():
    # REFERENCE.md: A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k); B_n = sqrt(2n+1)
    N = 7
    A, B = hippo("legs", N)
    for n in range(N):
        assert B[n].item() == pytest.approx(math.sqrt(2 * n + 1), rel=1e-15)
        for k in range(N):
            want = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) if n > k else (-(n + 1) if n == k else 0.0)
            assert A[n, k].item() == pytest.approx(want, rel=1e-15, abs=0), (n, k)


def test_shapes_and_dtype():
    for measure in MEASURES:
        A, B = hippo(measure, 5)
        assert A.shape == (5, 5) and B.shape == (5,) and A.dtype == B.dtype == torch.float64
        A32, _ = hippo(measure, 5, dtype=torch.float32)
        assert A32.dtype == torch.float32


@pytest.mark.parametrize("N", [1, 2, 7, 16, 64])
@pytest.mark.parametrize("measure", MEASURES)
def test_every_measure_is_stable(measure, N):
    A, _ = hippo(measure, N)
    # Marginal stability: no eigenvalue to the right of the imaginary axis (to rounding). LagT's A is one
    # Jordan block at -1, so its computed eigenvalues scatter by ~eps^(1/N); they stay left of the axis.
    assert torch.linalg.eigvals(A).real.max().item() < 1e-9
    if measure == "legs":
        # triangular: the eigenvalues are exactly the diagonal -(n+1)
        ev = torch.sort(torch.linalg.eigvals(A).real).values
        torch.testing.assert_close(ev, -torch.arange(N, 0, -1, dtype=torch.float64))
    else:
        # the time-invariant measures are contractions: A + A^T is negative semi-definite, so
        # |exp(tA)| <= 1 in the 2-norm for every t >= 0
        assert torch.linalg.eigvalsh(A + A.T).max().item() < 1e-9 * max(1.0, A.abs().max().item())
        assert torch.linalg.matrix_norm(torch.linalg.matrix_exp(50.0 * A), ord=2).item() <= 1 + 1e-9


def test_theta_scales_the_window_measures():
    for measure in ("legt", "fout"):
        A1, B1 = hippo(measure, 6, theta=1.0)
        A2, B2 = hippo(measure, 6, theta=2.5)
        torch.testing.assert_close(A2, A1 / 2.5)
        torch.testing.assert_close(B2, B1 / 2.5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="measure must be one of"):
        hippo("legendre", 4)
    with pytest.raises(ValueError, match="N must be >= 1; got 0"):
        hippo("legs", 0)
    with pytest.raises(TypeError, match="N must be an int"):
        hippo("legs", 4.0)
    with pytest.raises(ValueError, match="theta must be > 0"):
        hippo("legt", 4, theta=0.0)


# ------------------------------------------------------------------------------------------------------
# The ODE tracks the projection of the input onto the documented basis
# ------------------------------------------------------------------------------------------------------
# For an input the basis represents exactly (a polynomial of degree < N for the Legendre and Laguerre
# measures, a trigonometric polynomial of period theta for FouT) the HiPPO ODE started from the exact
# projection at t0 must reproduce the exact projection at t1. The coefficients are computed here by
# Gauss quadrature against the basis written in the hippo module docstring, and the ODE is integrated with
# a fine RK4 (error ~1e-13), so this checks the matrices and the docstring together.

_GAUSS_X, _GAUSS_W = legendre.leggauss(40)


def _rk4(f, x, t0, t1, steps=1000):
    h = (t1 - t0) / steps
    t = t0
    for _ in range(steps):
        k1 = f(t, x)
        k2 = f(t + h / 2, x + h / 2 * k1)
        k3 = f(t + h / 2, x + h / 2 * k2)
        k4 = f(t + h, x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += h
    return x


def _legendre_coefficients(u, N, lo, hi, basis_argument):
    """c_n = (1 / (hi - lo)) int_lo^hi u(s) sqrt(2n+1) P_n(basis_argument(s)) ds."""
    s = lo + (_GAUSS_X + 1) / 2 * (hi - lo)
    x = basis_argument(s)
    return np.array([(_GAUSS_W * u(s) * math.sqrt(2 * n + 1) * legendre.legval(x, np.eye(N)[n])).sum() / 2
                     for n in range(N)])


def _poly(s):
    return 1 + 2 * s - 0.5 * s**2 + 0.3 * s**3


def test_legs_ode_tracks_the_projection_on_the_growing_window():
    N = 8
    A, B = (m.numpy() for m in hippo("legs", N))

    def coef(t):  # u(s) ~ sum_n x_n sqrt(2n+1) P_n(2 s / t - 1) on [0, t]
        return _legendre_coefficients(_poly, N, 0.0, t, lambda s: 2 * s / t - 1)

    x = _rk4(lambda t, x: (A @ x + B * _poly(t)) / t, coef(1.0), 1.0, 3.0)
    np.testing.assert_allclose(x, coef(3.0), atol=1e-10)


def test_legt_ode_tracks_the_projection_on_the_sliding_window():
    N, theta = 8, 1.0
    A, B = (m.numpy() for m in hippo("legt", N, theta=theta))

    def coef(t):
        return _legendre_coefficients(_poly, N, t - theta, t, _legt_documented_argument(t, theta))

    x = _rk4(lambda t, x: A @ x + B * _poly(t), coef(1.0), 1.0, 2.0)
    np.testing.assert_allclose(x, coef(2.0), atol=1e-10)


def _legt_documented_argument(t, theta):
    # hippo module docstring: u(s) ~ sum_n x_n sqrt(2n+1) P_n(2 (s - t) / theta + 1)
    return lambda s: 2 * (s - t) / theta + 1


def test_legt_orientation_matters():
    # The mirrored basis P_n(2(t - s)/theta - 1) = (-1)^n P_n(...) is a different system: the ODE must not
    # track it, so the test above really checks the documented orientation.
    N, theta = 8, 1.5
    A, B = (m.numpy() for m in hippo("legt", N, theta=theta))

    def coef(t):
        return _legendre_coefficients(_poly, N, t - theta, t, lambda s: 2 * (t - s) / theta - 1)

    x = _rk4(lambda t, x: A @ x + B * _poly(t), coef(1.0), 1.0, 2.0)
    assert np.abs(x - coef(2.0)).max() > 1e-2


def test_lagt_ode_tracks_the_laguerre_projection():
    # u(s) ~ sum_n x_n L_n(t - s) under the measure e^{-(t - s)} on (-inf, t]
    N = 8
    A, B = (m.numpy() for m in hippo("lagt", N))
    nodes, weights = laguerre.laggauss(60)

    def coef(t):
        return np.array([(weights * _poly(t - nodes) * laguerre.lagval(nodes, np.eye(N)[n])).sum()
                         for n in range(N)])

    x = _rk4(lambda t, x: A @ x + B * _poly(t), coef(0.0), 0.0, 2.0)
    np.testing.assert_allclose(x, coef(2.0), rtol=1e-10, atol=1e-10)


def test_fout_ode_tracks_the_fourier_projection_of_a_periodic_input():
    # basis [1, sqrt2 cos(2 pi k r), sqrt2 sin(2 pi k r), ...] with r = (s - t)/theta + 1; for an input of
    # period theta the sample leaving the window equals the reconstruction, so the ODE is exact
    N, theta = 9, 1.0
    A, B = (m.numpy() for m in hippo("fout", N, theta=theta))

    def u(s):
        return 0.5 + np.cos(2 * np.pi * s) + 0.3 * np.sin(4 * np.pi * s + 0.2)

    def coef(t):
        s = t - theta + (_GAUSS_X + 1) / 2 * theta
        r = (s - t) / theta + 1
        basis = [np.ones_like(r)]
        for k in range(1, N // 2 + 1):
            basis += [math.sqrt(2) * np.cos(2 * np.pi * k * r), math.sqrt(2) * np.sin(2 * np.pi * k * r)]
        return np.array([(_GAUSS_W * u(s) * g).sum() / 2 for g in basis[:N]])

    x = _rk4(lambda t, x: A @ x + B * u(t), coef(1.0), 1.0, 1.7)
    np.testing.assert_allclose(x, coef(1.7), atol=1e-10)


# ------------------------------------------------------------------------------------------------------
# NPLR form of LegS and conjugate halves
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [8, 64, 65])
def test_nplr_legs_reconstructs_A(N):
    A, B = hippo("legs", N)
    nplr = nplr_legs(N)
    assert nplr.Lambda.shape == (N,) and nplr.P.shape == (1, N) and nplr.V.shape == (N, N)
    rebuilt = nplr_reconstruct(nplr)
    err = (rebuilt - A).abs().max() / A.abs().max()
    assert err < 1e-6, f"relative reconstruction error {err:.3g}"
    assert rebuilt.imag.abs().max() < 1e-6 * A.abs().max()
    # V unitary, B in V's basis, Q = P = V^* sqrt(n + 1/2), Re Lambda = -1/2 (S4 Thm. 1)
    eye = torch.eye(N, dtype=torch.complex128)
    torch.testing.assert_close(nplr.V.conj().T @ nplr.V, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(nplr.V @ nplr.B, B.to(torch.complex128), atol=1e-10, rtol=0)
    torch.testing.assert_close(nplr.Q, nplr.P)
    P = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5).to(torch.complex128)
    torch.testing.assert_close(nplr.V @ nplr.P[0], P, atol=1e-10, rtol=0)
    torch.testing.assert_close(nplr.Lambda.real, torch.full((N,), -0.5, dtype=torch.float64), atol=1e-10, rtol=0)


def test_nplr_legs_dtype():
    assert nplr_legs(4, dtype=torch.complex64).Lambda.dtype == torch.complex64


@pytest.mark.parametrize("N", [2, 8, 16])
def test_conjugate_half_keeps_one_of_each_pair(N):
    full = nplr_legs(N)
    half = conjugate_half(full)
    assert half.Lambda.shape == (N // 2,) and half.P.shape == (1, N // 2) and half.V.shape == (N, N // 2)
    assert (half.Lambda.imag > 0).all()
    # the kept modes and their conjugates are exactly the full spectrum (Re Lambda = -1/2 for every mode,
    # so sorting by the imaginary part pairs them up)
    both = torch.cat([half.Lambda, half.Lambda.conj()])
    torch.testing.assert_close(both[torch.argsort(both.imag)], full.Lambda[torch.argsort(full.Lambda.imag)])
    # Each dropped mode is the conjugate of a kept one, with eigenvectors conj(V): the real system is
    # rebuilt from the half alone as 2 Re(...) of the kept terms.
    A, B = hippo("legs", N)
    V = half.V
    S = 2 * (V @ torch.diag(half.Lambda) @ V.conj().T).real
    P = 2 * (V @ half.P[0]).real
    Q = 2 * (V @ half.Q[0]).real
    # back in the original basis the low-rank vectors are real: V_full P_full = 2 Re(V_half P_half)
    torch.testing.assert_close(P, torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5), atol=1e-10, rtol=0)
    torch.testing.assert_close(S - torch.outer(P, Q), A, atol=1e-10, rtol=0)
    torch.testing.assert_close(2 * (V @ half.B).real, B, atol=1e-10, rtol=0)


def test_conjugate_half_refuses_odd_N():
    with pytest.raises(ValueError, match="even state size N; got N=65"):
        conjugate_half(nplr_legs(65))


# ------------------------------------------------------------------------------------------------------
# S4D initialisations
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [2, 16, 64])
def test_s4d_init_formulas(N):
    n = torch.arange(N // 2, dtype=torch.float64)
    lin = s4d_init("lin", N)
    inv = s4d_init("inv", N)
    real = s4d_init("real", N)
    for A in (lin, inv, real):
        assert A.shape == (N // 2,) and A.dtype == torch.complex128
    torch.testing.assert_close(lin, torch.complex(torch.full_like(n, -0.5), math.pi * n))
    torch.testing.assert_close(inv, torch.complex(torch.full_like(n, -0.5), N / math.pi * (N / (2 * n + 1) - 1)))
    torch.testing.assert_close(real, torch.complex(-(n + 1), torch.zeros_like(n)))
    legs = s4d_init("legs", N)
    torch.testing.assert_close(legs, conjugate_half(nplr_legs(N)).Lambda)
    assert (legs.imag > 0).all()


def test_s4d_init_errors_and_dtype():
    assert s4d_init("lin", 8, dtype=torch.complex64).dtype == torch.complex64
    with pytest.raises(ValueError, match="must be even"):
        s4d_init("lin", 7)
    with pytest.raises(ValueError, match="kind must be one of"):
        s4d_init("linear", 8)
    with pytest.raises(ValueError, match="N must be >= 2"):
        s4d_init("lin", 0)
