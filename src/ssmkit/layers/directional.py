"""Multi-directional mixers for vision (Vim, VMamba): what they share and how the mixer contract applies.

A vision mixer maps patch tokens x (batch, L, d_model) to (batch, L, d_model) and reads the whole image: it
is not causal, so it is not registered with the causal mixers (:mod:`ssmkit.layers.registry`) and has no
``step``. It is made of K *directions*, each a causal recurrence (Mamba's selective SSM, :mod:`ssmkit.ops.mamba`)
over the tokens taken in one order: Vim's two are the token order and its reverse, VMamba's four the
row-major and column-major scans of the patch grid and their reverses. Their outputs, put back in token
order, are merged (summed or averaged).

**The contract, per direction.** The causal contract's recurrence test (forward == step by step) holds for
each direction on its own ordering of the tokens: :meth:`DirectionalMixer.direction_outputs` gives every
direction's output in token order from the parallel scan, and running :meth:`DirectionalMixer.direction_step`
over the tokens in :meth:`DirectionalMixer.scan_orders` ``[k]`` (that is, the flipped sequence for a backward
direction) from :meth:`DirectionalMixer.init_direction_state` must give the same numbers.
``tests/layers/test_vision_mixers.py`` checks that for every direction of every vision mixer, in float64
(and float32), with batch independence, gradients to every parameter, bad input, and that each output reads
tokens on both sides (the merge is really bidirectional).

What each direction reads (:meth:`DirectionalMixer.direction_inputs`) is computed before the scans and is
shared by the directions: Vim's input projection, VMamba's input projection and 2-D depthwise convolution
(which is not causal, so VMamba's directions are recurrences over the convolved tokens, as in the paper).
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_shape, check_tensor
from ..ops.backends import use_backend
from ..ops.mamba import BACKENDS as SCAN_BACKENDS
from ..ops.mamba import selective_scan, selective_state_update
from .mamba import inverse_softplus, log_uniform_dt

Grid = Optional[Tuple[int, int]]


def init_dt_projection(weight: torch.Tensor, bias: torch.Tensor, dt_min: float, dt_max: float,
                       dt_init_floor: float = 1e-4) -> None:
    """Mamba's initialisation of a Delta projection, in place: weight (..., d_inner, dt_rank) ~ U(+-dt_rank^-0.5),
    bias (..., d_inner) = softplus^-1(Delta), Delta ~ logUniform[dt_min, dt_max] floored at ``dt_init_floor``."""
    with torch.no_grad():
        std = weight.shape[-1] ** -0.5
        weight.uniform_(-std, std)
        dt = log_uniform_dt(bias.numel(), dt_min, dt_max, dt_init_floor).reshape(bias.shape)
        bias.copy_(inverse_softplus(dt))


def s4d_real_log_A(d_inner: int, d_state: int) -> torch.Tensor:
    """log(-A) for S4D-Real's A = -(1..N) per channel: (d_inner, N)."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(d_inner, -1).clone()


def selective_ssm(u: torch.Tensor, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor,
                  dt_proj_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor, dt_rank: int) -> torch.Tensor:
    """One direction's selective SSM over a whole sequence in its own order (Mamba's S6, Gu & Dao 2023 Alg. 2).

    u (batch, d_inner, L); x_proj_weight (dt_rank + 2N, d_inner); dt_proj_weight (d_inner, dt_rank);
    dt_proj_bias, D (d_inner,); A_log (d_inner, N) -> y (batch, d_inner, L) (no gate).
    """
    N = A_log.shape[-1]
    x_dbl = torch.matmul(x_proj_weight, u)                                   # (B, R + 2N, L)
    dt, B, C = x_dbl.split([dt_rank, N, N], dim=1)
    delta = torch.matmul(dt_proj_weight, dt)                                 # (B, d_inner, L)
    return selective_scan(u, delta, -torch.exp(A_log), B, C, D=D, delta_bias=dt_proj_bias, delta_softplus=True)


