"""Causal linear attention as a mixer (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236).

    q, k, v = x W_q, x W_k, x W_v     (n_heads heads of size head_dim = d_model / n_heads)
    S_t = S_{t-1} + phi(k_t) v_t^T     z_t = z_{t-1} + phi(k_t)
    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)    (or phi(q_t)^T S_t without normalize)
    out = concat_heads(y) W_o

The parallel pass is the chunked form and the step the recurrent form, both in
:mod:`ssmkit.ops.linear_attention` (beside the sequential specification).

State, keys prefixed "linear_attention.": S (batch, n_heads, head_dim, head_dim) and
z (batch, n_heads, head_dim), the running sums above; z is kept without ``normalize`` too, so a state does
not depend on that flag's reading.

Glossary (code name -> paper symbol): phi = feature_map (paper eq. (7)); S = S_i, z = Z_i (eq. (18)-(19)).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import check_choice, check_positive_int
from ..ops.linear_attention import (DEFAULT_EPS, FEATURE_MAPS, feature_map, linear_attention_chunked,
                                    linear_attention_step)
from .base import Mixer, State, ssm_core_precision, state_dtype, to_core_dtype
from .registry import register_mixer


@register_mixer("linear_attention")
class LinearAttention(Mixer):
    """Causal linear attention with a fixed-size state (see the module docstring).

    Args:
        d_model: model width; must be divisible by n_heads.
        n_heads: heads; head_dim = d_model // n_heads.
        feature_map: phi: "elu" (elu + 1, the paper's), "relu" or "identity". With normalize, prefer a
            non-negative map: under "identity" the denominator can cancel to ~0.
        normalize: divide by phi(q_t)^T z_t + eps.
        chunk_size: tokens per chunk in the parallel pass (the numbers do not depend on it beyond rounding).
        eps: added to the denominator.
        bias: biases in the four projections.

    Shapes: forward x (batch, L, d_model) -> (batch, L, d_model); step x_t (batch, d_model).
    """

    pattern_letter = "L"
    contract_config = dict(n_heads=2)
    depth_scaled = ("o_proj.weight",)

    def __init__(self, d_model: int, n_heads: int = 8, feature_map: str = "elu", normalize: bool = True,
                 chunk_size: int = 64, eps: float = DEFAULT_EPS, bias: bool = False):
        super().__init__(d_model)
        check_positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads; got d_model={d_model}, n_heads={n_heads}")
        check_choice("feature_map", feature_map, FEATURE_MAPS)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool; got {type(normalize).__name__}")
        check_positive_int("chunk_size", chunk_size)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps must be a number >= 0; got {eps!r}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.feature_map, self.normalize, self.chunk_size, self.eps = feature_map, normalize, chunk_size, float(eps)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, feature_map={self.feature_map!r}, "
                f"normalize={self.normalize}, chunk_size={self.chunk_size}")

    def state_spec(self, batch_size: int):
        return {"S": ((batch_size, self.n_heads, self.head_dim, self.head_dim), "real"),
                "z": ((batch_size, self.n_heads, self.head_dim), "real")}

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> (..., n_heads, head_dim)."""
        return t.unflatten(-1, (self.n_heads, self.head_dim))

    def _forward(self, x: torch.Tensor, state: Optional[State], return_state: bool):
        q = feature_map(self._heads(self.q_proj(x)), self.feature_map).transpose(1, 2)   # (B, H, L, d_h)
        k = feature_map(self._heads(self.k_proj(x)), self.feature_map).transpose(1, 2)
        v = self._heads(self.v_proj(x)).transpose(1, 2)
        initial = None if state is None else (state[self.state_key("S")], state[self.state_key("z")])
        with ssm_core_precision(x):  # running sums over time in float32 (half-precision model or autocast)
            q, k, v = (to_core_dtype(t) for t in (q, k, v))
            out = linear_attention_chunked(q, k, v, normalize=self.normalize, eps=self.eps,
                                           chunk_size=self.chunk_size, initial_state=initial,
                                           return_final_state=return_state)
        y, final = out if return_state else (out, None)
        y = self.o_proj(y.to(x.dtype).transpose(1, 2).flatten(2))                        # (B, L, D)
        if not return_state:
            return y, None
        S, z = final
        return y, {self.state_key("S"): S.to(state_dtype(x.dtype)), self.state_key("z"): z.to(state_dtype(x.dtype))}

    def _step(self, x_t: torch.Tensor, state: State):
        q = feature_map(self._heads(self.q_proj(x_t)), self.feature_map)                 # (B, H, d_h)
        k = feature_map(self._heads(self.k_proj(x_t)), self.feature_map)
        v = self._heads(self.v_proj(x_t))
        with ssm_core_precision(x_t):
            q, k, v = (to_core_dtype(t) for t in (q, k, v))
            y, (S, z) = linear_attention_step(q, k, v, (state[self.state_key("S")], state[self.state_key("z")]),
                                              normalize=self.normalize, eps=self.eps)
        dtype = state_dtype(x_t.dtype)
        return self.o_proj(y.to(x_t.dtype).flatten(1)), {self.state_key("S"): S.to(dtype),
                                                         self.state_key("z"): z.to(dtype)}
