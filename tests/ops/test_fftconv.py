"""FFT convolution (ops/fftconv.py) against the direct sum, in float64, on awkward lengths."""

import pytest
import torch

from ssmkit.ops.fftconv import direct_conv_ref, fft_conv, next_fast_length

from ..helpers import assert_close_scaled


@pytest.mark.parametrize("L", [1, 63, 100])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_D", [False, True])
def test_fft_conv_equals_direct(L, bidirectional, with_D):
    B, H = 2, 3
    u = torch.randn(B, H, L, dtype=torch.float64)
    K = torch.randn(*((2,) if bidirectional else ()), H, L, dtype=torch.float64)
    D = torch.randn(H, dtype=torch.float64) if with_D else None
    y = fft_conv(u, K, D, bidirectional=bidirectional)
    assert y.shape == (B, H, L) and y.dtype == torch.float64
    assert_close_scaled(y, direct_conv_ref(u, K, D, bidirectional=bidirectional), 1e-12, f"L={L}")


def test_float32():
    u, K = torch.randn(2, 3, 200), torch.randn(3, 200)
    y = fft_conv(u, K)
    assert y.dtype == torch.float32
    assert_close_scaled(y.double(), direct_conv_ref(u.double(), K.double()), 1e-5, "float32")


def test_bidirectional_convention_on_an_impulse():
    """An impulse at s gives y_t = K0_{t-s} for t >= s and y_t = K1_{s-t-1} for t < s."""
    L, s = 9, 4
    K = torch.randn(2, 1, L, dtype=torch.float64)
    u = torch.zeros(1, 1, L, dtype=torch.float64)
    u[..., s] = 1
    y = fft_conv(u, K, bidirectional=True)[0, 0]
    expected = torch.stack([K[1, 0, s - t - 1] if t < s else K[0, 0, t - s] for t in range(L)])
    assert torch.allclose(y, expected, atol=1e-12)
    # and the causal mode ignores what lies ahead
    y_causal = fft_conv(u, K[0])[0, 0]
    assert torch.allclose(y_causal[:s], torch.zeros(s, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck(bidirectional):
    B, H, L = 1, 2, 5
    u = torch.randn(B, H, L, dtype=torch.float64, requires_grad=True)
    K = torch.randn(*((2,) if bidirectional else ()), H, L, dtype=torch.float64, requires_grad=True)
    D = torch.randn(H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, K, D: fft_conv(u, K, D, bidirectional=bidirectional), (u, K, D))


def test_gradients_equal_direct():
    u = torch.randn(2, 3, 63, dtype=torch.float64, requires_grad=True)
    K = torch.randn(2, 3, 63, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 63, dtype=torch.float64)
    fast = torch.autograd.grad((fft_conv(u, K, bidirectional=True) * w).sum(), (u, K))
    ref = torch.autograd.grad((direct_conv_ref(u, K, bidirectional=True) * w).sum(), (u, K))
    for a, b, name in zip(fast, ref, ("u", "K")):
        assert_close_scaled(a, b, 1e-12, f"grad {name}")


def test_next_fast_length_is_the_smallest_5_smooth_length():
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 600):
        m = next_fast_length(n)
        assert m >= n and smooth(m) and not any(smooth(k) for k in range(n, m)), n
    assert next_fast_length(2 * 65536 - 1) == 2 * 65536


def test_bad_input_is_refused():
    u = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match=r"u must be \(batch, H, L\); got \(3, 10\)"):
        fft_conv(u[0], torch.randn(3, 10))
    with pytest.raises(ValueError, match=r"K must be \(H=3, L=10\) to match u; got \(3, 9\)"):
        fft_conv(u, torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"K must be \(2, H=3, L=10\) for a bidirectional"):
        fft_conv(u, torch.randn(3, 10), bidirectional=True)
    with pytest.raises(TypeError, match="K must have dtype torch.float32 to match u"):
        fft_conv(u, torch.randn(3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"D must be \(H=3,\); got \(2,\)"):
        fft_conv(u, torch.randn(3, 10), torch.randn(2))
