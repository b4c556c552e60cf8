"""Argument checks of Mamba-2's SSD and its one-token update, shared by every backend (reference, torch,
triton). Shapes and names as in :mod:`.reference`; each error names the argument, the expected shape or
dtype and what was received.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from ..._checks import check_positive_int, check_same_device, check_shape, check_tensor

DEFAULT_DT_LIMIT = (0.0, math.inf)


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
    """Validate the arguments of :func:`ssmkit.ops.ssd`; return ``(batch, L, heads, headdim, groups, N)``.

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


def check_state_update_inputs(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_limit=DEFAULT_DT_LIMIT):
    """Validate the arguments of :func:`ssmkit.ops.ssd_state_update`; return ``(batch, heads, headdim, groups, N)``."""
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
