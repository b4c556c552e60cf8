"""Long convolutions by FFT (S4, Gu et al. 2022, Sec. 3.3: y = IFFT(FFT(u) FFT(K)) with zero padding).

Glossary: ``u`` (batch, H, L) input, ``K`` the kernel (H, L) (S4's \\bar K), ``D`` (H,) the skip term, ``n``
the FFT length (>= 2L - 1, so the circular convolution of the padded signals equals the linear one).

Conventions, t and s in 0 .. L-1:

* causal:         y_t = sum_{s<=t} K_{t-s} u_s  (+ D u_t)
* bidirectional:  K is (2, H, L) = (K0, K1) and
                  y_t = sum_{s<=t} K0_{t-s} u_s + sum_{s>t} K1_{s-t-1} u_s  (+ D u_t)
  K0 looks back (lag 0 included), K1 looks forward: K1_0 weighs the next input u_{t+1}. K1_{L-1} is never
  used (the largest forward lag is L-1, which reads K1_{L-2}). Both halves go into one kernel of length n:
  lag d = t - s sits at index d mod n, so K0 fills indices 0 .. L-1 and K1_m (lag -(m+1)) sits at index
  n-1-m; this is the layout of the original S4 code (K0 padded right, K1 flipped and padded left).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor

__all__ = ["fft_conv", "direct_conv_ref", "next_fast_length"]


def next_fast_length(n: int) -> int:
    """Smallest m >= n of the form 2^a 3^b 5^c (lengths pocketFFT and cuFFT transform fastest)."""
    if n <= 1:
        return 1
    best = 1 << (n - 1).bit_length()  # a power of two is always a candidate
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35  # smallest p35 * 2^a >= n
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _check_conv_args(u, K, D, bidirectional):
    check_tensor("u", u)
    check_tensor("K", K)
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, H, L); got {tuple(u.shape)}")
    _, H, L = u.shape
    if bidirectional:
        if tuple(K.shape) != (2, H, L):
            raise ValueError(f"K must be (2, H={H}, L={L}) for a bidirectional convolution "
                             f"(look-back and look-ahead kernels); got {tuple(K.shape)}")
    elif tuple(K.shape) != (H, L):
        raise ValueError(f"K must be (H={H}, L={L}) to match u; got {tuple(K.shape)}")
    if K.dtype != u.dtype:
        raise TypeError(f"K must have dtype {u.dtype} to match u; got {K.dtype}")
    if D is not None:
        check_tensor("D", D)
        if tuple(D.shape) != (H,):
            raise ValueError(f"D must be (H={H},); got {tuple(D.shape)}")


def fft_conv(u: torch.Tensor, K: torch.Tensor, D: Optional[torch.Tensor] = None,
             bidirectional: bool = False) -> torch.Tensor:
    """Causal (or bidirectional) convolution of each channel of u with its kernel, by real FFTs.

    Args:
        u: (batch, H, L) real input.
        K: (H, L) kernel, or (2, H, L) = (look-back K0, look-ahead K1) when ``bidirectional``
            (module docstring gives the exact formula); same dtype as u.
        D: optional (H,) skip term, y += D u.
        bidirectional: see above.

    Returns:
        y (batch, H, L), dtype of u.
    """
    _check_conv_args(u, K, D, bidirectional)
    H, L = u.shape[1:]
    n = next_fast_length(2 * L - 1)
    if bidirectional:
        K0, K1 = K.unbind(0)
        gap = K0.new_zeros(H, n - 2 * L + 1)
        K = torch.cat([K0, gap, K1[:, : L - 1].flip(-1)], -1)  # (H, n): lag d at index d mod n
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)[..., :L]
    if D is not None:
        y = y + D[:, None] * u
    return y


def direct_conv_ref(u: torch.Tensor, K: torch.Tensor, D: Optional[torch.Tensor] = None,
                          bidirectional: bool = False) -> torch.Tensor:
    """The specification of :func:`fft_conv`: each output as an explicit sum over the inputs (O(L^2))."""
    _check_conv_args(u, K, D, bidirectional)
    L = u.shape[-1]
    K0, K1 = K.unbind(0) if bidirectional else (K, None)
    ys = []
    for t in range(L):
        y_t = (K0[:, : t + 1].flip(-1) * u[..., : t + 1]).sum(-1)  # sum_{s<=t} K0_{t-s} u_s
        if K1 is not None and t < L - 1:
            y_t = y_t + (K1[:, : L - 1 - t] * u[..., t + 1 :]).sum(-1)  # sum_{s>t} K1_{s-t-1} u_s
        if D is not None:
            y_t = y_t + D * u[..., t]
        ys.append(y_t)
    return torch.stack(ys, -1)
