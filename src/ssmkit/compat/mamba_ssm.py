"""Drop-ins for ``mamba_ssm``'s ops: ``selective_scan_fn``, ``selective_state_update``,
``mamba_chunk_scan_combined`` and their ``_ref`` twins, computed by :mod:`ssmkit.ops`.

Differences from ssmkit's own ops, on purpose here:

* ``selective_state_update`` updates ``state`` in place and returns only ``y`` (ssmkit's op returns
  ``(y, new_state)``). It takes mamba_ssm's two layouts: Mamba-1's (batch, dim, N) state, and the per-head
  (batch, heads, headdim, N) state with A (heads, headdim, N), dt, D, dt_bias (.., heads, headdim) --
  including Mamba-2's tied form, where those are stride-0 expansions of per-head values.
  ``state_batch_indices`` (batch,) names the state row of each batch element (continuous batching); an
  index < 0 marks a padded element: output zero, no state touched.
* Mixed precisions as mamba_ssm accepts them (float32 A, D, dt_bias, B, C beside bfloat16/float16
  activations and states): every input is computed in the widest dtype present (at least float32), the
  output returned in ``x``'s dtype and the state stored in its own dtype.

Still refused with a clear error: ``mamba_chunk_scan_combined``'s ``cu_seqlens`` / ``return_varlen_states``.
"""

from __future__ import annotations


import torch

from .._checks import check_tensor
from ..ops import selective_scan as _selective_scan
from ..ops import ssd as _ssd
from ..ops.mamba import selective_state_update as _ops_state_update

__all__ = ["selective_scan_fn", "selective_scan_ref", "selective_state_update", "selective_state_update_ref",
           "mamba_chunk_scan_combined", "ssd_chunk_scan_combined_ref"]


def _widest(*tensors):
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _cast(dtype, *tensors):
    return [None if t is None else t.to(dtype) for t in tensors]


