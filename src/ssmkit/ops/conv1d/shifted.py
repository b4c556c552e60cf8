"""The "torch" backend of the causal conv1d: shifted, in-place multiply-adds with a hand-written backward.

Same arguments and results as :func:`ssmkit.ops.conv1d.causal_conv1d` and
:func:`~ssmkit.ops.conv1d.causal_conv1d_update`; the formula and glossary are in :mod:`ssmkit.ops.conv1d`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ..._checks import check_tensor
from .args import _check_common, _check_sequence_args
from .reference import _activate


def _lag_masks(seq_idx: torch.Tensor, width: int) -> torch.Tensor:
    """keep[j-1][b, t]: may the input j steps before t feed output t?  (width-1, batch, L) bool

    Positions before the start (t - j < 0) are state entries, which belong to the sequence at position 0.
    """
    length = seq_idx.shape[1]
    padded = torch.cat([seq_idx[:, :1].expand(-1, width - 1), seq_idx], dim=1)  # (batch, width-1+L)
    return torch.stack([padded[:, width - 1 - j: width - 1 - j + length] == seq_idx
                        for j in range(1, width)])


def _final_state(x, initial_state, seq_idx, width):
    """The last width-1 inputs (zeros where they belong to an earlier sequence than the last one)."""
    if width == 1:
        return x.new_zeros(x.shape[0], x.shape[1], 0)
    if initial_state is None:
        initial_state = x.new_zeros(x.shape[0], x.shape[1], width - 1)
    tail = torch.cat([initial_state, x[..., -(width - 1):]], dim=-1)[..., -(width - 1):]
    if seq_idx is not None:
        length = x.shape[-1]
        ids = torch.cat([seq_idx[:, :1].expand(-1, width - 1), seq_idx], dim=1)[:, length:]  # (batch, width-1)
        tail = tail * (ids == seq_idx[:, -1:]).to(x.dtype)[:, None, :]
    return tail


class _CausalConv1dFn(torch.autograd.Function):
    """y = bias + sum over lags of weight * shifted input, built by in-place shifted multiply-adds.

    Written out instead of calling ``F.conv1d`` because the CPU depthwise convolution pads a copy of the
    input and its backward is several times slower than these few fused multiply-adds.
    Works on time-major views (batch, L, dim) of whatever memory the caller has, so a (batch, dim, L) view
    of a channel-last tensor (as cut from a projection's output) is neither copied nor transposed in memory;
    reductions are written as multiply-and-sum because ``einsum`` copies strided operands.
    Lag ``j`` (1 .. width-1) uses tap ``weight[:, width-1-j]``; ``keep`` (width-1, batch, L, 1) zeroes the
    contributions that would cross a sequence boundary.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, state, keep):
        # x (batch, L, dim), weight (dim, width), bias (dim,), state (batch, width-1, dim)
        length = x.shape[1]
        width = weight.shape[1]
        if bias is not None:
            y = torch.addcmul(bias, x, weight[:, width - 1])
        else:
            y = x * weight[:, width - 1]
        for j in range(1, width):
            tap = weight[:, width - 1 - j]  # (dim,)
            if j < length:
                if keep is None:
                    y[:, j:].addcmul_(x[:, :length - j], tap)
                else:
                    y[:, j:].add_(x[:, :length - j] * tap * keep[j - 1, :, j:])
            if state is not None:
                n = min(j, length)
                part = state[:, width - 1 - j: width - 1 - j + n] * tap
                if keep is not None:
                    part = part * keep[j - 1, :, :n]
                y[:, :n].add_(part)
        ctx.save_for_backward(x, weight, state, keep)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, state, keep = ctx.saved_tensors
        length, dim = x.shape[1], x.shape[2]
        width = weight.shape[1]
        need_x, need_w, need_b, need_s, _ = ctx.needs_input_grad
        grad_x = grad_y * weight[:, width - 1] if need_x else None
        grad_w_cols = [None] * width
        # one scratch buffer for the products behind the weight gradient: fresh full-size temporaries
        # cost more in page faults than in arithmetic
        scratch = torch.empty_like(grad_y) if need_w else None

        def dot_over_batch_and_time(a, b):  # (batch, n, dim) x (batch, n, dim) -> (dim,)
            return torch.mul(a, b, out=scratch[:, :a.shape[1]]).sum((0, 1))

        if need_w:
            grad_w_cols[width - 1] = dot_over_batch_and_time(grad_y, x)
        grad_state = torch.zeros_like(state) if (need_s and state is not None) else None
        for j in range(1, width):
            k = width - 1 - j
            tap = weight[:, k]
            g = grad_y if keep is None else grad_y * keep[j - 1]  # only the contributions that happened
            col = None
            if j < length:
                if need_x:
                    grad_x[:, :length - j].addcmul_(g[:, j:], tap)
                if need_w:
                    col = dot_over_batch_and_time(g[:, j:], x[:, :length - j])
            if state is not None:
                n = min(j, length)
                if need_w:
                    part = (g[:, :n] * state[:, k: k + n]).sum((0, 1))
                    col = part if col is None else col + part
                if grad_state is not None:
                    grad_state[:, k: k + n] += g[:, :n] * tap
            if need_w:
                grad_w_cols[k] = col if col is not None else weight.new_zeros(dim)
        grad_w = torch.stack(grad_w_cols, dim=1) if need_w else None
        grad_b = grad_y.sum((0, 1)) if (need_b and ctx.has_bias) else None
        return grad_x, grad_w, grad_b, grad_state, None


def causal_conv1d_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        initial_state: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None,
                        activation: Optional[str] = None, return_final_state: bool = False):
    """The whole sequence: x (batch, dim, L) -> y (batch, dim, L) [, final state (batch, dim, width-1)]."""
    weight, width = _check_sequence_args(x, weight, bias, initial_state, seq_idx, activation)
    if weight.dtype != x.dtype:  # float32 weights beside half x: compute in float32, return in x's dtype
        state32 = initial_state.float() if initial_state is not None else None
        out = causal_conv1d_torch(x.float(), weight, bias, state32, seq_idx, activation, return_final_state)
        return tuple(t.to(x.dtype) for t in out) if return_final_state else out.to(x.dtype)
    keep = _lag_masks(seq_idx, width).to(x.dtype)[..., None] if (seq_idx is not None and width > 1) else None
    state_t = initial_state.transpose(1, 2) if initial_state is not None else None
    y = _CausalConv1dFn.apply(x.transpose(1, 2), weight, bias, state_t, keep).transpose(1, 2)
    y = _activate(y, activation)
    if return_final_state:
        return y, _final_state(x, initial_state, seq_idx, width)
    return y


def causal_conv1d_update_torch(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor] = None,
                               activation: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step: x (batch, dim), conv_state (batch, dim, width-1) -> (y (batch, dim), new state)."""
    check_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, dim) for one step; got {tuple(x.shape)}")
    if conv_state is None:
        raise ValueError("conv_state is required; a zero (batch, dim, width-1) tensor starts a sequence")
    weight, width = _check_common(x, weight, bias, conv_state, activation, "conv_state")
    window = torch.cat([conv_state, x[..., None]], dim=-1)  # (batch, dim, width)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return _activate(y, activation), window[..., 1:]
