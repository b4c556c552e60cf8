"""RWKV-7's channel mix (Peng et al. 2025, arXiv 2503.14456, Sec. 4): a ReLU^2 MLP on a token-shifted input.

    k   = relu(key(x_t + (x_{t-1} - x_t) * x_k))^2          (B, L, hidden), hidden = 4 C
    out = value(k)                                          (B, L, C)

Names and initialisation as the authors' ``RWKV_CMix_x070`` (BlinkDL/RWKV-LM, RWKV-v7): ``x_k`` (1, 1, C) =
1 - (i / C)^((1 - layer_id / n_layers)^4), ``key`` ~ U(+-0.5 / sqrt C), ``value`` = 0. It is RWKV-7's second
sub-block: an RWKV-7 layer is the time mix (:mod:`ssmkit.layers.rwkv7`, letter ``R``) then this (``K``), each
with its own pre-norm and residual, ``ModelConfig(mixer="RK" * n_layers, mlp="none")``.

Glossary: ``x_k`` mu_k, the token-shift mix; state ``shift`` x_{t-1}, the previous token's input (batch, C).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .._checks import check_positive_int
from .base import Mixer, State, state_dtype
from .registry import register_mixer
from .rwkv7 import _channel_fraction, _check_bool, _check_depth, _shifted


@register_mixer("rwkv7_channel_mix")
class RWKV7ChannelMix(Mixer):
    """RWKV-7 channel mix (Sec. 4): k = relu(key(x + (x_{t-1} - x) * x_k))^2, out = value(k).

    Args:
        d_model: C.
        hidden_dim: the hidden width (the authors' 4 C when None).
        layer_id, n_layers: the layer's depth, read by the initialisation of ``x_k`` only.
        zero_init_output: the authors' zero ``value`` weight (True), or U(+-0.5 / sqrt C) like ``key``.

    State: ``{"rwkv7_channel_mix.shift": (batch, C)}``, the previous token's input.
    Shapes: forward x (batch, L, d_model) -> (batch, L, d_model); step x_t (batch, d_model).
    """

    pattern_letter = "K"
    contract_config = dict(hidden_dim=12, zero_init_output=False)  # as RWKV7's: a non-zero output to test
    depth_scaled = ("value.weight",)

    def __init__(self, d_model: int, hidden_dim: Optional[int] = None, layer_id: int = 0, n_layers: int = 1,
                 zero_init_output: bool = True):
        super().__init__(d_model)
        self.hidden_dim = 4 * d_model if hidden_dim is None else check_positive_int("hidden_dim", hidden_dim)
        self.layer_id, self.n_layers = _check_depth(layer_id, n_layers)
        self.zero_init_output = _check_bool("zero_init_output", zero_init_output)
        self.x_k = nn.Parameter(torch.empty(1, 1, d_model))
        self.key = nn.Linear(d_model, self.hidden_dim, bias=False)
        self.value = nn.Linear(self.hidden_dim, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        ratio_1_to_almost_0 = 1.0 - self.layer_id / self.n_layers
        self.x_k.copy_(1.0 - _channel_fraction(self.d_model) ** (ratio_1_to_almost_0 ** 4))
        bound = 0.5 / math.sqrt(self.d_model)
        self.key.weight.uniform_(-bound, bound)
        if self.zero_init_output:
            self.value.weight.zero_()
        else:
            self.value.weight.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, hidden_dim={self.hidden_dim}, layer_id={self.layer_id}"

    def state_spec(self, batch_size: int):
        return {"shift": ((batch_size, self.d_model), "cache")}

    def _mix(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        k = torch.relu(self.key(x + (x_prev - x) * self.x_k)) ** 2
        return self.value(k)

    def _forward(self, x, state, return_state):
        previous = None if state is None else state[self.state_key("shift")]
        out = self._mix(x, _shifted(x, previous))
        if not return_state:
            return out, None
        return out, {self.state_key("shift"): x[:, -1].to(state_dtype(x.dtype, "cache"))}

    def _step(self, x_t: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        x_prev = state[self.state_key("shift")].to(x_t.dtype)
        out = self._mix(x_t.unsqueeze(1), x_prev.unsqueeze(1))[:, 0]
        return out, {self.state_key("shift"): x_t.to(state_dtype(x_t.dtype, "cache"))}
