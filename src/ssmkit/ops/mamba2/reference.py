"""The specification of Mamba-2's SSD (state space duality) layer: a plain sequential loop over time.

Dao & Gu 2024, "Transformers are SSMs" (arXiv 2405.21060), Sec. 3 / eq. (1) with a scalar-times-identity
A per head (Sec. 5). Per head h, with state h_t of shape (headdim, N):

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T        y_t = h_t C_t + D_h x_t        y_t <- y_t * silu(z_t)

Glossary (code name -> paper symbol):
    x      X, the input of each head, (batch, L, heads, headdim=P)
    dt     Delta, the step size, (batch, L, heads)
    A      A, the scalar (negative) state matrix of each head, (heads,)
    B, C   B and C, shared by the heads of one group, (batch, L, groups=G, N)
    D      D, the skip connection
    N      d_state, the state size; P headdim; G ngroups
    seq_idx   ids of sequences packed along L; the state restarts from zero where the id changes.

Semantics follow mamba_ssm's ``mamba_chunk_scan_combined``: ``dt <- dt + dt_bias``, then ``softplus`` when
``dt_softplus``, then a clamp to ``dt_limit`` when it is not the default ``(0, inf)``; the D skip is added
before the ``silu(z)`` gate. ``initial_states`` applies to the first packed sequence of each row only (for
rows whose ``seq_idx`` starts at 0, the usual case, this is what mamba_ssm does).

The checks and the ``dt`` preprocessing shared by every backend live here, beside the specification.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .._precision import compute_dtype
from .args import DEFAULT_DT_LIMIT, _check_dt_limit, check_ssd_inputs, check_state_update_inputs

# --------------------------------------------------------------------------------------------------
# Preprocessing shared with the fast paths (part of the specification)
# --------------------------------------------------------------------------------------------------
def process_dt(dt: torch.Tensor, dt_bias: Optional[torch.Tensor], dt_softplus: bool,
               dt_limit: Sequence[float]) -> torch.Tensor:
    """dt <- clamp(softplus(dt + dt_bias)) exactly as mamba_ssm orders it; shapes (..., heads)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        # softplus(t) = t above 20, as mamba_ssm (and F.softplus's default threshold) does
        dt = F.softplus(dt)
    lo, hi = _check_dt_limit(dt_limit)
    if (lo, hi) != DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def apply_skip_and_gate(y: torch.Tensor, x: torch.Tensor, D: Optional[torch.Tensor],
                        z: Optional[torch.Tensor]) -> torch.Tensor:
    """y + D x, then * silu(z); x, y, z (..., heads, headdim), D (heads,) or (heads, headdim)."""
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y


# --------------------------------------------------------------------------------------------------
# The specification
# --------------------------------------------------------------------------------------------------
def ssd_ref(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, dt_softplus=False,
            dt_limit=DEFAULT_DT_LIMIT, initial_states=None, seq_idx=None, return_final_states=False):
    """Sequential-loop SSD (the specification of :func:`ssmkit.ops.mamba2.ssd`).

    Args:
        x: (batch, L, heads, headdim).
        dt: (batch, L, heads).
        A: (heads,), negative reals.
        B, C: (batch, L, groups, N); head h reads group h // (heads // groups).
        chunk_size: accepted for a drop-in signature and checked, but unused (there are no chunks here).
        D: (heads,) or (heads, headdim), optional skip.
        z: (batch, L, heads, headdim), optional gate: y <- (y + D x) * silu(z).
        dt_bias, dt_softplus, dt_limit: dt <- clamp(softplus(dt + dt_bias), *dt_limit).
        initial_states: (batch, heads, headdim, N), the state before the first token of each row's first
            sequence.
        seq_idx: (batch, L) integer, non-decreasing per row; the state restarts from zero where it changes.
        return_final_states: also return the state after the last token.

    Returns:
        y (batch, L, heads, headdim) in x's dtype, or ``(y, final_states)`` with final_states
        (batch, heads, headdim, N) in the compute dtype (float32, or float64 for float64 inputs).
    """
    batch, length, heads, headdim, groups, N = check_ssd_inputs(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_limit, chunk_size)
    ctype = compute_dtype(x.dtype)
    xc, Bc, Cc = x.to(ctype), B.to(ctype), C.to(ctype)
    dt = process_dt(dt.to(ctype), None if dt_bias is None else dt_bias.to(ctype), dt_softplus, dt_limit)
    decay = torch.exp(dt * A.to(ctype))                          # (batch, L, heads)
    if seq_idx is not None:
        same = torch.ones(batch, length, dtype=ctype, device=x.device)
        same[:, 1:] = (seq_idx[:, 1:] == seq_idx[:, :-1]).to(ctype)
        decay = decay * same[:, :, None]                         # a new sequence forgets the old state
    ratio = heads // groups
    B_heads = Bc.repeat_interleave(ratio, dim=2)                 # (batch, L, heads, N)
    C_heads = Cc.repeat_interleave(ratio, dim=2)
    if initial_states is None:
        state = torch.zeros(batch, heads, headdim, N, dtype=ctype, device=x.device)
    else:
        state = initial_states.to(ctype)
    ys = []
    for x_t, dt_t, decay_t, B_t, C_t in zip(xc.unbind(1), dt.unbind(1), decay.unbind(1),
                                            B_heads.unbind(1), C_heads.unbind(1)):
        state = decay_t[:, :, None, None] * state + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C_t))
    y = torch.stack(ys, dim=1)                                   # (batch, L, heads, headdim)
    y = apply_skip_and_gate(y, xc, None if D is None else D.to(ctype), None if z is None else z.to(ctype))
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


# --------------------------------------------------------------------------------------------------
# One-token update
# --------------------------------------------------------------------------------------------------
def ssd_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                         dt_limit=DEFAULT_DT_LIMIT):
    """One step of the recurrence, head by head (the specification of :func:`ssd_state_update`).

    Args: state (batch, heads, headdim, N); x, z (batch, heads, headdim); dt (batch, heads); A, dt_bias
    (heads,); B, C (batch, groups, N); D (heads,) or (heads, headdim).
    Returns: ``(y (batch, heads, headdim) in x's dtype, new_state in state's dtype)``; ``state`` is not
    modified.
    """
    batch, heads, headdim, groups, N = check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias, dt_limit)
    ctype = compute_dtype(x.dtype)
    dt = process_dt(dt.to(ctype), None if dt_bias is None else dt_bias.to(ctype), dt_softplus, dt_limit)
    ratio = heads // groups
    new_states, ys = [], []
    for h in range(heads):
        g = h // ratio
        s = torch.exp(dt[:, h] * A[h].to(ctype))[:, None, None] * state[:, h].to(ctype) \
            + (dt[:, h, None] * x[:, h].to(ctype))[:, :, None] * B[:, g, None, :].to(ctype)
        new_states.append(s)
        ys.append((s @ C[:, g, :, None].to(ctype))[..., 0])
    new_state = torch.stack(new_states, dim=1)
    y = torch.stack(ys, dim=1)
    y = apply_skip_and_gate(y, x.to(ctype), None if D is None else D.to(ctype), None if z is None else z.to(ctype))
    return y.to(x.dtype), new_state.to(state.dtype)
