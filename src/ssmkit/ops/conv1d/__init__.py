"""Causal depthwise 1-D convolution with a carried state: the short convolution in front of Mamba's scan.

Each channel ``d`` is filtered by its own kernel of ``width`` taps, looking only at the present and the past
(Mamba Sec. 3.4, the ``conv1d`` of the block; the H3 "shift" convolution)::

    y[b, d, t] = bias[d] + sum_{k=0}^{width-1} weight[d, k] * xs[b, d, t + k]
    xs = concat(state, x)            # the width-1 inputs before x, then x

so ``weight[:, -1]`` multiplies the current input and ``weight[:, 0]`` the oldest one, exactly as
``torch.nn.Conv1d(dim, dim, width, groups=dim, padding=width-1)`` cropped to the first L outputs (and as
the ``causal_conv1d`` package).

**State.** The state is the last ``width - 1`` inputs, oldest first: (batch, dim, width - 1). That is all the
convolution needs to continue; it is the layout of ``causal_conv1d_fn``'s ``initial_states`` /
``final_states_out``. (mamba_ssm's and transformers' decoding caches keep ``width`` columns instead, the
oldest of which is never read again; convert with ``cache[..., 1:]``, and back by padding one zero column on
the left.) A zero state is the same as zero padding, i.e. the start of a sequence.

**Packed sequences.** ``seq_idx`` (batch, L) gives the integer id of the sequence each position belongs to,
non-decreasing along a row. An input contributes to an output only when both belong to the same sequence,
so no filter window reaches across a boundary; the carried ``state`` belongs to the sequence at position 0.
The final state holds only inputs of the last sequence of each row (zeros in place of older sequences' inputs),
so it continues that sequence.

Functions:

* :func:`causal_conv1d`         the whole sequence at once (fast path, a custom autograd function with no
  padded copy of the input);
* :func:`causal_conv1d_update`  one time step, for decoding (``step``);
* :func:`causal_conv1d_ref`     the specification: a plain loop over time.

Glossary: ``width`` = d_conv (kernel size, 4 in Mamba); ``dim`` = channels (d_inner in Mamba, conv_dim =
d_inner + 2 G N in Mamba-2); ``state`` = the conv part of a layer's recurrent state.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..._checks import check_same_device, check_shape, check_tensor
from ..backends import register_op, resolve
from .._triton import triton_available

register_op("causal_conv1d", ("torch", "triton"))
register_op("causal_conv1d_update", ("torch", "triton"))

__all__ = ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_ref", "check_seq_idx", "packed_seq_idx"]

ACTIVATIONS = (None, "silu")


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------
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
    for name, value in (("weight", weight), ("bias", bias), (state_name, state)):
        if value is not None and value.dtype != x.dtype:
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


def _activate(y, activation):
    return F.silu(y) if activation == "silu" else y


# --------------------------------------------------------------------------------------------------
# Fast path
# --------------------------------------------------------------------------------------------------
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


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  initial_state: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None, return_final_state: bool = False,
                  backend: Optional[str] = None):
    """Causal depthwise convolution over a whole sequence (see the module docstring for the formula).

    Args:
        x: (batch, dim, L) input; any memory layout (a transposed view of a (batch, L, dim) tensor is fine).
        weight: (dim, width), or (dim, 1, width) as ``nn.Conv1d`` stores it.
        bias: optional (dim,).
        initial_state: optional (batch, dim, width-1), the inputs before ``x`` (oldest first); zeros if None.
        seq_idx: optional (batch, L) integer ids of packed sequences, non-decreasing along a row; no window
            crosses a change of id.
        activation: None or "silu", applied to the output.
        return_final_state: also return the state after the last step.
        backend: "torch" (shifted multiply-adds, any device), "triton" (GPU kernel of
            :mod:`ssmkit.ops._triton`), or None / "auto": the :func:`ssmkit.ops.use_backend` context, else
            "triton" for CUDA tensors when triton imports, else "torch".

    Returns:
        y (batch, dim, L), and the final state (batch, dim, width-1) when ``return_final_state``.
    """
    if resolve("causal_conv1d", backend, lambda: "triton" if x.is_cuda and triton_available() else "torch") == "triton":
        from .._triton import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, initial_state, seq_idx, activation, return_final_state)
    weight, width = _check_sequence_args(x, weight, bias, initial_state, seq_idx, activation)
    keep = _lag_masks(seq_idx, width).to(x.dtype)[..., None] if (seq_idx is not None and width > 1) else None
    state_t = initial_state.transpose(1, 2) if initial_state is not None else None
    y = _CausalConv1dFn.apply(x.transpose(1, 2), weight, bias, state_t, keep).transpose(1, 2)
    y = _activate(y, activation)
    if return_final_state:
        return y, _final_state(x, initial_state, seq_idx, width)
    return y


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                         backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One time step: x (batch, dim), conv_state (batch, dim, width-1) -> (y (batch, dim), new state).

    Pure function (the state is not modified in place), so it works inside autograd and under tracing.
    ``backend``: "torch", "triton" (fused GPU kernel, inference only) or None / "auto" (the
    :func:`ssmkit.ops.use_backend` context, else "triton" for CUDA tensors without gradients, else "torch").
    """
    if resolve("causal_conv1d_update", backend, lambda: "triton" if x.is_cuda and not torch.is_grad_enabled()
               and triton_available() else "torch") == "triton":
        from .._triton import causal_conv1d_update_triton

        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation)
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


# --------------------------------------------------------------------------------------------------
# Reference (the specification)
# --------------------------------------------------------------------------------------------------
def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      initial_state: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None,
                      activation: Optional[str] = None, return_final_state: bool = False):
    """Plain loop over time, same arguments and results as :func:`causal_conv1d`.

    The window of past inputs is emptied (set to zero) whenever ``seq_idx`` changes: a new sequence starts.
    """
    weight, width = _check_sequence_args(x, weight, bias, initial_state, seq_idx, activation)
    batch, dim, _ = x.shape
    past = initial_state if initial_state is not None else x.new_zeros(batch, dim, width - 1)
    ids = seq_idx.unbind(1) if seq_idx is not None else None
    outputs = []
    for t, x_t in enumerate(x.unbind(-1)):
        if ids is not None and t > 0:
            same = (ids[t] == ids[t - 1]).to(x.dtype)[:, None, None]  # (batch, 1, 1)
            past = past * same
        window = torch.cat([past, x_t[..., None]], dim=-1)
        y_t = (window * weight).sum(-1)
        if bias is not None:
            y_t = y_t + bias
        outputs.append(y_t)
        past = window[..., 1:]
    y = _activate(torch.stack(outputs, dim=-1), activation)
    return (y, past) if return_final_state else y
