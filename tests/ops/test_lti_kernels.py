"""LTI kernels and state terms (ops/lti_kernels.py) against their step-by-step specifications."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssmkit.ops.fftconv import fft_conv
from ssmkit.ops.lti_kernels import (block_split, diagonal_ssm_ref, final_state, initial_state_response,
                                    kernel_ref, kernel_vandermonde)

from ..helpers import assert_close_scaled

C128 = torch.complex128


def stable_modes(H, N2, dtype=C128):
    """log Abar with Re in [-0.5, -0.01] (slow and fast decay) and Im in [-3, 3] (oscillation)."""
    re = -(0.01 + 0.49 * torch.rand(H, N2, dtype=torch.float64))
    im = 6 * torch.rand(H, N2, dtype=torch.float64) - 3
    return torch.complex(re, im).to(dtype)


def crandn(*shape, dtype=C128):
    return torch.randn(*shape, dtype=dtype)


# ------------------------------------------------------------------------------------------------------
# kernel_ref: the specification itself, checked against matrix powers
# ------------------------------------------------------------------------------------------------------
def test_kernel_naive_dense_equals_matrix_powers():
    N, L = 5, 9
    Abar = 0.4 * torch.randn(3, N, N, dtype=torch.float64)
    Bbar, C = torch.randn(3, N, dtype=torch.float64), torch.randn(3, N, dtype=torch.float64)
    K = kernel_ref(Abar, Bbar, C, L)
    expected = torch.stack([(C[:, None, :] @ torch.linalg.matrix_power(Abar, k) @ Bbar[:, :, None])[:, 0, 0]
                            for k in range(L)], -1)
    assert K.shape == (3, L) and K.dtype == torch.float64
    assert_close_scaled(K, expected, 1e-12, "dense kernel")


def test_kernel_naive_diagonal_equals_dense_diagonal_matrix():
    Abar = 0.9 * torch.exp(crandn(2, 6))
    Abar = Abar / Abar.abs().clamp_min(1)  # |Abar| <= 1
    Bbar, C = crandn(2, 6), crandn(4, 2, 6)  # C carries an extra leading (output) dimension
    K_diag = kernel_ref(Abar, Bbar, C, 11, diagonal=True)
    K_dense = kernel_ref(torch.diag_embed(Abar), Bbar, C, 11)
    assert K_diag.shape == (4, 2, 11) and K_diag.is_complex()
    assert_close_scaled(torch.view_as_real(K_diag), torch.view_as_real(K_dense), 1e-12, "diag vs dense")


def test_kernel_naive_refuses_ambiguous_or_mismatched_shapes():
    with pytest.raises(ValueError, match=r"pass diagonal=True"):
        kernel_ref(torch.randn(4), torch.randn(4), torch.randn(4), 3)
    with pytest.raises(ValueError, match=r"Abar \(diagonal\) must be \(\.\.\., N=4\)"):
        kernel_ref(torch.randn(5), torch.randn(4), torch.randn(4), 3, diagonal=True)
    with pytest.raises(ValueError, match=r"C must be \(\.\.\., N=4\)"):
        kernel_ref(torch.randn(4, 4), torch.randn(4), torch.randn(3), 3)
    with pytest.raises(ValueError, match="L must be >= 1"):
        kernel_ref(torch.randn(4, 4), torch.randn(4), torch.randn(4), 0)


# ------------------------------------------------------------------------------------------------------
# kernel_vandermonde
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [1, 63, 100])
@pytest.mark.parametrize("block", [None, 1, 7, 1000])
def test_vandermonde_equals_naive(L, block):
    H, N2 = 3, 5
    dtA, Bbar, C = stable_modes(H, N2), crandn(H, N2), crandn(H, N2)
    K = kernel_vandermonde(dtA, Bbar, C, L, block=block)
    expected = 2 * kernel_ref(torch.exp(dtA), Bbar, C, L, diagonal=True).real
    assert K.shape == (H, L) and K.dtype == torch.float64
    assert_close_scaled(K, expected, 1e-12, f"L={L} block={block}")


def test_vandermonde_several_outputs_and_batched_inputs():
    H, N2, L = 2, 4, 30
    dtA = stable_modes(H, N2)
    C = crandn(2, H, N2)  # two output vectors (e.g. two directions)
    Bbar = crandn(3, 1, H, N2)  # broadcasts against C's leading dims
    K = kernel_vandermonde(dtA, Bbar, C, L)
    assert K.shape == (3, 2, H, L)
    expected = 2 * kernel_ref(torch.exp(dtA), Bbar, C, L, diagonal=True).real
    assert_close_scaled(K, expected, 1e-12, "broadcast kernel")


def test_vandermonde_general_abar_through_its_log():
    # A bilinear Abar can be real negative (dt |A| > 2): exp(k log Abar) must still give Abar^k.
    H, N2, L = 2, 3, 40
    Abar = torch.tensor([[-0.6, 0.3 + 0.5j, 0.95j], [0.99, -0.2 - 0.7j, 0.5]], dtype=C128)
    Bbar, C = crandn(H, N2), crandn(H, N2)
    K = kernel_vandermonde(torch.log(Abar), Bbar, C, L)
    assert_close_scaled(K, 2 * kernel_ref(Abar, Bbar, C, L, diagonal=True).real, 1e-12, "log Abar")


def test_vandermonde_float32_close_to_float64():
    H, N2, L = 4, 8, 500
    dtA, Bbar, C = stable_modes(H, N2), crandn(H, N2), crandn(H, N2)
    K64 = kernel_vandermonde(dtA, Bbar, C, L)
    K32 = kernel_vandermonde(dtA.to(torch.complex64), Bbar.to(torch.complex64), C.to(torch.complex64), L)
    assert K32.dtype == torch.float32
    assert_close_scaled(K32.double(), K64, 1e-5, "float32 kernel")


def test_vandermonde_gradients_equal_naive():
    H, N2, L = 3, 4, 37
    dtA, Bbar, C = [t.requires_grad_() for t in (stable_modes(H, N2), crandn(H, N2), crandn(2, H, N2))]
    weight = torch.randn(2, H, L, dtype=torch.float64)
    (kernel_vandermonde(dtA, Bbar, C, L, block=5) * weight).sum().backward()
    fast = [t.grad.clone() for t in (dtA, Bbar, C)]
    for t in (dtA, Bbar, C):
        t.grad = None
    (2 * kernel_ref(torch.exp(dtA), Bbar, C, L, diagonal=True).real * weight).sum().backward()
    for name, g, t in zip(("dtA", "Bbar", "C"), fast, (dtA, Bbar, C)):
        assert_close_scaled(torch.view_as_real(g), torch.view_as_real(t.grad), 1e-11, f"grad {name}")


def test_vandermonde_gradcheck():
    dtA, Bbar, C = [t.requires_grad_() for t in (stable_modes(2, 2), crandn(2, 2), crandn(2, 2))]
    assert torch.autograd.gradcheck(lambda a, b, c: kernel_vandermonde(a, b, c, 7, block=3), (dtA, Bbar, C))


def test_vandermonde_refuses_bad_input():
    dtA, v = stable_modes(2, 3), crandn(2, 3)
    with pytest.raises(TypeError, match="dtA .* must be a complex tensor"):
        kernel_vandermonde(dtA.real, v, v, 4)
    with pytest.raises(ValueError, match=r"dtA \(log Abar\) must be \(H, N2\); got \(6,\)"):
        kernel_vandermonde(dtA.reshape(6), v, v, 4)
    with pytest.raises(ValueError, match=r"C must be \(\.\.\., H=2, N2=3\) to match dtA; got \(2, 4\)"):
        kernel_vandermonde(dtA, v, crandn(2, 4), 4)
    with pytest.raises(TypeError, match="Bbar must be a complex tensor"):
        kernel_vandermonde(dtA, v.real, v, 4)
    with pytest.raises(ValueError, match="block must be >= 1"):
        kernel_vandermonde(dtA, v, v, 4, block=0)


@pytest.mark.parametrize("L", [1, 2, 3, 63, 64, 65, 100, 4096, 65536, 100003])
def test_block_split_covers_length_with_square_root_factors(L):
    T, n_blocks = block_split(L)
    assert T * n_blocks >= L > T * (n_blocks - 1)
    assert T * T >= L and (T - 1) ** 2 < L  # T = ceil(sqrt(L))
    assert n_blocks <= T  # so each factor holds at most ~sqrt(L) powers
    assert block_split(L, 10 * L) == (L, 1)


# ------------------------------------------------------------------------------------------------------
# Nothing of size (H, N2, L) is ever formed, forward or backward
# ------------------------------------------------------------------------------------------------------
class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_vandermonde_size_forward_or_backward():
    H, N2, L, batch = 4, 16, 4096, 2
    full = H * N2 * L  # the Vandermonde matrix a direct implementation would form
    dtA, Bbar, C = [t.to(torch.complex64).requires_grad_() for t in
                    (stable_modes(H, N2), crandn(H, N2), crandn(H, N2))]
    h0 = crandn(batch, H, N2, dtype=torch.complex64).requires_grad_()
    u = torch.randn(batch, H, L, requires_grad=True)
    with LargestTensor() as probe:
        K = kernel_vandermonde(dtA, Bbar, C, L)
        y0 = initial_state_response(dtA, C, h0, L)
        hL = final_state(dtA, Bbar, u, h0)
        loss = K.square().sum() + y0.square().sum() + torch.view_as_real(hL).square().sum()
        loss.backward()
    assert all(t.grad is not None for t in (dtA, Bbar, C, h0, u))
    # the outputs and u are (batch, H, L) = full / 8; the two-level factors are far smaller still
    assert probe.largest <= batch * H * L, f"largest tensor {probe.largest} elements (Vandermonde: {full})"
    # the probe sees a tensor of Vandermonde size when one is made, so the bound above can fail
    with LargestTensor() as probe:
        kernel_ref(torch.exp(dtA), Bbar, C, 8, diagonal=True)
        torch.exp(dtA[..., None] * torch.arange(L))
    assert probe.largest == full


# ------------------------------------------------------------------------------------------------------
# Initial-state response and final state against the recurrence
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [1, 63, 100])
@pytest.mark.parametrize("block", [None, 4])
def test_state_terms_equal_recurrence(L, block):
    batch, H, N2 = 2, 3, 5
    dtA, Bbar, C = stable_modes(H, N2), crandn(H, N2), crandn(H, N2)
    h0, u = crandn(batch, H, N2), torch.randn(batch, H, L, dtype=torch.float64)
    Abar = torch.exp(dtA)
    y_ref, h_ref = diagonal_ssm_ref(Abar, Bbar, C, u, h0=h0)
    y_zero_state, _ = diagonal_ssm_ref(Abar, Bbar, C, u)
    y0 = initial_state_response(dtA, C, h0, L, block=block)
    assert y0.shape == (batch, H, L)
    assert_close_scaled(y0, y_ref - y_zero_state, 1e-12, "initial-state response")
    hL = final_state(dtA, Bbar, u, h0, block=block)
    assert hL.shape == (batch, H, N2) and hL.dtype == C128
    assert_close_scaled(torch.view_as_real(hL), torch.view_as_real(h_ref), 1e-12, "final state")
    _, h_ref0 = diagonal_ssm_ref(Abar, Bbar, C, u)
    assert_close_scaled(torch.view_as_real(final_state(dtA, Bbar, u, block=block)), torch.view_as_real(h_ref0),
                        1e-12, "final state from zero")


def test_parallel_pieces_compose_to_the_recurrence_with_gradients():
    """fft_conv(kernel) + D u + initial response == the recurrence, and so do all the gradients."""
    batch, H, N2, L = 2, 3, 4, 45
    leaves = [stable_modes(H, N2), crandn(H, N2), crandn(H, N2), torch.randn(H, dtype=torch.float64),
              crandn(batch, H, N2), torch.randn(batch, H, L, dtype=torch.float64)]
    dtA, Bbar, C, D, h0, u = [t.requires_grad_() for t in leaves]
    w_y, w_h = torch.randn(batch, H, L, dtype=torch.float64), crandn(batch, H, N2)

    def loss(y, h):
        return (y * w_y).sum() + (h * w_h).real.sum()

    y = fft_conv(u, kernel_vandermonde(dtA, Bbar, C, L), D) + initial_state_response(dtA, C, h0, L)
    h = final_state(dtA, Bbar, u, h0)
    y_ref, h_ref = diagonal_ssm_ref(torch.exp(dtA), Bbar, C, u, D, h0)
    assert_close_scaled(y, y_ref, 1e-12, "outputs")
    names = ("dtA", "Bbar", "C", "D", "h0", "u")
    fast = torch.autograd.grad(loss(y, h), (dtA, Bbar, C, D, h0, u))
    ref = torch.autograd.grad(loss(y_ref, h_ref), (dtA, Bbar, C, D, h0, u))
    for name, a, b in zip(names, fast, ref):
        a, b = (torch.view_as_real(a), torch.view_as_real(b)) if a.is_complex() else (a, b)
        assert_close_scaled(a, b, 1e-11, f"grad {name}")


def test_state_terms_gradcheck():
    dtA, Bbar, C, h0 = [t.requires_grad_() for t in
                        (stable_modes(2, 2), crandn(2, 2), crandn(2, 2), crandn(1, 2, 2))]
    u = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, h: initial_state_response(a, c, h, 6, block=4), (dtA, C, h0))
    assert torch.autograd.gradcheck(lambda a, b, x, h: final_state(a, b, x, h, block=4), (dtA, Bbar, u, h0))


def test_state_terms_refuse_bad_input():
    dtA, v = stable_modes(2, 3), crandn(2, 3)
    with pytest.raises(ValueError, match=r"u must be \(batch, H=2, L\); got \(1, 3, 5\)"):
        final_state(dtA, v, torch.randn(1, 3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="u must have dtype torch.float64"):
        final_state(dtA, v, torch.randn(1, 2, 5))
    with pytest.raises(ValueError, match=r"h0 must be \(batch=1, H=2, N2=3\); got \(2, 2, 3\)"):
        final_state(dtA, v, torch.randn(1, 2, 5, dtype=torch.float64), crandn(2, 2, 3))
    with pytest.raises(ValueError, match=r"h0 must be \(batch, H, N2\); got \(2, 3\)"):
        initial_state_response(dtA, v, v, 5)
    with pytest.raises(ValueError, match=r"C must be \(H, N2\) for the initial-state response"):
        initial_state_response(dtA, crandn(2, 2, 3), crandn(1, 2, 3), 5)
