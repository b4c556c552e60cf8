"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer", arXiv 2104.09864, Sec. 3.4, eq. (34)).

Each head vector of size ``head_dim`` (even) is read as ``head_dim / 2`` pairs; pair i at position m is
rotated by the angle m * theta_i with theta_i = base^(-2i / head_dim). A query rotated to position m and a
key rotated to position n then have a dot product that depends on m - n only, which is what makes a KV
cache reusable: cached keys never need re-rotating when new tokens arrive, and a continuation only needs
the position ``offset`` at which it starts.

Pairing convention: pair i is (x[i], x[i + head_dim/2]) ("rotate half"), as in transformers' Llama and
GPT-NeoX, not the interleaved (x[2i], x[2i+1]) of the RoFormer paper and GPT-J; the two differ by a fixed
permutation of the q/k projection rows, and this one matches checkpoints with Llama-style ``q_proj`` /
``k_proj``.

Glossary (code name -> paper symbol):
    positions   m (or n), the absolute token index
    base        the 10000 in theta_i = 10000^(-2(i-1)/d)
    head_dim    d, the size of one head
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch

from .._checks import check_positive_int, check_tensor

Offset = Union[int, torch.Tensor]


def _check_head_dim(head_dim: int) -> int:
    check_positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings (pairs of features); got {head_dim}")
    return head_dim


def _check_base(base) -> float:
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 1:
        raise ValueError(f"base must be a finite number > 1; got {base!r}")
    return float(base)


def rope_positions(offset: Offset, length: int, device=None) -> torch.Tensor:
    """Absolute positions of ``length`` tokens that start at ``offset``.

    Args:
        offset: an int >= 0 shared by every row, or an integer tensor (batch,) with one start per row (its
            values are not checked: that would stall a GPU on every decoding step).
        length: number of tokens.

    Returns:
        int64 positions, (length,) for an int offset, (batch, length) for a tensor.
    """
    check_positive_int("length", length)
    if isinstance(offset, torch.Tensor):
        if offset.is_floating_point() or offset.is_complex() or offset.dtype == torch.bool:
            raise TypeError(f"offset must be an int or an integer tensor; got dtype {offset.dtype}")
        if offset.dim() != 1:
            raise ValueError(f"offset must be an int or a tensor (batch,); got shape {tuple(offset.shape)}")
        steps = torch.arange(length, device=offset.device, dtype=torch.int64)
        return offset.to(torch.int64)[:, None] + steps
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int or an integer tensor; got {type(offset).__name__}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0; got {offset}")
    return torch.arange(offset, offset + length, device=device, dtype=torch.int64)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles m * theta_i, each ``positions.shape + (head_dim // 2,)``, float64.

    The angles are formed in float64 so that positions in the tens of thousands keep their phase (a float32
    product m * theta_0 = m is exact, but the rounding of m * theta_i for the other pairs grows with m);
    callers cast the result to their compute dtype.
    """
    _check_head_dim(head_dim)
    base = _check_base(base)
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    theta = base ** (-exponents)                                     # (head_dim/2,)
    angles = positions.to(torch.float64)[..., None] * theta          # (..., head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, offset: Offset = 0, base: float = 10000.0) -> torch.Tensor:
    """Rotate queries or keys to their positions (rotate-half pairing, see the module docstring).

    Args:
        x: (batch, heads, L, head_dim) floating point, head_dim even.
        offset: position of the first token: an int, or an integer tensor (batch,) (one start per row, as
            in a KV cache whose rows have seen different numbers of tokens) or (1,) (shared).
        base: theta_i = base^(-2i / head_dim).

    Returns:
        (batch, heads, L, head_dim), x's dtype: x[..., :h] cos - x[..., h:] sin, x[..., h:] cos + x[..., :h] sin
        with h = head_dim / 2.
    """
    check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, heads, L, head_dim); got {tuple(x.shape)}")
    batch, _, length, head_dim = x.shape
    _check_head_dim(head_dim)
    if isinstance(offset, torch.Tensor) and offset.dim() == 1 and offset.shape[0] not in (1, batch):
        raise ValueError(f"offset must be (batch={batch},) or (1,); got {tuple(offset.shape)}")
    positions = rope_positions(offset, length, device=x.device)      # (L,) or (batch|1, L)
    cos, sin = rope_cos_sin(positions, head_dim, base)
    if positions.dim() == 2:                                         # one start per row: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rope_ref(x: torch.Tensor, offset: Offset = 0, base: float = 10000.0) -> torch.Tensor:
    """The specification of :func:`apply_rope`: each pair as a complex number times exp(i m theta_i),
    one position at a time (RoFormer eq. (34) written in complex form, eq. (12)). Same arguments."""
    check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, heads, L, head_dim); got {tuple(x.shape)}")
    batch, _, length, head_dim = x.shape
    _check_head_dim(head_dim)
    base = _check_base(base)
    half = head_dim // 2
    starts = offset.tolist() if isinstance(offset, torch.Tensor) else [offset]
    if len(starts) == 1:
        starts = starts * batch
    theta = [base ** (-2 * i / head_dim) for i in range(half)]
    cdtype = torch.complex128
    rows = []
    for b, x_b in enumerate(x.unbind(0)):                           # x_b (heads, L, head_dim)
        out = []
        for t, x_bt in enumerate(x_b.unbind(1)):                    # x_bt (heads, head_dim)
            m = starts[b] + t
            rotation = torch.tensor([complex(math.cos(m * th), math.sin(m * th)) for th in theta],
                                    dtype=cdtype, device=x.device)
            pairs = torch.complex(x_bt[:, :half].double(), x_bt[:, half:].double()) * rotation
            out.append(torch.cat([pairs.real, pairs.imag], dim=-1))
        rows.append(torch.stack(out, dim=1))
    return torch.stack(rows, dim=0).to(x.dtype)
