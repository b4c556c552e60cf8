"""Drop-ins for the ``causal-conv1d`` package (``causal_conv1d_fn``, ``causal_conv1d_update``, ...).

Same names, signatures and semantics as ``causal_conv1d.causal_conv1d_interface`` and
``causal_conv1d.causal_conv1d_varlen``, computed by :mod:`ssmkit.ops.conv1d`:

* mixed precision: float32 ``weight``/``bias`` with bfloat16/float16 ``x`` compute in the wider dtype and
  return ``x``'s dtype (gradients reach each argument in its own dtype);
* ``seq_idx`` may hold ``-1`` for padding positions: their outputs are zero and they feed no other output;
* ``causal_conv1d_update`` modifies ``conv_state`` in place. Its state keeps ``state_len >= width - 1``
  columns; with ``cache_seqlens`` (batch,) it is a circular buffer whose next write position is
  ``cache_seqlens % state_len`` (the oldest entries are read from just before it); with
  ``conv_state_indices`` (batch,) row ``b`` uses ``conv_state[conv_state_indices[b]]`` (continuous
  batching), and an index of ``-1`` marks a padded row: output zero, no state touched.

Shapes: x (batch, dim, L); weight (dim, width); bias (dim,); states (batch, dim, width - 1).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor
from ..ops import conv1d as _conv

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref",
           "causal_conv1d_varlen_states", "causal_conv1d_varlen_states_ref"]


def _activation(activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    return None if activation is None else "silu"


def _index_tensor(name, value, batch):
    check_tensor(name, value, floating=False)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got dtype {value.dtype}")
    if tuple(value.shape) != (batch,):
        raise ValueError(f"{name} must be (batch={batch},); got {tuple(value.shape)}")
    return value.to(torch.int64)


def _compute_dtype(x, weight, bias):
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


def _unpad_seq_idx(seq_idx):
    """Map ids with -1 padding to non-decreasing ids where each padding position is its own sequence.

    Returns (ids, keep) with keep (batch, L) the float mask of real positions, or (seq_idx, None).
    """
    pad = seq_idx < 0
    if not bool(pad.any()):
        return seq_idx, None
    starts = torch.ones_like(pad)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]) | pad[:, 1:]
    return starts.to(torch.int64).cumsum(1), ~pad


def _sequence(conv, x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out,
              activation):
    check_tensor("x", x)
    check_tensor("weight", weight)
    activation = _activation(activation)
    dtype = _compute_dtype(x, weight, bias)
    keep = None
    if seq_idx is not None:
        seq_idx, keep = _unpad_seq_idx(seq_idx)
    init = None if initial_states is None else initial_states.to(dtype)
    out = conv(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), init, seq_idx,
               activation, return_final_states)
    y, final = out if return_final_states else (out, None)
    if keep is not None:
        y = y * keep[:, None, :].to(y.dtype)
    y = y.to(x.dtype)
    if not return_final_states:
        return y
    final = final.to(x.dtype)
    if final_states_out is not None:
        with torch.no_grad():
            final_states_out.copy_(final)
        final = final_states_out
    return y, final


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """x (batch, dim, L) -> y (batch, dim, L) [, final_states (batch, dim, width - 1)] (see the module doc).

    ``final_states_out``, when given, receives the final states and is returned.
    """
    def conv(x, w, b, init, ids, act, ret):
        return _conv.causal_conv1d(x, w, b, initial_state=init, seq_idx=ids, activation=act,
                                   return_final_state=ret)
    return _sequence(conv, x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out,
                     activation)


def causal_conv1d_ref(x, weight, bias=None, initial_states=None, return_final_states=False,
                      final_states_out=None, activation=None):
    """The loop-over-time specification with :func:`causal_conv1d_fn`'s arguments (no ``seq_idx``)."""
    def conv(x, w, b, init, ids, act, ret):
        return _conv.causal_conv1d_ref(x, w, b, initial_state=init, seq_idx=ids, activation=act,
                                       return_final_state=ret)
    return _sequence(conv, x, weight, bias, None, initial_states, return_final_states, final_states_out,
                     activation)


