"""The Mamba-3 SSM core, one token at a time: the specification.

Lahoti et al. 2026, "Mamba-3: Improved Sequence Modeling using State Space Principles", arXiv 2603.15569,
Sec. 3 (the three methodological changes: the exponential-trapezoidal discretisation, the complex-valued
state written as a data-dependent rotary embedding of B and C, and the multi-input multi-output (MIMO) state
update; sub-section and equation numbers were not checked against the paper here, the formulas are those of
the authors' reference code). Per head (the state S is
(headdim, d_state); SISO is rank R = 1):

    theta_t  = theta_{t-1} + Delta_t * angle_rate_t                      cumulative rotation angles (n_angles)
    q_t^r    = Rot(theta_t) C_t^r,   k_t^r = Rot(theta_t) B_t^r          the complex state as RoPE on B and C
    alpha_t  = exp(Delta_t A_t)
    S_t      = alpha_t S_{t-1}
               + (1 - lambda_t) Delta_t alpha_t sum_r v_{t-1}^r (k_{t-1}^r)^T     trapezoid: the left end point
               + lambda_t Delta_t sum_r v_t^r (k_t^r)^T                          and the right end point
    y_t^r    = S_t q_t^r + D v_t^r

lambda_t in (0, 1) is the data-dependent trapezoid weight (lambda = 1 is Mamba-2's exponential-Euler rule).
Rot(theta) rotates pairs of state channels by the angles theta (the first n_angles pairs; the rest pass):
``rotary_pairs="adjacent"`` pairs (0, 1), (2, 3), ... as the authors' SISO kernels do, ``"halves"`` pairs
(i, i + d_state / 2) as their MIMO kernels do. This is the loop of the authors' step references
(state-spaces/mamba, tests/ops/triton/test_mamba3_siso.py ``mamba3_siso_step_ref`` and
tests/ops/tilelang/test_mamba3_mimo.py ``mamba3_MIMO_step_ref``), which tests/ops/test_mamba3.py compares
with through a fixture. Angles are kept modulo 2 pi, as theirs.

Glossary (code name: paper symbol; shapes with R = rank, H = heads, N = d_state, P = headdim, S = n_angles):

===============  ==========================================================================================
``q``            C_t + C_bias per rank before rotation, (batch, L, R, H, N)
``k``            B_t + B_bias per rank before rotation, (batch, L, R, H, N)
``v``            x_t per rank (MIMO: x_t * mimo_x[r]), (batch, L, R, H, P)
``adt``          Delta_t A_t <= 0, (batch, L, H)
``dt``           Delta_t > 0, (batch, L, H)
``trap``         lambda_t in (0, 1), (batch, L, H)
``angle_rates``  the rotation speed (pi tanh of the projection in the layer), (batch, L, H, S)
``D``            the skip, (H,)
state            (theta (batch, H, S), S (batch, H, P, N), k_{t-1} rotated (batch, R, H, N),
                 v_{t-1} (batch, R, H, P))
===============  ==========================================================================================
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .._precision import compute_dtype
from .args import check_mamba3_args

TWO_PI = 2 * math.pi


def rotate(x: torch.Tensor, angles: torch.Tensor, pairs: str) -> torch.Tensor:
    """Rotate pairs of the last dim of x (..., N) by angles (..., S) (broadcast); pairs beyond S pass."""
    n_angles = angles.shape[-1]
    cos, sin = torch.cos(angles), torch.sin(angles)
    if pairs == "adjacent":
        pairs_view = x.unflatten(-1, (-1, 2))
        first, second = pairs_view[..., :n_angles, 0], pairs_view[..., :n_angles, 1]
        rotated = torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1)
        return torch.cat([rotated.flatten(-2), x[..., 2 * n_angles:]], dim=-1)
    half = x.shape[-1] // 2
    first, second = x[..., :n_angles], x[..., half:half + n_angles]
    return torch.cat([first * cos - second * sin, x[..., n_angles:half],
                      first * sin + second * cos, x[..., half + n_angles:]], dim=-1)


def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    return theta - TWO_PI * torch.floor(theta / TWO_PI)


def mamba3_step(q_t, k_t, v_t, adt_t, dt_t, trap_t, angle_rates_t, D, state, rotary_pairs: str):
    """One step on tensors already in the compute dtype (no checks): q_t, k_t (B, R, H, N), v_t (B, R, H, P),
    adt_t, dt_t, trap_t (B, H), angle_rates_t (B, H, S), state (theta, S, k_prev, v_prev) ->
    y_t (B, R, H, P), new state."""
    theta, ssm, k_prev, v_prev = state
    theta = wrap_angle(theta + dt_t.unsqueeze(-1) * angle_rates_t)
    q_rot = rotate(q_t, theta.unsqueeze(1), rotary_pairs)                           # (B, R, H, N)
    k_rot = rotate(k_t, theta.unsqueeze(1), rotary_pairs)
    alpha = torch.exp(adt_t)[..., None, None]                                       # (B, H, 1, 1)
    left = ((1 - trap_t) * dt_t)[..., None, None] * alpha
    right = (trap_t * dt_t)[..., None, None]
    ssm = (alpha * ssm + left * torch.einsum("brhp,brhn->bhpn", v_prev, k_prev)
           + right * torch.einsum("brhp,brhn->bhpn", v_t, k_rot))
    y = torch.einsum("bhpn,brhn->brhp", ssm, q_rot)
    if D is not None:
        y = y + D[:, None] * v_t
    return y, (theta, ssm, k_rot, v_t)


def zero_state(batch, rank, heads, d_state, headdim, n_angles, dtype, device):
    return (torch.zeros(batch, heads, n_angles, dtype=dtype, device=device),
            torch.zeros(batch, heads, headdim, d_state, dtype=dtype, device=device),
            torch.zeros(batch, rank, heads, d_state, dtype=dtype, device=device),
            torch.zeros(batch, rank, heads, headdim, dtype=dtype, device=device))


def mamba3_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor,
               trap: torch.Tensor, angle_rates: torch.Tensor, D: Optional[torch.Tensor] = None,
               initial_state: Optional[Tuple[torch.Tensor, ...]] = None, return_final_state: bool = False,
               rotary_pairs: str = "adjacent"):
    """The Mamba-3 core over a sequence, one step at a time (module docstring for shapes and symbols).

    Returns:
        y (batch, L, R, H, P) in q's dtype, and the final state (theta, S, k_L rotated, v_L) in the compute
        dtype when ``return_final_state``.
    """
    batch, length, rank, heads, d_state, headdim, n_angles = check_mamba3_args(
        q, k, v, adt, dt, trap, angle_rates, D, initial_state, rotary_pairs)
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v, adt, dt, trap, angle_rates = (t.to(dtype) for t in (q, k, v, adt, dt, trap, angle_rates))
    D = None if D is None else D.to(dtype)
    state = (zero_state(batch, rank, heads, d_state, headdim, n_angles, dtype, q.device) if initial_state is None
             else tuple(t.to(dtype) for t in initial_state))
    ys = []
    for t in range(length):
        y_t, state = mamba3_step(q[:, t], k[:, t], v[:, t], adt[:, t], dt[:, t], trap[:, t], angle_rates[:, t], D,
                                 state, rotary_pairs)
        ys.append(y_t)
    y = torch.stack(ys, dim=1).to(out_dtype)
    return (y, state) if return_final_state else y


def mamba3_step_checked(q_t, k_t, v_t, adt_t, dt_t, trap_t, angle_rates_t, D, state, rotary_pairs="adjacent"):
    """One step with the argument checks: per-token tensors without the length dim (q_t (B, R, H, N), ...),
    state the 4-tuple (never None) -> y_t (B, R, H, P) in q_t's dtype, new state in the compute dtype."""
    check_mamba3_args(*(t.unsqueeze(1) for t in (q_t, k_t, v_t, adt_t, dt_t, trap_t, angle_rates_t)), D, state,
                      rotary_pairs)
    dtype = compute_dtype(q_t.dtype)
    y, new_state = mamba3_step(*(t.to(dtype) for t in (q_t, k_t, v_t, adt_t, dt_t, trap_t, angle_rates_t)),
                               None if D is None else D.to(dtype), tuple(s.to(dtype) for s in state), rotary_pairs)
    return y.to(q_t.dtype), new_state
