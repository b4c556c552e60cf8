"""Argument checks shared by every backend of the WKV-7 op (reference, chunked, step)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._checks import check_shape, check_tensor

NAMES = ("r", "log_w", "k", "v", "a", "b")


def check_wkv7_args(r, log_w, k, v, a, b, state: Optional[torch.Tensor], time: bool,
                    state_name: str = "initial_state") -> Tuple[int, int, int, int]:
    """Validate the WKV-7 arguments; returns (batch, n_heads, key_dim, value_dim).

    ``time``: the per-token tensors are (batch, L, n_heads, dim); otherwise one token, (batch, n_heads, dim).
    """
    for name, value in zip(NAMES, (r, log_w, k, v, a, b)):
        check_tensor(name, value)
    want_dims = 4 if time else 3
    layout = "(batch, length, n_heads, key_dim)" if time else "(batch, n_heads, key_dim)"
    if r.dim() != want_dims:
        raise ValueError(f"r must be {layout}; got {tuple(r.shape)}")
    if time and r.shape[1] == 0:
        raise ValueError(f"r must hold at least one time step; got shape {tuple(r.shape)}")
    key_shape = tuple(r.shape)
    for name, value in (("log_w", log_w), ("k", k), ("a", a), ("b", b)):
        check_shape(name, value, key_shape, f"{key_shape} like r")
    if v.dim() != want_dims or tuple(v.shape[:-1]) != key_shape[:-1]:
        raise ValueError(f"v must be {key_shape[:-1] + ('value_dim',)} (r's leading sizes); got {tuple(v.shape)}")
    batch, heads, key_dim, value_dim = r.shape[0], r.shape[-2], r.shape[-1], v.shape[-1]
    if state is not None:
        check_tensor(state_name, state)
        want = (batch, heads, value_dim, key_dim)
        check_shape(state_name, state, want, f"(batch={batch}, n_heads={heads}, value_dim={value_dim}, "
                                             f"key_dim={key_dim})")
    for name, value in zip(NAMES[1:] + (state_name,), (log_w, k, v, a, b, state)):
        if value is not None and value.dtype != r.dtype:
            raise TypeError(f"{name} must have the dtype of r ({r.dtype}); got {value.dtype}")
    devices = {t.device for t in (r, log_w, k, v, a, b, state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"the WKV-7 arguments must be on one device; got {sorted(map(str, devices))}")
    return batch, heads, key_dim, value_dim