def _update(conv, x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices):
    check_tensor("x", x)
    check_tensor("conv_state", conv_state)
    check_tensor("weight", weight)
    activation = _activation(activation)
    one_token = x.dim() == 2
    if one_token:
        x = x[..., None]
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim) or (batch, dim, L); got {tuple(x.shape)}")
    batch, dim, length = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight must be (dim={dim}, width); got {tuple(weight.shape)}")
    width = weight.shape[1]
    if conv_state.dim() != 3 or conv_state.shape[1] != dim or conv_state.shape[2] < width - 1:
        raise ValueError(f"conv_state must be (entries, dim={dim}, state_len >= width-1={width - 1}); "
                         f"got {tuple(conv_state.shape)}")
    state_len = conv_state.shape[2]
    if conv_state_indices is None:
        if conv_state.shape[0] != batch:
            raise ValueError(f"conv_state must have batch={batch} rows without conv_state_indices; "
                             f"got {tuple(conv_state.shape)}")
        rows = valid = None
    else:
        indices = _index_tensor("conv_state_indices", conv_state_indices, batch)
        valid = indices >= 0
        rows = indices[valid]
        if rows.numel() and int(rows.max()) >= conv_state.shape[0]:
            raise ValueError(f"conv_state_indices must be < {conv_state.shape[0]} (conv_state's rows) or -1; "
                             f"got max {int(rows.max())}")
    states = conv_state if rows is None else conv_state[rows]   # (n, dim, state_len)
    xs = x if valid is None else x[valid]
    n = xs.shape[0]
    if cache_seqlens is None:
        history = states[..., state_len - (width - 1):]           # the width-1 newest entries
        new_states = torch.cat([states, xs.to(states.dtype)], dim=-1)[..., -state_len:]
    else:
        seqlens = _index_tensor("cache_seqlens", cache_seqlens, batch)
        seqlens = seqlens if valid is None else seqlens[valid]
        # circular buffer: entry i of the ring sits at column i % state_len; the next write is at seqlens
        read = (seqlens[:, None] + torch.arange(-(width - 1), 0, device=x.device)).remainder(state_len)
        history = states.gather(2, read[:, None, :].expand(n, dim, width - 1))
        written = min(length, state_len)  # later tokens overwrite earlier ones when L > state_len
        steps = torch.arange(length - written, length, device=x.device)
        write = (seqlens[:, None] + steps).remainder(state_len)
        new_states = states.clone()
        new_states.scatter_(2, write[:, None, :].expand(n, dim, written), xs[..., length - written:].to(states.dtype))
    dtype = _compute_dtype(x, weight, bias)
    y = conv(xs.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), history.to(dtype),
             None, activation, False)
    with torch.no_grad():
        if rows is None:
            conv_state.copy_(new_states)
        else:
            conv_state[rows] = new_states
    if valid is None:
        out = y.to(x.dtype)
    else:
        out = x.new_zeros(batch, dim, length)
        out[valid] = y.to(x.dtype)
    return out[..., 0] if one_token else out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """Decode L new tokens: x (batch, dim) or (batch, dim, L) -> y like x; ``conv_state`` updated in place.

    conv_state: (batch, dim, state_len) with state_len >= width - 1, or (entries, dim, state_len) with
    ``conv_state_indices`` (batch,) naming each row's entry (-1: padded row). ``cache_seqlens`` (batch,):
    treat the state as a circular buffer written from column ``cache_seqlens % state_len``.
    """
    def conv(x, w, b, init, ids, act, ret):
        return _conv.causal_conv1d(x, w, b, initial_state=init, activation=act)
    return _update(conv, x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    """:func:`causal_conv1d_update` computed by the loop-over-time reference (no ``conv_state_indices``)."""
    def conv(x, w, b, init, ids, act, ret):
        return _conv.causal_conv1d_ref(x, w, b, initial_state=init, activation=act)
    return _update(conv, x, conv_state, weight, bias, activation, cache_seqlens, None)


def _check_varlen(x, cu_seqlens, state_len):
    check_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be (total_tokens, dim); got {tuple(x.shape)}")
    check_tensor("cu_seqlens", cu_seqlens, floating=False)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D (batch + 1,); got {tuple(cu_seqlens.shape)}")
    if isinstance(state_len, bool) or not isinstance(state_len, int) or state_len < 0:
        raise ValueError(f"state_len must be an int >= 0; got {state_len!r}")


def causal_conv1d_varlen_states(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """The last ``state_len`` inputs of each packed sequence, zeros where a sequence is shorter.

    x (total_tokens, dim); cu_seqlens (batch + 1,) cumulative lengths from 0 -> (batch, dim, state_len).
    """
    _check_varlen(x, cu_seqlens, state_len)
    starts, ends = cu_seqlens[:-1].to(torch.int64), cu_seqlens[1:].to(torch.int64)
    positions = ends[:, None] - state_len + torch.arange(state_len, device=x.device)   # (batch, state_len)
    inside = positions >= starts[:, None]
    picked = x[positions.clamp(min=0)]                                                  # (batch, state_len, dim)
    return torch.where(inside[..., None], picked, picked.new_zeros(())).transpose(1, 2)


def causal_conv1d_varlen_states_ref(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """:func:`causal_conv1d_varlen_states` as a loop over sequences (the specification)."""
    _check_varlen(x, cu_seqlens, state_len)
    batch, dim = cu_seqlens.numel() - 1, x.shape[1]
    states = x.new_zeros(batch, dim, state_len)
    for b in range(batch):
        start, end = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        kept = min(end - start, state_len)
        if kept:
            states[b, :, state_len - kept:] = x[end - kept:end].T
    return states
