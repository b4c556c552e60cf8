"""S4's DPLR kernel (ssmkit.ops.dplr): Cauchy sums against their specification (values and gradients),
the real-coordinate system against the complex one and against HiPPO-LegS, Algorithm 1 against plain
powering (values and gradients), the initial-state response and the final state."""

import pytest
import torch

from ssmkit.ops.discretize import discretize_dense
from ssmkit.ops.dplr import (cauchy, cauchy_ref, complex_to_real, discretize_dplr, dplr_real_system,
                             dplr_state_input, final_state_dense, kernel_dplr, output_to_real, real_to_complex)
from ssmkit.ops.hippo_operators import conjugate_half, hippo, nplr_legs
from ssmkit.ops.lti_kernels import kernel_ref

CD = torch.complex128


def _rel(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _random_system(H=3, M=4, r=1, seed=0, dtype=CD, with_Q=False):
    """A random DPLR system, stable in its diagonal part (the full A need not be)."""
    g = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype == CD else torch.float32

    def cn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    Lambda = torch.complex(-torch.rand(H, M, generator=g, dtype=real) - 0.1,
                           3 * torch.randn(H, M, generator=g, dtype=real))
    P = 0.5 * cn(r, H, M)
    Q = 0.5 * cn(r, H, M) if with_Q else None
    dt = 0.01 + 0.2 * torch.rand(H, generator=g, dtype=real)
    return dict(Lambda=Lambda, P=P, Q=Q, B=cn(H, M), C=cn(H, M), dt=dt)


def _legs_system(N, H=3, seed=0):
    legs = conjugate_half(nplr_legs(N))
    g = torch.Generator().manual_seed(seed)
    M = N // 2
    return dict(Lambda=legs.Lambda.expand(H, M).clone(), P=legs.P[:, None].expand(1, H, M).clone(), Q=None,
                B=legs.B.expand(H, M).clone(), C=torch.randn(H, M, generator=g, dtype=CD),
                dt=torch.tensor([1e-3, 1e-2, 1e-1][:H] + [0.05] * (H - 3), dtype=torch.float64))


def _full_complex_system(s):
    """The N complex modes written out: A = diag([Lambda, conj Lambda]) - sum_r p_r q_r^*, b, c (per channel)."""
    Q = s["P"] if s["Q"] is None else s["Q"]
    full = lambda x: torch.cat([x, x.conj()], -1)  # noqa: E731
    p, q = full(s["P"]), full(Q)  # (r, H, N)
    A = torch.diag_embed(full(s["Lambda"])) - torch.einsum("rhi,rhj->hij", p, q.conj())
    return A, full(s["B"]), full(s["C"])


def _naive_kernel(s, L):
    d = discretize_dplr(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], Q=s["Q"])
    return kernel_ref(d.dA, d.dB, d.C, L)


# ------------------------------------------------------------------------------------------------------
# Cauchy sums
# ------------------------------------------------------------------------------------------------------
def test_cauchy_ref_is_the_sum():
    v, z, w = torch.randn(5, dtype=CD), torch.randn(7, dtype=CD), torch.randn(5, dtype=CD)
    want = torch.stack([sum(v[n] / (z[l] - w[n]) for n in range(5)) for l in range(7)])
    torch.testing.assert_close(cauchy_ref(v, z, w), want)


@pytest.mark.parametrize("chunk", [1, 3, 11, 100, None])
def test_cauchy_equals_naive_with_rows_and_broadcasting(chunk):
    v = torch.randn(2, 3, 4, 6, dtype=CD)  # rows (2, 3) in front of lead (4,)
    z = torch.randn(4, 11, dtype=CD)
    w = torch.randn(1, 6, dtype=CD)  # broadcast over lead
    out = cauchy(v, z, w, chunk=chunk)
    assert out.shape == (2, 3, 4, 11)
    torch.testing.assert_close(out, cauchy_ref(v, z, w), rtol=1e-12, atol=1e-12)
    # v broadcast over lead, z shared
    v1 = torch.randn(3, 1, 6, dtype=CD)
    torch.testing.assert_close(cauchy(v1, z[0], w, chunk=chunk), cauchy_ref(v1, z[0], w), rtol=1e-12, atol=1e-12)


def test_cauchy_complex64():
    v, z, w = (torch.randn(4, n, dtype=torch.complex64) for n in (6, 9, 6))
    torch.testing.assert_close(cauchy(v, z, w, chunk=2), cauchy_ref(v, z, w))


