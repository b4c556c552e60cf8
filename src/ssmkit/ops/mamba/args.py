"""Argument checks of Mamba's selective scan and its one-token update, shared by every backend (reference,
torch, cpp, triton). Shapes and names as in :mod:`.reference`.

Each raises ``TypeError`` for non-tensors and dtype mismatches and ``ValueError`` for shape and device
mismatches, naming the argument, the expected layout and what was received.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..._checks import check_same_device, check_tensor
from .._precision import HALF_DTYPES


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
    params = {"A": A, "D": D, "delta_bias": delta_bias, "initial_state": initial_state}
    if u.dtype in HALF_DTYPES and all(v is None or v.dtype in (u.dtype, torch.float32) for v in params.values()):
        # as mamba_ssm: float32 parameters beside half-precision activations (a model kept in float32 under
        # autocast, or its parameters upcast), and a float32 state (the scan returns its last state in
        # float32 for half-precision inputs); they are checked among themselves only
        _check_dtypes({k: v for k, v in named.items() if k not in params})
    else:
        _check_dtypes(named)
    return ScanArgs(batch, dim, length, d_state, B4, C4)


def mixed_precision(u, A, D=None, delta_bias=None, initial_state=None) -> bool:
    """Whether float32 parameters (A, D, delta_bias) or a float32 initial state come with half-precision
    activations (u, delta, B, C, z)."""
    return u.dtype in HALF_DTYPES and any(v is not None and v.dtype != u.dtype
                                          for v in (A, D, delta_bias, initial_state))


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
    fp32_ok = {"state": state, "A": A, "D": D, "dt_bias": dt_bias}
    if x.dtype in HALF_DTYPES and all(v is None or v.dtype in (x.dtype, torch.float32) for v in fp32_ok.values()):
        # as mamba_ssm: a float32 state (a half-precision model's recurrent state) and float32 parameters
        # beside half-precision activations; the update computes in float32 and returns y in x's dtype
        _check_dtypes({k: v for k, v in named.items() if k not in fp32_ok})
    else:
        _check_dtypes(named)
    return B3, C3
