"""The WKV-7 recurrence of RWKV-7 "Goose", one token at a time: the specification.

Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution", arXiv 2503.14456, Sec. 4
(the time-mixing block and its WKV state update, written with the transition
diag(w_t) - kappa_hat_t^T (a_t * kappa_hat_t); section and equation numbers are cited from memory of the
paper, the formulas as the authors' code computes them). Per head, with the state S a (value_dim, key_dim) matrix:

    S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T        a generalised delta rule
    y_t = S_t r_t

where w_t = exp(log_w_t) in (0, 1] is the per-key-channel decay, and the rank-one term removes what the state
holds along a_t and writes it back along b_t. RWKV-7's time mix passes a_t = -kappa_hat_t (the normalised
removal key) and b_t = kappa_hat_t * alpha_t (alpha_t the in-context learning rate), so the transition is
diag(w_t) - kappa_hat_t (kappa_hat_t * alpha_t)^T acting on the key side; the replacement key k_t (the paper's
k~_t) is what is written. This is the loop of the authors' naive reference (BlinkDL/RWKV-LM, RWKV-v7,
``RWKV7_OP``: ``state = state * w + state @ a @ b + v @ k``; ``out = state @ r``), whose state layout
(value, key) is kept here.

Glossary (code name: paper symbol):

=========  ==================================================================================
``r``      r_t, the receptance (the query), (batch, L, H, key_dim)
``log_w``  log w_t <= 0, the log of the data-dependent decay (the authors' kernel takes w and computes
           exp(-exp(w)); here ``log_w = -exp(w)``), (batch, L, H, key_dim)
``k``      k~_t, the replacement key written into the state, (batch, L, H, key_dim)
``v``      v_t, the value, (batch, L, H, value_dim)
``a``      the removal direction read from the state: -kappa_hat_t in RWKV-7, (batch, L, H, key_dim)
``b``      the direction it is written back along: kappa_hat_t * alpha_t in RWKV-7, (batch, L, H, key_dim)
``state``  S_t, (batch, H, value_dim, key_dim)
=========  ==================================================================================
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._precision import compute_dtype
from .args import check_wkv7_args


def _update(state, r_t, log_w_t, k_t, v_t, a_t, b_t):
    """One step on (B, H, ...) tensors already in the compute dtype; state (B, H, V, K) or None (zeros)."""
    write = v_t.unsqueeze(-1) * k_t.unsqueeze(-2)                                      # v k^T (B, H, V, K)
    if state is None:
        new_state = write
    else:
        removed = (state @ a_t.unsqueeze(-1))                                          # S a (B, H, V, 1)
        new_state = state * torch.exp(log_w_t).unsqueeze(-2) + removed * b_t.unsqueeze(-2) + write
    y_t = (new_state @ r_t.unsqueeze(-1)).squeeze(-1)                                  # S r (B, H, V)
    return y_t, new_state


def wkv7_step(r_t: torch.Tensor, log_w_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, a_t: torch.Tensor,
              b_t: torch.Tensor, state: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence (module docstring). Pure function.

    Args:
        r_t, log_w_t, k_t, a_t, b_t: (batch, H, key_dim); v_t: (batch, H, value_dim).
        state: S_{t-1}, (batch, H, value_dim, key_dim), or None for zeros.

    Returns:
        y_t (batch, H, value_dim) in r_t's dtype, and S_t (batch, H, value_dim, key_dim) in the compute dtype
        (float32 for half-precision inputs).
    """
    check_wkv7_args(r_t, log_w_t, k_t, v_t, a_t, b_t, state, time=False, state_name="state")
    dtype = compute_dtype(r_t.dtype)
    y_t, new_state = _update(None if state is None else state.to(dtype),
                             *(t.to(dtype) for t in (r_t, log_w_t, k_t, v_t, a_t, b_t)))
    return y_t.to(r_t.dtype), new_state


def wkv7_ref(r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
             b: torch.Tensor, initial_state: Optional[torch.Tensor] = None, return_final_state: bool = False):
    """The recurrence over a sequence, one step at a time.

    Args:
        r, log_w, k, a, b: (batch, L, H, key_dim); v: (batch, L, H, value_dim); any memory layout.
        initial_state: S before the first step, (batch, H, value_dim, key_dim); zeros if None.
        return_final_state: also return S after the last step.

    Returns:
        y (batch, L, H, value_dim) in r's dtype, and S_L (batch, H, value_dim, key_dim) in the compute dtype
        when ``return_final_state``.
    """
    check_wkv7_args(r, log_w, k, v, a, b, initial_state, time=True)
    out_dtype, dtype = r.dtype, compute_dtype(r.dtype)
    r, log_w, k, v, a, b = (t.to(dtype) for t in (r, log_w, k, v, a, b))
    state = None if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(r.shape[1]):
        y_t, state = _update(state, r[:, t], log_w[:, t], k[:, t], v[:, t], a[:, t], b[:, t])
        ys.append(y_t)
    y = torch.stack(ys, dim=1).to(out_dtype)
    return (y, state) if return_final_state else y
