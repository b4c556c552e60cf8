"""Discretisation (ssmkit.ops.discretize): ZOH against the exact solution of the ODE, the diagonal and dense
forms against each other, bilinear and Euler against their formulas, dt broadcasting and errors."""

import pytest
import torch

from ssmkit.ops.discretize import METHODS, discretize_dense, discretize_diag


def _stable_dense(N, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(*batch, N, N, generator=g, dtype=torch.float64)
    return M - M.transpose(-1, -2) - 0.5 * torch.eye(N, dtype=torch.float64) - 0.1 * M @ M.transpose(-1, -2)


def _stable_diag(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    re = -torch.rand(shape, generator=g, dtype=torch.float64) - 0.1
    im = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    return torch.complex(re, im)


def _rk4_piecewise_constant(A, B, u, dt, substeps=200):
    """x' = A x + B u(t) with u held at u_k on (t_{k-1}, t_k], integrated by RK4 (independent of matrix
    exponentials); returns the states after each input. Works for dense A (N, N) and for diagonal A (N,)."""
    matvec = (lambda x: A @ x) if A.dim() == 2 else (lambda x: A * x)
    h = dt / substeps
    x = torch.zeros_like(B)
    out = []
    for u_k in u:
        for _ in range(substeps):
            f = lambda x: matvec(x) + B * u_k  # noqa: E731
            k1 = f(x)
            k2 = f(x + h / 2 * k1)
            k3 = f(x + h / 2 * k2)
            k4 = f(x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(x)
    return torch.stack(out)


def _run(Abar, Bbar, u, diagonal):
    x = torch.zeros_like(Bbar)
    out = []
    for u_k in u:
        x = (Abar * x if diagonal else Abar @ x) + Bbar * u_k
        out.append(x)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------------
# ZOH is exact for piecewise-constant inputs
# ------------------------------------------------------------------------------------------------------
def test_zoh_dense_is_the_exact_solution_for_piecewise_constant_input():
    N, dt = 5, 0.3
    A = _stable_dense(N)
    B = torch.randn(N, dtype=torch.float64)
    u = torch.randn(8, dtype=torch.float64)
    Abar, Bbar = discretize_dense(A, B, dt, "zoh")
    exact = _rk4_piecewise_constant(A, B, u, dt)
    torch.testing.assert_close(_run(Abar, Bbar, u, False), exact, atol=1e-9, rtol=0)
    # the check has teeth: the (second-order) bilinear rule is far outside that tolerance
    Abar, Bbar = discretize_dense(A, B, dt, "bilinear")
    assert (_run(Abar, Bbar, u, False) - exact).abs().max() > 1e-4


def test_zoh_diag_is_the_exact_solution_for_piecewise_constant_input():
    N, dt = 6, 0.25
    A = _stable_diag(N)
    B = torch.randn(N, dtype=torch.complex128)
    u = torch.randn(8, dtype=torch.float64)
    Abar, Bbar = discretize_diag(A, B, dt, "zoh")
    exact = _rk4_piecewise_constant(A, B, u, dt)
    torch.testing.assert_close(_run(Abar, Bbar, u, True), exact, atol=1e-9, rtol=0)
    Abar, Bbar = discretize_diag(A, B, dt, "bilinear")
    assert (_run(Abar, Bbar, u, True) - exact).abs().max() > 1e-4


def test_zoh_dense_handles_singular_A():
    # the augmented-matrix exponential needs no inverse: A = 0 gives Abar = I, Bbar = dt B
    B = torch.randn(3, dtype=torch.float64)
    Abar, Bbar = discretize_dense(torch.zeros(3, 3, dtype=torch.float64), B, 0.2, "zoh")
    torch.testing.assert_close(Abar, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(Bbar, 0.2 * B)


# ------------------------------------------------------------------------------------------------------
# Formulas, and diagonal == dense
# ------------------------------------------------------------------------------------------------------
def test_dense_bilinear_and_euler_match_their_formulas():
    N = 4
    A = _stable_dense(N, (3,))
    B = torch.randn(3, N, dtype=torch.float64)
    dt = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    eye = torch.eye(N, dtype=torch.float64)
    d = dt[:, None, None]
    Abar, Bbar = discretize_dense(A, B, dt, "bilinear")
    inv = torch.linalg.inv(eye - d / 2 * A)
    torch.testing.assert_close(Abar, inv @ (eye + d / 2 * A))
    torch.testing.assert_close(Bbar, (inv @ (dt[:, None] * B)[..., None])[..., 0])
    Abar, Bbar = discretize_dense(A, B, dt, "euler")
    torch.testing.assert_close(Abar, eye + d * A)
    torch.testing.assert_close(Bbar, dt[:, None] * B)
    Abar, _ = discretize_dense(A, B, dt, "zoh")
    torch.testing.assert_close(Abar, torch.linalg.matrix_exp(d * A))


def test_diag_bilinear_and_euler_match_their_formulas():
    A = _stable_diag((3, 5))
    B = torch.randn(3, 5, dtype=torch.complex128)
    dt = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)[:, None]
    Abar, Bbar = discretize_diag(A, B, dt[:, 0], "bilinear")
    torch.testing.assert_close(Abar, (1 + dt / 2 * A) / (1 - dt / 2 * A))
    torch.testing.assert_close(Bbar, dt * B / (1 - dt / 2 * A))
    Abar, Bbar = discretize_diag(A, B, dt[:, 0], "euler")
    torch.testing.assert_close(Abar, 1 + dt * A)
    torch.testing.assert_close(Bbar, dt * B)
    Abar, Bbar = discretize_diag(A, B, dt[:, 0], "zoh")
    torch.testing.assert_close(Abar, torch.exp(dt * A))
    torch.testing.assert_close(Bbar, (torch.exp(dt * A) - 1) / A * B)


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_equals_dense_on_a_diagonal_A(method):
    A = _stable_diag((2, 5))
    B = torch.randn(2, 5, dtype=torch.complex128)
    dt = torch.tensor([0.05, 0.7], dtype=torch.float64)
    Abar_d, Bbar_d = discretize_diag(A, B, dt, method)
    Abar, Bbar = discretize_dense(torch.diag_embed(A), B, dt, method)
    torch.testing.assert_close(Abar, torch.diag_embed(Abar_d), atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(Bbar, Bbar_d, atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_bilinear_and_zoh_agree_to_second_order_in_dt(method):
    # all three rules are consistent with the ODE: Abar = I + dt A + O(dt^2); bilinear and ZOH agree to O(dt^3)
    A = _stable_dense(4)
    B = torch.randn(4, dtype=torch.float64)
    errs = []
    for dt in (1e-2, 5e-3):
        Abar, _ = discretize_dense(A, B, dt, method)
        exact, _ = discretize_dense(A, B, dt, "zoh")
        errs.append((Abar - exact).abs().max().item())
    order = 2 if method == "euler" else (3 if method == "bilinear" else None)
    if order is None:
        assert errs == [0.0, 0.0]
    else:
        assert errs[0] / errs[1] == pytest.approx(2**order, rel=0.05)


# ------------------------------------------------------------------------------------------------------
# Broadcasting and errors
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_dt_broadcasts_over_leading_dimensions(method):
    A = _stable_diag(5)  # one A shared by 3 channels
    B = torch.randn(5, dtype=torch.complex128)
    dt = torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64)
    Abar, Bbar = discretize_diag(A, B, dt, method)
    assert Abar.shape == Bbar.shape == (3, 5)
    for h in range(3):
        a, b = discretize_diag(A, B, dt[h].item(), method)  # a Python float works too
        torch.testing.assert_close(Abar[h], a)
        torch.testing.assert_close(Bbar[h], b)

    Ad = _stable_dense(4)
    Bd = torch.randn(4, dtype=torch.float64)
    Abar, Bbar = discretize_dense(Ad, Bd, dt, method)
    assert Abar.shape == (3, 4, 4) and Bbar.shape == (3, 4)
    for h in range(3):
        a, b = discretize_dense(Ad, Bd, dt[h], method)
        torch.testing.assert_close(Abar[h], a)
        torch.testing.assert_close(Bbar[h], b)
    # dt (2, 1) against A (3, N, N) broadcasts to (2, 3)
    A3 = _stable_dense(4, (3,))
    Abar, Bbar = discretize_dense(A3, Bd, dt[:2, None], method)
    assert Abar.shape == (2, 3, 4, 4) and Bbar.shape == (2, 3, 4)
    torch.testing.assert_close(Abar[1, 2], discretize_dense(A3[2], Bd, dt[1], method)[0])


def test_float32_stays_float32():
    A = _stable_diag(4).to(torch.complex64)
    Abar, Bbar = discretize_diag(A, torch.ones(4, dtype=torch.complex64), torch.tensor(0.1), "zoh")
    assert Abar.dtype == Bbar.dtype == torch.complex64
    Ad = _stable_dense(3).float()
    Abar, Bbar = discretize_dense(Ad, torch.ones(3), 0.1, "bilinear")
    assert Abar.dtype == Bbar.dtype == torch.float32


def test_bad_arguments_are_refused():
    A = _stable_dense(3)
    B = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"method must be one of \['bilinear', 'euler', 'zoh'\]; got 'tustin'"):
        discretize_dense(A, B, 0.1, "tustin")
    with pytest.raises(ValueError, match="method must be one of"):
        discretize_diag(torch.diagonal(A), B, 0.1, "ZOH")
    with pytest.raises(ValueError, match=r"A must be \(\.\.\., N, N\); got \(3, 4\)"):
        discretize_dense(torch.zeros(3, 4, dtype=torch.float64), B, 0.1)
    with pytest.raises(ValueError, match=r"B must be \(\.\.\., N=3\); got \(4,\)"):
        discretize_dense(A, torch.ones(4, dtype=torch.float64), 0.1)
