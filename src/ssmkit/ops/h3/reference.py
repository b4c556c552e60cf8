"""The specification of H3's core: the two SSMs and the Q read-out, one token at a time.

H3 (Fu, Dao et al. 2023, Sec. 3.1 and Algorithm 1) with H heads of d = head_dim channels each. Per token t,
with q_t, k_t, v_t the projections of the input (each (H, d) after splitting the channels into heads):

    shift SSM on K (per channel c, state x of N taps, A = the shift matrix S, S x = (0, x_0, ..., x_{N-2})):
        x_t = S x_{t-1} + B k_t,        kbar_t = C . x_t + D_shift k_t
    outer product per head:             (kv_t)_{h, i, j} = kbar_{t, h, i} v_{t, h, j}          (d x d)
    diagonal SSM on every entry of kv_t (per head h, N2 complex modes, conjugate-symmetric as S4D):
        z_t = Abar z_{t-1} + Bbar kv_t,  s_t = 2 Re(C . z_t) + D kv_t
    Q read-out:                          y_{t, h, j} = sum_i q_{t, h, i} s_{t, h, i, j}

With B = e_1 (the paper's choice, and the authors' initialisation) the shift state is the last N values of
k, newest first, and kbar_t = sum_n C_n k_{t-n}: a short causal convolution of K.

Output channel layout: y is returned as (batch, d * H) with channel j * H + h (head-dimension index outer),
the layout of the authors' code (``rearrange(y, 'b d h l -> b (d h) l')``), so their output projection
weights apply unchanged.

Glossary (code name: paper symbol): ``shift_B``, ``shift_C``, ``shift_D`` (d_model, N): B, C, D of the
shift SSM on K; ``dtA`` (H, N2) complex: log Abar of the diagonal SSM; ``Bbar``, ``C`` (H, N2) complex;
``D`` (H,): its skip term; ``shift_state`` (batch, d_model, N): x; ``kv_state`` (batch, H, d, d, N2)
complex: z, one diagonal state per entry of the d x d outer product of each head.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..._checks import check_positive_int, check_tensor

__all__ = ["H3System", "shift_ssm_step", "shift_ssm_ref", "h3_step", "h3_ref"]


class H3System(NamedTuple):
    """The discrete systems of one H3 layer (module docstring glossary)."""

    shift_B: torch.Tensor  # (d_model, N) real
    shift_C: torch.Tensor  # (d_model, N) real
    shift_D: torch.Tensor  # (d_model,) real
    dtA: torch.Tensor  # (H, N2) complex, log Abar
    Bbar: torch.Tensor  # (H, N2) complex
    C: torch.Tensor  # (H, N2) complex
    D: torch.Tensor  # (H,) real


def check_system(system: H3System, d_model: int, head_dim: int) -> Tuple[int, int, int]:
    """Validate the shapes of ``system`` against d_model and head_dim; return (H, N_shift, N2)."""
    if not isinstance(system, H3System):
        raise TypeError(f"system must be an H3System; got {type(system).__name__}")
    check_positive_int("head_dim", head_dim)
    if d_model % head_dim:
        raise ValueError(f"head_dim must divide d_model; got head_dim={head_dim}, d_model={d_model}")
    H = d_model // head_dim
    N = system.shift_B.shape[-1]
    for name in ("shift_B", "shift_C"):
        value = check_tensor(name, getattr(system, name))
        if tuple(value.shape) != (d_model, N):
            raise ValueError(f"{name} must be (d_model={d_model}, N={N}); got {tuple(value.shape)}")
    if tuple(check_tensor("shift_D", system.shift_D).shape) != (d_model,):
        raise ValueError(f"shift_D must be (d_model={d_model},); got {tuple(system.shift_D.shape)}")
    N2 = system.dtA.shape[-1]
    for name in ("dtA", "Bbar", "C"):
        value = check_tensor(name, getattr(system, name), complex_ok=True)
        if not value.is_complex() or tuple(value.shape) != (H, N2):
            raise ValueError(f"{name} must be complex (H={H}, N2={N2}); got {value.dtype} {tuple(value.shape)}")
    if tuple(check_tensor("D", system.D).shape) != (H,):
        raise ValueError(f"D must be (H={H},); got {tuple(system.D.shape)}")
    return H, N, N2


def shift_ssm_step(u_t: torch.Tensor, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of the shift SSM: x <- S x + B u_t (the register moves one tap older), y = C . x + D u_t.

    Args: u_t (batch, H); x (batch, H, N); B, C (H, N); D (H,) or None.
    Returns: y_t (batch, H), new x (batch, H, N).
    """
    shifted = torch.cat([torch.zeros_like(x[..., :1]), x[..., :-1]], -1)  # S x: drop the oldest tap
    x = shifted + B * u_t[..., None]
    y = (C * x).sum(-1)
    if D is not None:
        y = y + D * u_t
    return y, x