@pytest.mark.parametrize("chunk", [2, None])
def test_cauchy_gradients_equal_naive(chunk):
    v = torch.randn(3, 4, 6, dtype=CD, requires_grad=True)
    z = torch.randn(1, 9, dtype=CD, requires_grad=True)  # broadcast over lead: its gradient sums over it
    w = torch.randn(4, 6, dtype=CD, requires_grad=True)
    weight = torch.randn(3, 4, 9, dtype=CD)

    def grads(fn):
        out = fn(v, z, w)
        return torch.autograd.grad((out * weight).real.sum(), [v, z, w])

    for got, want in zip(grads(lambda *a: cauchy(*a, chunk=chunk)), grads(cauchy_ref)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    # and only what is asked for
    (gz,) = torch.autograd.grad(cauchy(v.detach(), z, w.detach(), chunk=chunk).real.sum(), [z])
    (gz_ref,) = torch.autograd.grad(cauchy_ref(v.detach(), z, w.detach()).real.sum(), [z])
    torch.testing.assert_close(gz, gz_ref)


def test_cauchy_gradcheck():
    args = [torch.randn(2, n, dtype=CD, requires_grad=True) for n in (3, 5, 3)]
    assert torch.autograd.gradcheck(lambda v, z, w: cauchy(v, z, w, chunk=2), args)


def test_cauchy_errors():
    c = torch.randn(3, dtype=CD)
    with pytest.raises(TypeError, match="v must be a complex tensor; got dtype torch.float64"):
        cauchy(c.real, c, c)
    with pytest.raises(TypeError, match="share one complex dtype"):
        cauchy(c, c.to(torch.complex64), c)
    with pytest.raises(ValueError, match=r"v must be \(\.\.\., N=3\) to match the nodes w; got \(4,\)"):
        cauchy(torch.randn(4, dtype=CD), c, c)
    with pytest.raises(ValueError, match="chunk must be >= 1; got 0"):
        cauchy(c, c, c, chunk=0)


# ------------------------------------------------------------------------------------------------------
# The system in real coordinates
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [1, 2])
def test_real_system_is_the_complex_system_in_real_coordinates(r):
    s = _random_system(M=5, r=r, with_Q=r == 2)
    A_full, b, c = _full_complex_system(s)
    M = 5
    eye = torch.eye(M, dtype=CD)
    T = torch.cat([torch.cat([eye, 1j * eye], 1), torch.cat([eye, -1j * eye], 1)])  # x_full = T z
    A_real = dplr_real_system(s["Lambda"], s["P"], s["Q"])
    assert A_real.dtype == torch.float64 and A_real.shape == (3, 10, 10)
    torch.testing.assert_close(A_real.to(CD), torch.linalg.solve(T, A_full @ T), atol=1e-12, rtol=0)
    torch.testing.assert_close(complex_to_real(s["B"]).to(CD), torch.linalg.solve(T, b[..., None])[..., 0],
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(output_to_real(s["C"]).to(CD), (c[..., None, :] @ T)[..., 0, :], atol=1e-12, rtol=0)
    z = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(real_to_complex(z), (T @ z.to(CD)[..., None])[..., :M, 0])
    torch.testing.assert_close(complex_to_real(real_to_complex(z)), z)


@pytest.mark.parametrize("N", [8, 16])
def test_real_system_of_the_legs_half_is_hippo_legs(N):
    # W = V_full T = [2 Re V_half, -2 Im V_half] maps the real coordinates back to the HiPPO basis
    legs = conjugate_half(nplr_legs(N))
    A_real = dplr_real_system(legs.Lambda[None], legs.P[:, None])[0]
    B_real = complex_to_real(legs.B)
    W = torch.cat([2 * legs.V.real, -2 * legs.V.imag], 1)
    A, B = hippo("legs", N)
    torch.testing.assert_close(W @ A_real, A @ W, atol=1e-9, rtol=0)
    torch.testing.assert_close(W @ B_real, B, atol=1e-10, rtol=0)
    # W is invertible (V is unitary, so W / sqrt(2) is orthogonal): the two systems are similar. (Comparing
    # eigenvalues instead would test eigvals: LegS is so non-normal that they come out only to ~1e-4.)
    torch.testing.assert_close(W.T @ W, 2 * torch.eye(N, dtype=torch.float64), atol=1e-10, rtol=0)


def test_discretize_dplr_is_the_bilinear_rule_of_the_complex_system():
    s = _random_system(M=4, r=2, with_Q=True)
    A_full, b, c = _full_complex_system(s)
    dA_full, dB_full = discretize_dense(A_full, b, s["dt"], "bilinear")
    d = discretize_dplr(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], Q=s["Q"])
    assert d.dA.shape == (3, 8, 8) and d.dB.shape == (3, 8) and d.C.shape == (3, 8)
    # the kernels agree: c^T dA_full^k dB_full (complex basis) == C dA^k dB (real basis), and is real
    K_full = kernel_ref(dA_full, dB_full, c, 30)
    assert K_full.imag.abs().max() < 1e-10
    torch.testing.assert_close(kernel_ref(d.dA, d.dB, d.C, 30), K_full.real, atol=1e-11, rtol=0)


