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
serve as the reference the fast paths are tested against. They also hold the argument checks every
backend shares.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..._checks import check_same_device, check_tensor


class ScanArgs(NamedTuple):
    """Validated arguments of a selective scan, with B and C in the 4-D layout (batch, groups, N, L)."""

    batch: int
    dim: int
    length: int
    d_state: int
    B: torch.Tensor
    C: torch.Tensor


def _check_real_tensors(required: dict, optional: dict) -> None:
    """Every argument a real floating-point tensor (``optional`` ones may be None)."""
    for name, value in list(required.items()) + [(k, v) for k, v in optional.items() if v is not None]:
        if isinstance(value, torch.Tensor) and value.is_complex():
            raise TypeError(f"{name} must be real (complex SSMs are not supported here); got dtype {value.dtype}")
        check_tensor(name, value)


def _check_bc(name: str, value, batch: int, dim: int, length: Optional[int], d_state: int) -> torch.Tensor:
    """Check B or C and return it as (batch, groups, N, L) (or (batch, groups, N) when ``length`` is None)."""
    _check_real_tensors({name: value}, {})
    if length is None:
        layout = f"(batch={batch}, N={d_state}) or (batch={batch}, groups, N={d_state})"
        expected_tail = (d_state,)
    else:
        layout = f"(batch={batch}, N={d_state}, L={length}) or (batch={batch}, groups, N={d_state}, L={length})"
        expected_tail = (d_state, length)
    shape = tuple(value.shape)
    k = len(expected_tail)
    if len(shape) not in (k + 1, k + 2) or shape[0] != batch or shape[-k:] != expected_tail:
        raise ValueError(f"{name} must be {layout}; got {shape}")
    if len(shape) == k + 1:
        value = value.unsqueeze(1)
    groups = value.shape[1]
    if groups < 1 or dim % groups != 0:
        raise ValueError(f"{name} has {groups} groups, which must divide dim={dim}; got {name} of shape {shape}")
    return value


def _check_dtypes(named: dict) -> None:
    items = [(k, v) for k, v in named.items() if v is not None]
    first_name, first = items[0]
    for name, value in items[1:]:
        if value.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but {first_name} has dtype {first.dtype}; "
                            "pass every tensor in one dtype")


def check_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None) -> ScanArgs:
    """Validate the arguments of :func:`selective_scan_ref` (shared by every backend).

    Raises ``TypeError`` for non-tensors and dtype mismatches, ``ValueError`` for shape and device
    mismatches, each naming the argument, the expected layout and what was received.
    """
    _check_real_tensors({"u": u, "delta": delta, "A": A}, {"D": D, "z": z, "delta_bias": delta_bias,
                                                           "initial_state": initial_state})
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, L); got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError(f"u must have a sequence length L >= 1; got {tuple(u.shape)}")
    if tuple(delta.shape) != (batch, dim, length):
        raise ValueError(f"delta must be (batch={batch}, dim={dim}, L={length}) like u; got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"A must be (dim={dim}, N); got {tuple(A.shape)}")
    d_state = A.shape[1]
    B4 = _check_bc("B", B, batch, dim, length, d_state)
    C4 = _check_bc("C", C, batch, dim, length, d_state)
    for name, value in (("D", D), ("delta_bias", delta_bias)):
        if value is not None and tuple(value.shape) != (dim,):
            raise ValueError(f"{name} must be (dim={dim},); got {tuple(value.shape)}")
    if z is not None and tuple(z.shape) != (batch, dim, length):
        raise ValueError(f"z must be (batch={batch}, dim={dim}, L={length}) like u; got {tuple(z.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, d_state):
        raise ValueError(f"initial_state must be (batch={batch}, dim={dim}, N={d_state}); "
                         f"got {tuple(initial_state.shape)}")
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
             "initial_state": initial_state}
    check_same_device(named)
    params = {"A": A, "D": D, "delta_bias": delta_bias}
    if u.dtype in HALF_DTYPES and all(v is None or v.dtype in (u.dtype, torch.float32) for v in params.values()):
        # as mamba_ssm: float32 parameters beside half-precision activations (a model kept in float32 under
        # autocast, or its parameters upcast); they are checked among themselves only
        _check_dtypes({k: v for k, v in named.items() if k not in params})
    else:
        _check_dtypes(named)
    return ScanArgs(batch, dim, length, d_state, B4, C4)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def mixed_precision(u, A, D=None, delta_bias=None) -> bool:
    """Whether float32 parameters (A, D, delta_bias) come with half-precision activations (u, delta, B, C, z)."""
    return u.dtype in HALF_DTYPES and any(v is not None and v.dtype != u.dtype for v in (A, D, delta_bias))


def check_state_update_args(state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    """Validate the arguments of :func:`selective_state_update_ref`; return B, C as (batch, groups, N)."""
    _check_real_tensors({"state": state, "x": x, "dt": dt, "A": A}, {"D": D, "z": z, "dt_bias": dt_bias})
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, dim); got {tuple(x.shape)}")
    batch, dim = x.shape
    if A.dim() != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"A must be (dim={dim}, N); got {tuple(A.shape)}")
    d_state = A.shape[1]
    if tuple(state.shape) != (batch, dim, d_state):
        raise ValueError(f"state must be (batch={batch}, dim={dim}, N={d_state}); got {tuple(state.shape)}")
    for name, value in (("dt", dt), ("z", z)):
        if value is not None and tuple(value.shape) != (batch, dim):
            raise ValueError(f"{name} must be (batch={batch}, dim={dim}) like x; got {tuple(value.shape)}")
    for name, value in (("D", D), ("dt_bias", dt_bias)):
        if value is not None and tuple(value.shape) != (dim,):
            raise ValueError(f"{name} must be (dim={dim},); got {tuple(value.shape)}")
    B3 = _check_bc("B", B, batch, dim, None, d_state)
    C3 = _check_bc("C", C, batch, dim, None, d_state)
    named = {"state": state, "x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias}
    check_same_device(named)
    _check_dtypes(named)
    return B3, C3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scan runs in: float32 for half-precision inputs, else the input's own."""
    return torch.promote_types(dtype, torch.float32)


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
        y (batch, dim, L) in u's dtype, or ``(y, last_state)`` with last_state (batch, dim, N).
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
    return (y, h.to(dtype_in)) if return_last_state else y


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