def shift_ssm_ref(u: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                  x0: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The shift SSM over a sequence, step by step: u (batch, H, L) -> y (batch, H, L), final x (batch, H, N)."""
    batch, H, _ = u.shape
    x = x0 if x0 is not None else u.new_zeros(batch, H, B.shape[-1])
    ys = []
    for u_t in u.unbind(-1):
        y_t, x = shift_ssm_step(u_t, x, B, C, D)
        ys.append(y_t)
    return torch.stack(ys, -1), x


def h3_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, system: H3System, head_dim: int,
            shift_state: torch.Tensor, kv_state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token of H3's core (module docstring; the paper's Algorithm 1 at one position).

    Args:
        q_t, k_t, v_t: (batch, d_model) projections of the token.
        system: the discrete systems; head_dim: d.
        shift_state: (batch, d_model, N) real.  kv_state: (batch, H, d, d, N2) complex.

    Returns:
        y_t (batch, d_model) in the (j, h) channel layout, new shift_state, new kv_state.
    """
    batch, d_model = k_t.shape
    H, _, _ = check_system(system, d_model, head_dim)
    kbar, shift_state = shift_ssm_step(k_t, shift_state, system.shift_B, system.shift_C, system.shift_D)
    kv = kbar.view(batch, H, head_dim, 1) * v_t.view(batch, H, 1, head_dim)  # (batch, H, d_i, d_j)
    Abar = torch.exp(system.dtA)[:, None, None, :]  # (H, 1, 1, N2)
    kv_state = Abar * kv_state + system.Bbar[:, None, None, :] * kv[..., None]
    s = 2 * (system.C[:, None, None, :] * kv_state).sum(-1).real + system.D[:, None, None] * kv
    y = (q_t.view(batch, H, head_dim, 1) * s).sum(2)  # (batch, H, d_j): sum over i
    return y.transpose(1, 2).reshape(batch, d_model), shift_state, kv_state


def h3_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, system: H3System, head_dim: int,
           shift_state: Optional[torch.Tensor] = None, kv_state: Optional[torch.Tensor] = None
           ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """H3's core over a sequence, token by token (the specification of :func:`ssmkit.ops.h3.h3_fft`).

    Args:
        q, k, v: (batch, d_model, L).  system, head_dim: as :func:`h3_step`.
        shift_state, kv_state: initial states (zeros when None).

    Returns:
        y (batch, d_model, L), (final shift_state, final kv_state).
    """
    batch, d_model, _ = k.shape
    H, N, N2 = check_system(system, d_model, head_dim)
    if shift_state is None:
        shift_state = k.new_zeros(batch, d_model, N)
    if kv_state is None:
        kv_state = torch.zeros(batch, H, head_dim, head_dim, N2, dtype=system.dtA.dtype, device=k.device)
    ys = []
    for q_t, k_t, v_t in zip(q.unbind(-1), k.unbind(-1), v.unbind(-1)):
        y_t, shift_state, kv_state = h3_step(q_t, k_t, v_t, system, head_dim, shift_state, kv_state)
        ys.append(y_t)
    return torch.stack(ys, -1), (shift_state, kv_state)
