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

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..._checks import check_positive_int, check_same_device, check_shape, check_tensor

DEFAULT_DT_LIMIT = (0.0, math.inf)


# --------------------------------------------------------------------------------------------------
# Shared checks and preprocessing
# --------------------------------------------------------------------------------------------------
def _check_dt_limit(dt_limit) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise TypeError(f"dt_limit must be a pair of numbers (min, max); got {dt_limit!r}") from None
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"dt_limit must be (min, max) with min <= max; got {dt_limit!r}")
    return lo, hi


def _check_same_dtype(reference_name: str, reference: torch.Tensor, others: dict) -> None:
    for name, value in others.items():
        if value is not None and value.dtype != reference.dtype:
            raise TypeError(f"{name} must have the dtype of {reference_name} ({reference.dtype}); got {value.dtype}")


def _check_seq_idx(seq_idx, batch: int, length: int) -> None:
    if not isinstance(seq_idx, torch.Tensor):
        raise TypeError(f"seq_idx must be a torch.Tensor; got {type(seq_idx).__name__}")
    if seq_idx.is_floating_point() or seq_idx.is_complex() or seq_idx.dtype == torch.bool:
        raise TypeError(f"seq_idx must be an integer tensor; got dtype {seq_idx.dtype}")
    check_shape("seq_idx", seq_idx, (batch, length), f"(batch={batch}, L={length})")
    if length > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        row = int((seq_idx[:, 1:] < seq_idx[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(f"seq_idx must be non-decreasing along L in every row; row {row} decreases")


def _check_skip_gate_bias(x, D, z, dt_bias, heads: int, headdim: int) -> None:
    """The optional D (skip), z (gate) and dt_bias, shared by the sequence and one-token checks."""
    if D is not None:
        check_tensor("D", D)
        if tuple(D.shape) not in ((heads,), (heads, headdim)):
            raise ValueError(f"D must be (heads={heads},) or (heads={heads}, headdim={headdim}); "
                             f"got {tuple(D.shape)}")
    if z is not None:
        check_tensor("z", z)
        check_shape("z", z, tuple(x.shape), f"x's shape {tuple(x.shape)}")
    if dt_bias is not None:
        check_tensor("dt_bias", dt_bias)
        check_shape("dt_bias", dt_bias, (heads,), f"(heads={heads},)")


def check_ssd_inputs(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                     dt_limit=DEFAULT_DT_LIMIT, chunk_size=None):
    """Validate the arguments of :func:`ssd`; return ``(batch, L, heads, headdim, groups, N)``.

    x, dt, B, C and z (the activations) must share one dtype; A, D, dt_bias and initial_states may be kept
    in another floating dtype (mamba_ssm keeps A in float32 under bf16 activations).
    """
    check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, L, heads, headdim); got {tuple(x.shape)}")
    batch, length, heads, headdim = x.shape
    if length < 1:
        raise ValueError(f"x must have L >= 1; got {tuple(x.shape)}")
    check_tensor("dt", dt)
    check_shape("dt", dt, (batch, length, heads), f"(batch={batch}, L={length}, heads={heads})")
    check_tensor("A", A)
    check_shape("A", A, (heads,), f"(heads={heads},)")
    check_tensor("B", B)
    if B.dim() != 4 or B.shape[:2] != (batch, length):
        raise ValueError(f"B must be (batch={batch}, L={length}, groups, N); got {tuple(B.shape)}")
    groups, N = B.shape[2], B.shape[3]
    if groups < 1 or heads % groups != 0:
        raise ValueError(f"B's groups must divide heads={heads}; got groups={groups} (B {tuple(B.shape)})")
    check_tensor("C", C)
    check_shape("C", C, (batch, length, groups, N), f"(batch={batch}, L={length}, groups={groups}, N={N})")
    _check_skip_gate_bias(x, D, z, dt_bias, heads, headdim)
    if initial_states is not None:
        check_tensor("initial_states", initial_states)
        check_shape("initial_states", initial_states, (batch, heads, headdim, N),
                    f"(batch={batch}, heads={heads}, headdim={headdim}, N={N})")
    _check_same_dtype("x", x, {"dt": dt, "B": B, "C": C, "z": z})
    check_same_device({"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias,
                       "initial_states": initial_states, "seq_idx": seq_idx})
    if seq_idx is not None:
        _check_seq_idx(seq_idx, batch, length)
    _check_dt_limit(dt_limit)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    return batch, length, heads, headdim, groups, N


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate in at least float32 (bf16/fp16 activations are upcast, float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


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
    ctype = compute_dtype(x)
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
def check_state_update_inputs(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_limit=DEFAULT_DT_LIMIT):
    """Validate the arguments of :func:`ssd_state_update`; return ``(batch, heads, headdim, groups, N)``."""
    check_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, heads, headdim); got {tuple(x.shape)}")
    batch, heads, headdim = x.shape
    check_tensor("state", state)
    if state.dim() != 4 or state.shape[:3] != (batch, heads, headdim):
        raise ValueError(f"state must be (batch={batch}, heads={heads}, headdim={headdim}, N); "
                         f"got {tuple(state.shape)}")
    N = state.shape[3]
    check_tensor("dt", dt)
    check_shape("dt", dt, (batch, heads), f"(batch={batch}, heads={heads})")
    check_tensor("A", A)
    check_shape("A", A, (heads,), f"(heads={heads},)")
    check_tensor("B", B)
    if B.dim() != 3 or B.shape[0] != batch or B.shape[2] != N:
        raise ValueError(f"B must be (batch={batch}, groups, N={N}); got {tuple(B.shape)}")
    groups = B.shape[1]
    if groups < 1 or heads % groups != 0:
        raise ValueError(f"B's groups must divide heads={heads}; got groups={groups} (B {tuple(B.shape)})")
    check_tensor("C", C)
    check_shape("C", C, (batch, groups, N), f"(batch={batch}, groups={groups}, N={N})")
    _check_skip_gate_bias(x, D, z, dt_bias, heads, headdim)
    _check_same_dtype("x", x, {"dt": dt, "B": B, "C": C, "z": z})
    check_same_device({"state": state, "x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z,
                       "dt_bias": dt_bias})
    _check_dt_limit(dt_limit)
    return batch, heads, headdim, groups, N


def ssd_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                         dt_limit=DEFAULT_DT_LIMIT):
    """One step of the recurrence, head by head (the specification of :func:`ssd_state_update`).

    Args: state (batch, heads, headdim, N); x, z (batch, heads, headdim); dt (batch, heads); A, dt_bias
    (heads,); B, C (batch, groups, N); D (heads,) or (heads, headdim).
    Returns: ``(y (batch, heads, headdim) in x's dtype, new_state in state's dtype)``; ``state`` is not
    modified.
    """
    batch, heads, headdim, groups, N = check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias, dt_limit)
    ctype = compute_dtype(x)
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
