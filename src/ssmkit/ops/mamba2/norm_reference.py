"""Mamba-2's gated RMSNorm, the specification (Dao & Gu 2024, Sec. 7.3: a normalisation before the output
projection, gated by the ``z`` branch).

    norm_before_gate=False:  out = rmsnorm(x * silu(z)) * weight
    norm_before_gate=True:   out = rmsnorm(x) * weight * silu(z)

rmsnorm divides each group of ``group_size`` consecutive channels by its root mean square,
sqrt(mean(v^2) + eps). Half-precision inputs are normalised in float32 and the result cast back to x's dtype.
Shapes: x, z (..., hidden) and weight (hidden,) -> (..., hidden).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._precision import compute_dtype


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.to(compute_dtype(t.dtype))


def rmsnorm_gated_ref(x: torch.Tensor, z: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                      group_size: int, norm_before_gate: bool) -> torch.Tensor:
    dtype = x.dtype
    x, w = _up(x), _up(weight)
    gate = F.silu(_up(z)) if z is not None else None
    if gate is not None and not norm_before_gate:
        x = x * gate
    groups = x.unflatten(-1, (-1, group_size))                    # (..., G, group_size)
    rms = torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)
    out = (groups * rms).flatten(-2) * w
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(dtype)
