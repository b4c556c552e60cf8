"""VMamba's SS2D mixer: the 2-D selective scan (Liu, Tian, Zhao, Yu, Xie, Wang, Ye, Liu 2024, "VMamba: Visual
State Space Model", arXiv 2401.10166: the 2D-Selective-Scan (SS2D) with its cross-scan and cross-merge).

Over a grid of Hp x Wp patch tokens (x of (batch, L = Hp Wp, d_model), row-major):

    v, z   = in_proj(x).chunk(2)                          # (B, L, E) each
    v      = silu(depthwise_conv2d(v on the Hp x Wp grid))  # 3 x 3, not causal
    cross-scan: four sequences of the L tokens:
        k = 0 row-major, 1 column-major, 2 reversed row-major, 3 reversed column-major
    y_k    = S6_k(sequence k)                              # selective scan, own x_proj, Delta, A, D per direction
    cross-merge: y = sum_k y_k put back in token order
    out    = out_proj(LayerNorm(y) * silu(z))

This is the SS2D block of the paper's VSS block (the hierarchical backbone with patch merging is not built:
the classifier of :mod:`ssmkit.models.vision` stacks SS2D mixers at one resolution, like Vim). Parameter names
follow the authors' code: ``x_proj_weight`` (K, R + 2N, E), ``dt_projs_weight`` (K, E, R), ``dt_projs_bias``
(K, E), ``A_logs`` (K E, N), ``Ds`` (K E,), ``conv2d``, ``out_norm``; initialisation as Mamba's (Delta's
projection, A = -(1..N), D = 1). The four directions run as one selective scan over K E channels, with B and
C in K groups (each direction's own).

Glossary (code name: paper symbol): ``d_model`` C (channels); ``d_inner`` E; ``d_state`` N; ``dt_rank`` R;
``K`` = 4 scan directions.

Per-direction recurrence (:mod:`ssmkit.layers.directional`): direction k is a causal selective scan over the
convolved tokens in scan order k; the 2-D convolution before it reads neighbours on every side, so it is
part of the shared input (:meth:`VMamba.direction_inputs`), not of a direction.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int
from ..ops.mamba import selective_scan
from .directional import (DirectionalMixer, Grid, gather_in_order, init_dt_projection, s4d_real_log_A,
                          scatter_to_tokens, selective_ssm_step)
from .mamba import check_dt_range, inner_width

DIRECTIONS = ("row-major", "column-major", "reversed row-major", "reversed column-major")


def cross_scan_orders(height: int, width: int, device=None) -> torch.Tensor:
    """(4, height * width) token indices (row-major numbering) of the four SS2D scans (module docstring)."""
    rows = torch.arange(height * width, device=device)
    columns = rows.reshape(height, width).t().reshape(-1)
    return torch.stack([rows, columns, rows.flip(0), columns.flip(0)])


class VMamba(DirectionalMixer):
    """VMamba's SS2D mixer; see the module docstring.

    Args:
        d_model: channels.  d_state: N.  d_conv: the depthwise 2-D convolution's kernel (odd).
        expand: E = int(expand * d_model).  dt_rank: int or "auto" (ceil(d_model / 16)).
        dt_min, dt_max, dt_init_floor: Mamba's Delta initialisation.
        backend: the selective scan's backend (execution only).

    Shapes: forward x (batch, Hp * Wp, d_model), grid = (Hp, Wp) -> (batch, Hp * Wp, d_model).
    """

    n_directions = 4
    needs_grid = True

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: Union[int, float] = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, backend: Optional[str] = None):
        super().__init__(d_model, backend)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_conv = check_positive_int("d_conv", d_conv)
        if d_conv % 2 == 0:
            raise ValueError(f"d_conv must be odd (a centred 2-D kernel); got {d_conv}")
        self.d_inner = inner_width(d_model, expand)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif isinstance(dt_rank, str):
            raise ValueError(f"dt_rank must be a positive int or 'auto'; got {dt_rank!r}")
        self.dt_rank = check_positive_int("dt_rank", dt_rank)
        check_dt_range(dt_min, dt_max, dt_init_floor)
        K, E, N, R = 4, self.d_inner, self.d_state, self.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv2d = nn.Conv2d(E, E, kernel_size=d_conv, padding=d_conv // 2, groups=E, bias=True)
        bound = E ** -0.5  # nn.Linear's default initialisation, per direction
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, E).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, E, R))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, E))
        init_dt_projection(self.dt_projs_weight, self.dt_projs_bias, dt_min, dt_max, dt_init_floor)
        self.A_logs = nn.Parameter(s4d_real_log_A(E, N).repeat(K, 1))       # (K E, N)
        self.Ds = nn.Parameter(torch.ones(K * E))
        self.out_norm = nn.LayerNorm(E)
        self.out_proj = nn.Linear(E, d_model, bias=False)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}")

    # ----------------------------------------------------------------------------------------------
    def scan_orders(self, length: int, grid: Grid = None, device=None) -> torch.Tensor:
        if grid is None or grid[0] * grid[1] != length:
            raise ValueError(f"grid must be (height, width) with height * width = length={length}; got {grid!r}")
        return cross_scan_orders(grid[0], grid[1], device)

    def direction_inputs(self, x: torch.Tensor, grid: Grid = None) -> torch.Tensor:
        batch, length, _ = x.shape
        v = self.in_proj(x)[..., : self.d_inner]                             # (B, L, E)
        v = v.transpose(1, 2).reshape(batch, self.d_inner, grid[0], grid[1])
        v = F.silu(self.conv2d(v))                                           # (B, E, Hp, Wp)
        return v.reshape(batch, self.d_inner, length).transpose(1, 2)        # (B, L, E)

    def direction_outputs(self, x: torch.Tensor, grid: Grid = None) -> torch.Tensor:
        batch, length, _ = x.shape
        K, E, N, R = 4, self.d_inner, self.d_state, self.dt_rank
        orders = self.scan_orders(length, grid, x.device)
        xs = gather_in_order(self.direction_inputs(x, grid), orders)         # (B, K, E, L)
        x_dbl = torch.einsum("bkel,kce->bkcl", xs, self.x_proj_weight)       # (B, K, R + 2N, L)
        dt, B, C = x_dbl.split([R, N, N], dim=2)                             # B, C: (B, K, N, L) = K groups
        delta = torch.einsum("bkrl,ker->bkel", dt, self.dt_projs_weight)     # (B, K, E, L)
        y = selective_scan(xs.reshape(batch, K * E, length), delta.reshape(batch, K * E, length),
                           -torch.exp(self.A_logs), B.contiguous(), C.contiguous(), D=self.Ds,
                           delta_bias=self.dt_projs_bias.reshape(-1), delta_softplus=True)
        return scatter_to_tokens(y.reshape(batch, K, E, length), orders)     # (K, B, L, E)

    def merge(self, x: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        z = self.in_proj(x)[..., self.d_inner:]                              # (B, L, E)
        return self.out_proj(self.out_norm(outputs.sum(0)) * F.silu(z))

    def init_direction_state(self, direction: int, batch_size: int) -> Dict[str, torch.Tensor]:
        self._check_direction(direction)
        return {"ssm": self.Ds.new_zeros(batch_size, self.d_inner, self.d_state)}

    def direction_step(self, direction: int, v_t: torch.Tensor, state: Dict[str, torch.Tensor]):
        self._check_direction(direction)
        k, E = direction, self.d_inner
        rows = slice(k * E, (k + 1) * E)
        with self._execution():
            y, ssm_state = selective_ssm_step(state["ssm"], v_t, self.x_proj_weight[k], self.dt_projs_weight[k],
                                              self.dt_projs_bias[k], self.A_logs[rows], self.Ds[rows],
                                              self.dt_rank)
        return y, {"ssm": ssm_state}