# ------------------------------------------------------------------------------------------------------
# Algorithm 1 against powering
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [1, 2, 63, 64, 200])
@pytest.mark.parametrize("N", [8, 16])
def test_kernel_equals_powering(N, L):
    for s in (_random_system(M=N // 2, seed=N), _legs_system(N)):
        K = kernel_dplr(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], L, Q=s["Q"])
        assert K.shape == (3, L) and K.dtype == torch.float64
        assert _rel(K, _naive_kernel(s, L)) < 1e-10


@pytest.mark.parametrize("L", [17, 64])
def test_kernel_rank_two_with_separate_Q(L):
    s = _random_system(M=6, r=2, with_Q=True, seed=3)
    K = kernel_dplr(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], L, Q=s["Q"])
    assert _rel(K, _naive_kernel(s, L)) < 1e-10


def test_kernel_is_exactly_the_complex_system_kernel():
    # independent of the real-coordinate code: powering the N-mode complex system itself
    s = _random_system(M=4, r=1, seed=5)
    A_full, b, c = _full_complex_system(s)
    dA, dB = discretize_dense(A_full, b, s["dt"], "bilinear")
    want = kernel_ref(dA, dB, c, 50).real
    K = kernel_dplr(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], 50)
    assert _rel(K, want) < 1e-10


def test_several_B_and_C_rows_at_once():
    s = _random_system(M=4, r=2, with_Q=True)
    Bs = torch.randn(5, 3, 4, dtype=CD)
    Cs = torch.randn(2, 1, 3, 4, dtype=CD)
    K = kernel_dplr(s["Lambda"], s["P"], Bs, Cs, s["dt"], 40, Q=s["Q"])
    assert K.shape == (2, 5, 3, 40)
    for i in range(2):
        for j in (0, 4):
            one = kernel_dplr(s["Lambda"], s["P"], Bs[j], Cs[i, 0], s["dt"], 40, Q=s["Q"])
            torch.testing.assert_close(K[i, j], one, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("chunk", [1, 5])
def test_chunk_changes_nothing(chunk):
    s = _random_system(M=4)
    args = (s["Lambda"], s["P"], s["B"], s["C"], s["dt"], 63)
    torch.testing.assert_close(kernel_dplr(*args, chunk=chunk), kernel_dplr(*args), rtol=1e-12, atol=1e-14)


def test_kernel_float32_is_accurate():
    s = _legs_system(16)
    s32 = {k: (v.to(torch.complex64) if v.is_complex() else v.float()) if v is not None else None
           for k, v in s.items()}
    K32 = kernel_dplr(s32["Lambda"], s32["P"], s32["B"], s32["C"], s32["dt"], 1000)
    K64 = kernel_dplr(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], 1000)
    assert K32.dtype == torch.float32
    assert _rel(K32.double(), K64) < 1e-5


@pytest.mark.parametrize("L", [63, 64])
def test_kernel_gradients_equal_powering_gradients(L):
    s = _random_system(H=2, M=4, r=1, seed=1)
    names = ["Lambda", "P", "B", "C", "dt"]
    weight = torch.randn(2, L, dtype=torch.float64)

    def grads(kernel_fn):
        leaves = {k: s[k].clone().requires_grad_() for k in names}
        K = kernel_fn({**s, **leaves})
        return torch.autograd.grad((K * weight).sum(), [leaves[k] for k in names])

    fast = grads(lambda t: kernel_dplr(t["Lambda"], t["P"], t["B"], t["C"], t["dt"], L))
    slow = grads(lambda t: _naive_kernel(t, L))
    for name, a, b in zip(names, fast, slow):
        assert _rel(a, b) < 1e-8, name


# ------------------------------------------------------------------------------------------------------
# Initial state and final state
# ------------------------------------------------------------------------------------------------------
def _run(d, u, h0):
    """The recurrence step by step: outputs (batch, H, L) and final state."""
    h, ys = h0, []
    for u_k in u.unbind(-1):
        h = (d.dA @ h[..., None])[..., 0] + d.dB * u_k[..., None]
        ys.append((d.C * h).sum(-1))
    return torch.stack(ys, -1), h