def selective_ssm_step(state: torch.Tensor, u_t: torch.Tensor, x_proj_weight: torch.Tensor,
                       dt_proj_weight: torch.Tensor, dt_proj_bias: torch.Tensor, A_log: torch.Tensor,
                       D: torch.Tensor, dt_rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`selective_ssm`: state (batch, d_inner, N), u_t (batch, d_inner) -> (y_t, new state)."""
    N = A_log.shape[-1]
    dt, B, C = F.linear(u_t, x_proj_weight).split([dt_rank, N, N], dim=-1)
    delta = F.linear(dt, dt_proj_weight)
    return selective_state_update(state, u_t, delta, -torch.exp(A_log), B, C, D=D, dt_bias=dt_proj_bias,
                                  dt_softplus=True)


class DirectionalMixer(nn.Module):
    """Base of the vision mixers (module docstring). A subclass sets ``n_directions`` and implements
    :meth:`scan_orders`, :meth:`direction_inputs`, :meth:`direction_outputs`, :meth:`merge`,
    :meth:`init_direction_state` and :meth:`direction_step`."""

    n_directions: int = 2
    #: whether ``forward`` needs the patch grid (height, width) in tokens
    needs_grid: bool = False

    def __init__(self, d_model: int, backend: Optional[str] = None):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int; got {d_model!r}")
        if backend is not None:
            check_choice("backend", backend, SCAN_BACKENDS)
        self.d_model = d_model
        #: execution only (as :attr:`ssmkit.layers.base.Mixer.backend`): the selective scan's backend
        self.backend = backend

    def _execution(self):
        return use_backend(self.backend) if self.backend not in (None, "auto") else contextlib.nullcontext()

    def _check(self, x: torch.Tensor, grid: Grid) -> Grid:
        check_tensor("x", x)
        check_shape("x", x, (None, None, self.d_model), f"(batch, length, d_model={self.d_model})")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must hold at least one batch row and one token; got shape {tuple(x.shape)}")
        if self.needs_grid:
            if grid is None or len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1
                                                     for g in grid):
                raise ValueError(f"grid must be (height, width) of the patch grid in tokens; got {grid!r}")
            if grid[0] * grid[1] != x.shape[1]:
                raise ValueError(f"grid {tuple(grid)} holds {grid[0] * grid[1]} tokens but x has length "
                                 f"{x.shape[1]}")
        return grid

    # ----------------------------------------------------------------------------------------------
    def scan_orders(self, length: int, grid: Grid = None, device=None) -> torch.Tensor:
        """(n_directions, L) int64: row k lists the token indices in the order direction k reads them."""
        raise NotImplementedError

    def direction_inputs(self, x: torch.Tensor, grid: Grid = None) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_inner), in token order: what every direction's recurrence reads."""
        raise NotImplementedError

    def direction_outputs(self, x: torch.Tensor, grid: Grid = None) -> torch.Tensor:
        """x (B, L, d_model) -> (n_directions, B, L, d_inner): each direction's output, put back in token order."""
        raise NotImplementedError

    def merge(self, x: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model) and the directions' outputs (K, B, L, d_inner) -> y (B, L, d_model)."""
        raise NotImplementedError

    def init_direction_state(self, direction: int, batch_size: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def direction_step(self, direction: int, v_t: torch.Tensor, state: Dict[str, torch.Tensor]):
        """Direction ``direction``'s recurrence, one token: v_t (B, d_inner) of :meth:`direction_inputs`,
        taken in that direction's order -> (y_t (B, d_inner), new state)."""
        raise NotImplementedError

    def _check_direction(self, direction: int) -> None:
        if isinstance(direction, bool) or not isinstance(direction, int) or not 0 <= direction < self.n_directions:
            raise ValueError(f"direction must be an int in [0, {self.n_directions}); got {direction!r}")

    def forward(self, x: torch.Tensor, grid: Grid = None) -> torch.Tensor:
        """x (batch, L, d_model) patch tokens (row-major over the grid) -> y (batch, L, d_model)."""
        grid = self._check(x, grid)
        with self._execution():
            return self.merge(x, self.direction_outputs(x, grid))


def gather_in_order(v: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """v (B, L, d) in token order, orders (K, L) -> (B, K, d, L): direction k's sequence, channel-first."""
    return v[:, orders].permute(0, 1, 3, 2)


def scatter_to_tokens(y: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """y (B, K, d, L) in each direction's order -> (K, B, L, d) in token order."""
    inverse = torch.argsort(orders, dim=-1)                                  # position of token t in order k
    return torch.stack([y[:, k, :, inverse[k]].transpose(1, 2) for k in range(orders.shape[0])])
