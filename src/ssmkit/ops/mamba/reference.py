"""Mamba's selective scan, written as the plain sequential recurrence: the specification.

Mamba (Gu & Dao 2023, arXiv 2312.00752), Algorithm 2 and Eq. (2a)/(2b) with the discretisation of Sec. 2:
for each channel ``d`` and state ``n``, over time ``t``,

    Delta_t      = softplus(delta_t + delta_bias)        (only with ``delta_softplus``; else delta_t + delta_bias)
    h_t[n]       = exp(Delta_t A[n]) h_{t-1}[n] + Delta_t B_t[n] u_t      (ZOH for A, Euler for B)
    y_t          = sum_n C_t[n] h_t[n] + D u_t
    y_t          = y_t * silu(z_t)                       (only when ``z`` is given)

Glossary (code name = paper symbol):

=================  ==================================================================================
``u``              x, the input sequence, (batch, dim, L)
``delta``          Delta before the bias and softplus, (batch, dim, L)
``A``              A, real and diagonal per channel, (dim, N); stable when negative
``B``, ``C``       B, C, input-dependent, (batch, N, L) or (batch, groups, N, L); channel ``d`` uses
                   group ``d // (dim // groups)``
``D``              D, the skip connection, (dim,)
``z``              the gate branch z of the Mamba block, (batch, dim, L)
``h``, ``state``   h, the hidden state, (batch, dim, N)
``N``              d_state, the state size per channel
=================  ==================================================================================

The functions here iterate time with ``unbind`` (never ``x[..., t]`` inside autograd, which makes the
backward quadratic in L) and compute in ``float32`` or wider (``float64`` inputs stay ``float64``), so they
serve as the reference the fast paths are tested against. The argument checks every backend shares are in
:mod:`.args`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._precision import compute_dtype
from .args import check_scan_args, check_state_update_args


def per_channel(bc: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, groups, N, ...) -> (batch, dim, N, ...): channel ``d`` takes group ``d // (dim // groups)``."""
    return bc.repeat_interleave(dim // bc.shape[1], dim=1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """Selective scan by the sequential recurrence (see the module docstring for the equations).

    Args:
        u, delta: (batch, dim, L).
        A: (dim, N), real.
        B, C: (batch, N, L) or (batch, groups, N, L), ``groups`` dividing ``dim``.
        D, delta_bias: optional (dim,).
        z: optional (batch, dim, L) gate: the output is multiplied by silu(z).
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return h_L.
        initial_state: optional h_0, (batch, dim, N); zeros when omitted.

    Returns:
        y (batch, dim, L) in u's dtype, or ``(y, last_state)`` with last_state (batch, dim, N) in the
        compute dtype: u's, or float32 for half-precision u (as mamba_ssm's ``last_state``), so that a
        half-precision model's float32 recurrent state is never rounded to 8 or 11 bits between calls.
    """
    args = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    work = compute_dtype(dtype_in)
    u, delta, A = u.to(work), delta.to(work), A.to(work)
    B = per_channel(args.B.to(work), args.dim)  # (batch, dim, N, L)
    C = per_channel(args.C.to(work), args.dim)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if initial_state is None:
        h = u.new_zeros(args.batch, args.dim, args.d_state)
    else:
        h = initial_state.to(work)
    ys = []
    for u_t, delta_t, B_t, C_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1)):
        # u_t, delta_t: (batch, dim); B_t, C_t: (batch, dim, N)
        h = torch.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)  # (batch, dim, L)
    if D is not None:
        y = y + D.to(work)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y  # the state in the compute dtype (float32 for half u)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step of the selective scan: the recurrence of :func:`selective_scan_ref` for a single token.

    Args:
        state: h_{t-1}, (batch, dim, N). Not modified: the new state is a new tensor, so autograd can run
            through a chain of steps.
        x, dt: (batch, dim), the token's u_t and delta_t.
        A: (dim, N); B, C: (batch, N) or (batch, groups, N); D, dt_bias: optional (dim,); z: optional
            (batch, dim).
        dt_softplus: apply softplus to ``dt + dt_bias``.

    Returns:
        ``(y (batch, dim), new_state (batch, dim, N))``, in x's and state's dtypes.
    """
    B3, C3 = check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    dim = x.shape[1]
    work = compute_dtype(x.dtype)
    x_w, dt, A = x.to(work), dt.to(work), A.to(work)
    B3 = per_channel(B3.to(work), dim)  # (batch, dim, N)
    C3 = per_channel(C3.to(work), dim)
    if dt_bias is not None:
        dt = dt + dt_bias.to(work)
    if dt_softplus:
        dt = F.softplus(dt)
    h = torch.exp(dt[..., None] * A) * state.to(work) + (dt * x_w)[..., None] * B3
    y = (h * C3).sum(-1)
    if D is not None:
        y = y + D.to(work) * x_w
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(x.dtype), h.to(state.dtype)