def test_state_input_gives_the_free_response():
    s = _random_system(M=4, r=2, with_Q=True)
    d = discretize_dplr(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], Q=s["Q"])
    h0 = torch.randn(2, 3, 8, dtype=torch.float64)
    b = dplr_state_input(s["Lambda"], s["P"], h0, s["dt"], Q=s["Q"])
    assert b.shape == (2, 3, 4) and b.is_complex()
    K = kernel_dplr(s["Lambda"], s["P"], b, s["C"], s["dt"], 30, Q=s["Q"])
    free, _ = _run(d, torch.zeros(2, 3, 30, dtype=torch.float64), h0)  # C dA^{k+1} h0
    assert _rel(K, free) < 1e-10


@pytest.mark.parametrize("block", [None, 1, 7, 50, 64])
def test_final_state_equals_recurrence(block):
    s = _random_system(M=4, r=2, with_Q=True)
    d = discretize_dplr(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], Q=s["Q"])
    u = torch.randn(2, 3, 50, dtype=torch.float64)
    h0 = torch.randn(2, 3, 8, dtype=torch.float64)
    _, want = _run(d, u, h0)
    torch.testing.assert_close(final_state_dense(d.dA, d.dB, u, h0, block=block), want, rtol=1e-11, atol=1e-12)
    _, want0 = _run(d, u, torch.zeros_like(h0))
    torch.testing.assert_close(final_state_dense(d.dA, d.dB, u, block=block), want0, rtol=1e-11, atol=1e-12)


def test_final_state_gradients_equal_recurrence():
    s = _random_system(H=2, M=3)
    d = discretize_dplr(s["Lambda"], s["P"], s["B"], s["C"], s["dt"])
    leaves = [d.dA.clone(), d.dB.clone(), torch.randn(2, 2, 23, dtype=torch.float64),
              torch.randn(2, 2, 6, dtype=torch.float64)]
    weight = torch.randn(2, 2, 6, dtype=torch.float64)

    def grads(fn):
        xs = [x.clone().requires_grad_() for x in leaves]
        return torch.autograd.grad((fn(*xs) * weight).sum(), xs)

    fast = grads(lambda dA, dB, u, h0: final_state_dense(dA, dB, u, h0, block=5))
    slow = grads(lambda dA, dB, u, h0: _run(type(d)(dA, dB, d.C), u, h0)[1])
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------
def test_bad_arguments_are_refused():
    s = _random_system(M=4)
    Lam, P, B, C, dt = s["Lambda"], s["P"], s["B"], s["C"], s["dt"]
    with pytest.raises(ValueError, match=r"Lambda must be a complex \(H, M\) tensor"):
        kernel_dplr(Lam.real, P, B, C, dt, 8)
    with pytest.raises(ValueError, match=r"P must be a torch.complex128 \(rank, H=3, M=4\) tensor; got .* \(3, 4\)"):
        kernel_dplr(Lam, P[0], B, C, dt, 8)
    with pytest.raises(ValueError, match=r"B must be a torch.complex128 \(\.\.\., H=3, M=4\) tensor; got .* \(3, 5\)"):
        kernel_dplr(Lam, P, torch.randn(3, 5, dtype=CD), C, dt, 8)
    with pytest.raises(ValueError, match=r"C must be a torch.complex128 \(\.\.\., H=3, M=4\)"):
        kernel_dplr(Lam, P, B, C.to(torch.complex64), dt, 8)
    with pytest.raises(ValueError, match=r"dt must be a torch.float64 \(H=3,\) tensor; got torch.float64 \(1,\)"):
        kernel_dplr(Lam, P, B, C, dt[:1], 8)
    with pytest.raises(ValueError, match="L must be >= 1; got 0"):
        kernel_dplr(Lam, P, B, C, dt, 0)
    with pytest.raises(ValueError, match="Q must have the shape of P"):
        kernel_dplr(Lam, P, B, C, dt, 8, Q=torch.cat([P, P]))
    with pytest.raises(ValueError, match=r"B must be \(H=3, M=4\) for the recurrent matrices"):
        discretize_dplr(Lam, P, B[None], C, dt)
    with pytest.raises(ValueError, match=r"h0 must be \(\.\.\., H=3, N=8\); got \(2, 3, 4\)"):
        dplr_state_input(Lam, P, torch.randn(2, 3, 4, dtype=torch.float64), dt)
    d = discretize_dplr(Lam, P, B, C, dt)
    with pytest.raises(ValueError, match=r"u must be \(batch, H=3, L\); got \(2, 4, 5\)"):
        final_state_dense(d.dA, d.dB, torch.randn(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"h0 must be \(batch=2, H=3, N=8\)"):
        final_state_dense(d.dA, d.dB, torch.randn(2, 3, 5, dtype=torch.float64), torch.zeros(1, 3, 8))
