"""Argument checks shared by every backend of the Mamba-3 SSM op."""

from __future__ import annotations

from typing import Optional, Tuple

from ..._checks import check_shape, check_tensor

ROTARY_PAIRINGS = ("adjacent", "halves")


def check_mamba3_args(q, k, v, adt, dt, trap, angle_rates, D, initial_state: Optional[Tuple], rotary_pairs: str):
    """Validate the Mamba-3 core's arguments; returns (batch, L, rank, n_heads, d_state, headdim, n_angles)."""
    for name, value in (("q", q), ("k", k), ("v", v), ("adt", adt), ("dt", dt), ("trap", trap),
                        ("angle_rates", angle_rates)):
        check_tensor(name, value)
    if q.dim() != 5:
        raise ValueError(f"q must be (batch, length, rank, n_heads, d_state); got {tuple(q.shape)}")
    batch, length, rank, heads, d_state = q.shape
    if length == 0:
        raise ValueError(f"q must hold at least one time step; got shape {tuple(q.shape)}")
    check_shape("k", k, tuple(q.shape), f"{tuple(q.shape)} like q")
    if v.dim() != 5 or tuple(v.shape[:4]) != (batch, length, rank, heads):
        raise ValueError(f"v must be (batch={batch}, length={length}, rank={rank}, n_heads={heads}, headdim); "
                         f"got {tuple(v.shape)}")
    headdim = v.shape[-1]
    for name, value in (("adt", adt), ("dt", dt), ("trap", trap)):
        check_shape(name, value, (batch, length, heads), f"(batch={batch}, length={length}, n_heads={heads})")
    if angle_rates.dim() != 4 or tuple(angle_rates.shape[:3]) != (batch, length, heads):
        raise ValueError(f"angle_rates must be (batch={batch}, length={length}, n_heads={heads}, n_angles); "
                         f"got {tuple(angle_rates.shape)}")
    n_angles = angle_rates.shape[-1]
    if rotary_pairs not in ROTARY_PAIRINGS:
        raise ValueError(f"rotary_pairs must be one of {ROTARY_PAIRINGS}; got {rotary_pairs!r}")
    if d_state % 2 or 2 * n_angles > d_state:
        raise ValueError(f"d_state must be even and hold 2 * n_angles; got d_state={d_state}, n_angles={n_angles}")
    tensors = {"k": k, "v": v, "adt": adt, "dt": dt, "trap": trap, "angle_rates": angle_rates}
    if D is not None:
        check_tensor("D", D)
        check_shape("D", D, (heads,), f"(n_heads={heads},)")
        tensors["D"] = D
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 4:
            raise TypeError("initial_state must be a tuple (angle, ssm, k, v); got "
                            f"{type(initial_state).__name__}")
        shapes = {"angle": (batch, heads, n_angles), "ssm": (batch, heads, headdim, d_state),
                  "k": (batch, rank, heads, d_state), "v": (batch, rank, heads, headdim)}
        for (part, want), value in zip(shapes.items(), initial_state):
            check_tensor(f"initial_state {part}", value)
            check_shape(f"initial_state {part}", value, want, str(want))
            tensors[f"initial_state {part}"] = value
    for name, value in tensors.items():
        if value.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}); got {value.dtype}")
    devices = {t.device for t in (q, *tensors.values())}
    if len(devices) > 1:
        raise ValueError(f"the Mamba-3 arguments must be on one device; got {sorted(map(str, devices))}")
    return batch, length, rank, heads, d_state, headdim, n_angles
