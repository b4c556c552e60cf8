"""Argument checks of the causal conv1d, shared by every backend (and ``packed_seq_idx``, which turns the two
descriptions of packed sequences into one ``seq_idx``). Shapes and names as in :mod:`ssmkit.ops.conv1d`."""

from __future__ import annotations

from typing import Optional

import torch

from ..._checks import check_same_device, check_shape, check_tensor

ACTIVATIONS = (None, "silu")


def check_seq_idx(seq_idx: torch.Tensor, batch: int, length: int, name: str = "seq_idx") -> torch.Tensor:
    """Require an integer (batch, L) tensor that is non-decreasing along each row; return it."""
    check_tensor(name, seq_idx, floating=False)
    if seq_idx.is_floating_point() or seq_idx.is_complex() or seq_idx.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got dtype {seq_idx.dtype}")
    check_shape(name, seq_idx, (batch, length), f"(batch={batch}, length={length})")
    if length > 1:
        steps = seq_idx[:, 1:] - seq_idx[:, :-1]
        if bool((steps < 0).any()):
            row, col = (steps < 0).nonzero()[0].tolist()
            raise ValueError(f"{name} must be non-decreasing along each row (packed sequences are contiguous); "
                             f"row {row} goes from {seq_idx[row, col].item()} to {seq_idx[row, col + 1].item()} "
                             f"at position {col + 1}")
    return seq_idx


def packed_seq_idx(batch: int, length: int, seq_idx: Optional[torch.Tensor] = None,
                   cu_seqlens: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Resolve the two ways of describing packed sequences into one validated ``seq_idx`` (or None).

    Args:
        batch, length: the shape (batch, L) of the packed input.
        seq_idx: optional (batch, L) integer sequence ids, non-decreasing along each row.
        cu_seqlens: optional 1-D integer cumulative lengths ``[0, l_0, l_0 + l_1, ..., L]`` of the sequences
            packed into a batch of one (the flash-attention / mamba_ssm varlen convention).

    Returns:
        (batch, L) int64 ids, or None when neither is given. When both are given they must mark the same
        sequence boundaries.
    """
    if seq_idx is not None:
        check_seq_idx(seq_idx, batch, length)
    if cu_seqlens is None:
        return seq_idx
    check_tensor("cu_seqlens", cu_seqlens, floating=False)
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor; got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D (num_sequences + 1,); got {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens describes sequences packed into a batch of one; got batch size {batch} "
                         "(use seq_idx for several packed rows)")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != length:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length L={length}; "
                         f"got {cu_seqlens.tolist()}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing; got {cu_seqlens.tolist()}")
    positions = torch.arange(length, device=cu_seqlens.device)
    from_cu = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)[None]  # (1, L)
    if seq_idx is not None:
        if seq_idx.device != from_cu.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but seq_idx is on {seq_idx.device}")
        if not torch.equal(seq_idx[:, 1:] != seq_idx[:, :-1], from_cu[:, 1:] != from_cu[:, :-1]):
            raise ValueError("seq_idx and cu_seqlens mark different sequence boundaries; pass one of them")
        return seq_idx
    return from_cu


def _weight_2d(weight: torch.Tensor, dim: int) -> torch.Tensor:
    check_tensor("weight", weight)
    if weight.dim() == 3 and weight.shape[1] == 1:  # nn.Conv1d layout (dim, 1, width)
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(f"weight must be (dim={dim}, width) or (dim={dim}, 1, width); got {tuple(weight.shape)}")
    return weight


def _check_common(x, weight, bias, state, activation, state_name):
    batch, dim = x.shape[0], x.shape[1]
    weight = _weight_2d(weight, dim)
    width = weight.shape[1]
    if bias is not None:
        check_tensor("bias", bias)
        check_shape("bias", bias, (dim,), f"(dim={dim},)")
    if state is not None:
        check_tensor(state_name, state)
        check_shape(state_name, state, (batch, dim, width - 1), f"(batch={batch}, dim={dim}, width-1={width - 1})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'silu'; got {activation!r}")
    check_same_device({"x": x, "weight": weight, "bias": bias, state_name: state})
    half = x.dtype in (torch.float16, torch.bfloat16)
    for name, value in (("weight", weight), ("bias", bias), (state_name, state)):
        # float32 weight and bias beside half-precision x are accepted, as causal-conv1d accepts them
        mixed_ok = half and name in ("weight", "bias") and value is not None and value.dtype == torch.float32
        if value is not None and value.dtype != x.dtype and not mixed_ok:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}); got {value.dtype}")
    return weight, width


def _check_sequence_args(x, weight, bias, initial_state, seq_idx, activation):
    check_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, L); got {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"x must hold at least one time step; got shape {tuple(x.shape)}")
    weight, width = _check_common(x, weight, bias, initial_state, activation, "initial_state")
    if seq_idx is not None:
        check_seq_idx(seq_idx, x.shape[0], x.shape[-1])
        if seq_idx.device != x.device:
            raise ValueError(f"seq_idx is on {seq_idx.device} but x is on {x.device}")
    return weight, width
