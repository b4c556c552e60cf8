"""Vim's bidirectional Mamba mixer (Zhu, Liao, Zhang, Wang, Liu, Wang 2024, "Vision Mamba: Efficient Visual
Representation Learning with Bidirectional State Space Model", arXiv 2401.09417, Sec. 3.3, Algorithm 1).

One mixer over the patch tokens (x of (batch, L, d_model), the class token among them):

    v, z     = in_proj(x).chunk(2)                               # (B, L, E) each, E = expand * d_model
    forward:   y_f = SSM_f(silu(conv1d_f(v)))                     # causal conv + selective scan, tokens 0..L-1
    backward:  y_b = flip(SSM_b(silu(conv1d_b(flip(v)))))         # the same on tokens L-1..0, own parameters
    out      = out_proj((y_f + y_b) / 2 * silu(z))                # merged, gated by z as in Mamba

Each direction has its own convolution, x_proj, dt_proj, A and D (SSM_f, SSM_b: Mamba's selective SSM,
:func:`ssmkit.layers.directional.selective_ssm`); the two share in_proj, the gate and out_proj. The averaging
of the two directions is Vim's released default (``if_devide_out``); ``divide_output=False`` sums them as the
paper's Algorithm 1 writes it. Parameter names follow the authors' code (``conv1d_b``, ``x_proj_b``,
``dt_proj_b``, ``A_b_log``, ``D_b`` for the backward direction) and mamba_ssm's for the rest, with Mamba's
initialisation (:mod:`ssmkit.layers.mamba`).

Glossary (code name: paper symbol): ``d_model`` D; ``d_inner`` E; ``d_state`` N; ``dt_rank`` R (the rank of
Delta's projection); ``A_log``, ``A_b_log`` log(-A) of the two directions (E, N); ``D``, ``D_b`` their skip
terms; direction 0 = "forward", 1 = "backward" (Algorithm 1's o and b).

Per-direction recurrence (:mod:`ssmkit.layers.directional`): direction 0 reads the tokens in order,
direction 1 reversed; each is exactly Mamba's causal conv + selective scan over its own ordering.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int
from ..ops.conv1d import causal_conv1d, causal_conv1d_update
from .directional import (DirectionalMixer, Grid, init_dt_projection, s4d_real_log_A,
                          selective_ssm, selective_ssm_step)
from .mamba import check_dt_range, inner_width


class Vim(DirectionalMixer):
    """Vim's bidirectional Mamba mixer; see the module docstring.

    Args:
        d_model: D.  d_state: N.  d_conv: width of each direction's causal convolution.
        expand: E = int(expand * D).  dt_rank: int or "auto" (ceil(D / 16)).
        dt_min, dt_max, dt_init_floor: Mamba's Delta initialisation.
        divide_output: average the two directions (Vim's default) instead of summing them.
        backend: the selective scan's backend (execution only).

    Shapes: forward x (batch, L, d_model) -> (batch, L, d_model).
    """

    n_directions = 2

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: Union[int, float] = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, divide_output: bool = True, backend: Optional[str] = None):
        super().__init__(d_model, backend)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_conv = check_positive_int("d_conv", d_conv)
        self.d_inner = inner_width(d_model, expand)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif isinstance(dt_rank, str):
            raise ValueError(f"dt_rank must be a positive int or 'auto'; got {dt_rank!r}")
        self.dt_rank = check_positive_int("dt_rank", dt_rank)
        check_dt_range(dt_min, dt_max, dt_init_floor)
        if not isinstance(divide_output, bool):
            raise TypeError(f"divide_output must be a bool; got {type(divide_output).__name__}")
        self.divide_output = divide_output
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.out_proj = nn.Linear(E, d_model, bias=False)
        for suffix in ("", "_b"):  # forward, backward
            conv = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1)
            x_proj = nn.Linear(E, R + 2 * N, bias=False)
            dt_proj = nn.Linear(R, E, bias=True)
            init_dt_projection(dt_proj.weight, dt_proj.bias, dt_min, dt_max, dt_init_floor)
            setattr(self, f"conv1d{suffix}", conv)
            setattr(self, f"x_proj{suffix}", x_proj)
            setattr(self, f"dt_proj{suffix}", dt_proj)
        self.A_log = nn.Parameter(s4d_real_log_A(E, N))
        self.A_b_log = nn.Parameter(s4d_real_log_A(E, N))
        self.D = nn.Parameter(torch.ones(E))
        self.D_b = nn.Parameter(torch.ones(E))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, divide_output={self.divide_output}")

    def _direction_parameters(self, direction: int):
        suffix = "" if direction == 0 else "_b"
        conv = getattr(self, f"conv1d{suffix}")
        A_log = self.A_log if direction == 0 else self.A_b_log
        D = self.D if direction == 0 else self.D_b
        return conv, getattr(self, f"x_proj{suffix}"), getattr(self, f"dt_proj{suffix}"), A_log, D

    # ----------------------------------------------------------------------------------------------
    def scan_orders(self, length: int, grid: Grid = None, device=None) -> torch.Tensor:
        order = torch.arange(length, device=device)
        return torch.stack([order, order.flip(0)])

    def direction_inputs(self, x: torch.Tensor, grid: Grid = None) -> torch.Tensor:
        return self.in_proj(x)[..., : self.d_inner]                         # (B, L, E)

    def direction_outputs(self, x: torch.Tensor, grid: Grid = None) -> torch.Tensor:
        v = self.direction_inputs(x).transpose(1, 2)                         # (B, E, L)
        outputs = []
        for direction in range(2):
            conv, x_proj, dt_proj, A_log, D = self._direction_parameters(direction)
            u = v if direction == 0 else v.flip(-1)
            u = causal_conv1d(u, conv.weight, conv.bias, activation="silu")
            y = selective_ssm(u, x_proj.weight, dt_proj.weight, dt_proj.bias, A_log, D, self.dt_rank)
            outputs.append(y if direction == 0 else y.flip(-1))
        return torch.stack(outputs).transpose(2, 3)                          # (2, B, L, E)

    def merge(self, x: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        z = self.in_proj(x)[..., self.d_inner:]                              # (B, L, E)
        y = outputs.sum(0)
        if self.divide_output:
            y = y / 2
        return self.out_proj(y * F.silu(z))

    def init_direction_state(self, direction: int, batch_size: int) -> Dict[str, torch.Tensor]:
        self._check_direction(direction)
        p = self.D
        return {"conv": p.new_zeros(batch_size, self.d_inner, self.d_conv - 1),
                "ssm": p.new_zeros(batch_size, self.d_inner, self.d_state)}

    def direction_step(self, direction: int, v_t: torch.Tensor, state: Dict[str, torch.Tensor]):
        self._check_direction(direction)
        conv, x_proj, dt_proj, A_log, D = self._direction_parameters(direction)
        with self._execution():
            u, conv_state = causal_conv1d_update(v_t, state["conv"], conv.weight, conv.bias, activation="silu")
            y, ssm_state = selective_ssm_step(state["ssm"], u, x_proj.weight, dt_proj.weight, dt_proj.bias, A_log,
                                              D, self.dt_rank)
        return y, {"conv": conv_state, "ssm": ssm_state}