def _scan(backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    for name, value in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        check_tensor(name, value)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if len({t.dtype for t in tensors if t is not None}) == 1:   # one dtype: no copies
        return _selective_scan(*tensors, delta_softplus=delta_softplus, return_last_state=return_last_state,
                               backend=backend)
    out = _selective_scan(*_cast(_widest(*tensors), *tensors), delta_softplus=delta_softplus,
                          return_last_state=return_last_state, backend=backend)
    if return_last_state:
        return out[0].to(u.dtype), out[1]
    return out.to(u.dtype)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Mamba's selective scan (see :func:`ssmkit.ops.selective_scan`); backend chosen as ``"auto"`` does.

    u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or (batch, groups, N, L); D, delta_bias
    (dim,). Returns y (batch, dim, L) in u's dtype [, last_state (batch, dim, N)].
    """
    return _scan(None, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """:func:`selective_scan_fn` by the sequential recurrence (the specification)."""
    return _scan("reference", u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _heads_layout(state, x, dt, A, B, C, D, z, dt_bias):
    """Bring Mamba-1's layout to the per-head one: (batch, heads, headdim, N) with heads = 1."""
    if state.dim() == 3:
        state = state[:, None]
    x = x[:, None] if x.dim() == 2 else x
    dt = dt[:, None] if dt.dim() == 2 else dt
    A = A[None] if A.dim() == 2 else A
    B = B[:, None] if B.dim() == 2 else B
    C = C[:, None] if C.dim() == 2 else C
    D = D[None] if (D is not None and D.dim() == 1) else D
    z = z[:, None] if (z is not None and z.dim() == 2) else z
    dt_bias = dt_bias[None] if (dt_bias is not None and dt_bias.dim() == 1) else dt_bias
    return state, x, dt, A, B, C, D, z, dt_bias


def _state_update(backend, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    for name, value in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        check_tensor(name, value)
    has_heads = state.dim() == 4
    if state.dim() not in (3, 4):
        raise ValueError(f"state must be (batch, dim, N) or (batch, heads, headdim, N); got {tuple(state.shape)}")
    state4, x, dt, A, B, C, D, z, dt_bias = _heads_layout(state, x, dt, A, B, C, D, z, dt_bias)
    _, heads, headdim, d_state = state4.shape
    batch = x.shape[0]
    expected = {"x": (x, (batch, heads, headdim)), "dt": (dt, (batch, heads, headdim)),
                "A": (A, (heads, headdim, d_state)), "D": (D, (heads, headdim)), "z": (z, (batch, heads, headdim)),
                "dt_bias": (dt_bias, (heads, headdim))}
    for name, (value, shape) in expected.items():
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for a state of shape {tuple(state.shape)} "
                             f"(mamba_ssm's layout); got {tuple(value.shape)}")
    if B.dim() != 3 or B.shape[0] != batch or B.shape[2] != d_state or heads % B.shape[1] != 0:
        raise ValueError(f"B must be (batch={batch}, groups dividing heads={heads}, N={d_state}); "
                         f"got {tuple(B.shape)}")
    rows = valid = None
    if state_batch_indices is None:
        if state4.shape[0] != batch:
            raise ValueError(f"state must have batch={batch} rows without state_batch_indices; "
                             f"got {tuple(state.shape)}")
        before = state4
    else:
        check_tensor("state_batch_indices", state_batch_indices, floating=False)
        if tuple(state_batch_indices.shape) != (batch,) or state_batch_indices.is_floating_point():
            raise ValueError(f"state_batch_indices must be an integer (batch={batch},) tensor; got "
                             f"{tuple(state_batch_indices.shape)} {state_batch_indices.dtype}")
        indices = state_batch_indices.to(torch.int64)
        valid = indices >= 0
        rows = indices[valid]
        before = state4[rows]
        x, dt, B, C, z = (None if t is None else t[valid] for t in (x, dt, B, C, z))
    n = before.shape[0]
    channels = heads * headdim
    # per-head channels flattened: channel h * headdim + p; group of channel c is c // (channels // groups),
    # the group of head h, so Mamba-1's op with grouped B, C is exactly the per-head update
    dtype = _widest(before, x, dt, A, B, C, D, z, dt_bias)
    y, after = _ops_state_update(
        before.reshape(n, channels, d_state).to(dtype), x.reshape(n, channels).to(dtype),
        dt.reshape(n, channels).to(dtype), A.reshape(channels, d_state).to(dtype), B.to(dtype), C.to(dtype),
        D=None if D is None else D.reshape(channels).to(dtype),
        z=None if z is None else z.reshape(n, channels).to(dtype),
        dt_bias=None if dt_bias is None else dt_bias.reshape(channels).to(dtype),
        dt_softplus=dt_softplus, backend=backend)
    after = after.reshape(n, heads, headdim, d_state).to(state.dtype)
    y = y.reshape(n, heads, headdim)
    with torch.no_grad():
        if rows is None:
            state4.copy_(after)
        else:
            state4[rows] = after
    if valid is None:
        out = y.to(x.dtype)
    else:
        out = x.new_zeros(batch, heads, headdim)
        out[valid] = y.to(x.dtype)
    return out if has_heads else out[:, 0]


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One decoding step; updates ``state`` in place and returns y (mamba_ssm's semantics).

    Args (Mamba-1 layout / per-head layout):
        state: (batch, dim, N) / (batch, heads, headdim, N); with ``state_batch_indices`` any number of rows.
        x, dt, z: (batch, dim) / (batch, heads, headdim).
        A: (dim, N) / (heads, headdim, N).
        B, C: (batch, N) / (batch, groups, N), groups dividing heads.
        D, dt_bias: (dim,) / (heads, headdim).
        dt_softplus: dt <- softplus(dt + dt_bias).
        state_batch_indices: optional (batch,) integer rows of ``state``; < 0 marks padding.

    Returns:
        y like x, in x's dtype (zeros for padded elements).
    """
    return _state_update("auto", state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """:func:`selective_state_update` by the plain PyTorch reference (also in place)."""
    return _state_update("torch", state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, None)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False, state_dtype=None):
    """Mamba-2's SSD over whole sequences (see :func:`ssmkit.ops.ssd`), with mamba_ssm's signature.

    ``cu_seqlens`` / ``return_varlen_states`` (per-sequence final states of a packed row) are not offered;
    pass ``seq_idx`` for packed sequences. ``state_dtype`` sets the dtype of the returned final states.
    """
    if cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("ssmkit.compat.mamba_ssm.mamba_chunk_scan_combined does not offer cu_seqlens / "
                                  "return_varlen_states; pass seq_idx (batch, L) for packed sequences")
    out = _ssd(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
               dt_limit=dt_limit, initial_states=initial_states, seq_idx=seq_idx,
               return_final_states=return_final_states)
    if return_final_states and state_dtype is not None:
        return out[0], out[1].to(state_dtype)
    return out


def ssd_chunk_scan_combined_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False):
    """:func:`mamba_chunk_scan_combined` by the sequential loop over time (the specification)."""
    return _ssd(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                backend="reference")
