"""The Mamba-3 core in chunks: quadratic (attention-like) inside each chunk, the state passed between chunks.

Same arguments and results as :func:`~ssmkit.ops.mamba3.reference.mamba3_ref`. Unrolling the trapezoidal
update (reference.py), the left end point of step s + 1 acts on v_s k_s^T, so every input enters the state
once with the weight

    scale_s = lambda_s Delta_s + (1 - lambda_{s+1}) Delta_{s+1}                 (Delta_{L} = 0 past the end)

and decays from s on: S_t = sum_{s<=t} exp(a_t - a_s) scale_s sum_r v_s^r (k_s^r)^T (+ the initial state), with
a_t the cumulative sum of Delta A. At t itself the second half of scale_t has not happened yet, so

    y_t^r' = sum_{s<=t} exp(a_t - a_s) scale_s sum_r (q_t^r' . k_s^r) v_s^r
             - (1 - lambda_{t+1}) Delta_{t+1} sum_r (q_t^r' . k_t^r) v_t^r + D v_t^r'

(the authors' chunked reference, ``mamba3_siso_fwd_ref`` / ``mamba3_MIMO_chunk_ref``, is built the same way).
A given initial state enters as S_0 + (1 - lambda_0) Delta_0 sum_r v_{-1}^r (k_{-1}^r)^T decayed by exp(a_t).
The decays are formed as exp(a_t - a_s), s <= t, inside a chunk (exponent <= 0), never as a ratio of
cumulative decays; chunks pass a state that holds the pending left end point of their last step, which the
next chunk's first output reads with the right decay. Plain autograd gives the gradients.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..._checks import check_positive_int
from .._precision import compute_dtype
from .args import check_mamba3_args
from .reference import rotate, wrap_angle, zero_state

DEFAULT_CHUNK_SIZE = 32


def mamba3_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor,
                   trap: torch.Tensor, angle_rates: torch.Tensor, D: Optional[torch.Tensor] = None,
                   initial_state: Optional[Tuple[torch.Tensor, ...]] = None, return_final_state: bool = False,
                   rotary_pairs: str = "adjacent", chunk_size: int = DEFAULT_CHUNK_SIZE):
    """The Mamba-3 core by chunks (module docstring); shapes as in ``mamba3_ref``."""
    batch, length, rank, heads, d_state, headdim, n_angles = check_mamba3_args(
        q, k, v, adt, dt, trap, angle_rates, D, initial_state, rotary_pairs)
    chunk = check_positive_int("chunk_size", chunk_size)
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v, adt, dt, trap, angle_rates = (t.to(dtype) for t in (q, k, v, adt, dt, trap, angle_rates))
    theta0, ssm, k_prev, v_prev = (zero_state(batch, rank, heads, d_state, headdim, n_angles, dtype, q.device)
                                   if initial_state is None else tuple(t.to(dtype) for t in initial_state))

    theta = wrap_angle(theta0.unsqueeze(1) + torch.cumsum(dt.unsqueeze(-1) * angle_rates, dim=1))  # (B, L, H, S)
    q = rotate(q, theta.unsqueeze(2), rotary_pairs)                                 # (B, L, R, H, N)
    k = rotate(k, theta.unsqueeze(2), rotary_pairs)
    left_next = F.pad(((1 - trap) * dt)[:, 1:], (0, 0, 0, 1))                       # (1 - lambda_{t+1}) Delta_{t+1}
    scale = trap * dt + left_next                                                   # (B, L, H)
    # the initial state with the left end point of step 0, which reads the previous token's k and v
    ssm = ssm + ((1 - trap[:, 0]) * dt[:, 0])[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_prev, k_prev)
    final_k, final_v, final_theta = k[:, -1], v[:, -1], theta[:, -1]

    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length

    def chunks(t):  # (B, L, ...) -> (B, n, C, ...), zero-padded: padding steps neither decay nor write
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, n_chunks, chunk, *t.shape[2:])

    q, k, v, adt, scale, left_next = (chunks(t) for t in (q, k, v, adt, scale, left_next))
    a = torch.cumsum(adt, dim=2)                                                    # (B, n, C, H)
    steps = torch.arange(chunk, device=q.device)
    causal = (steps[:, None] >= steps[None, :])[..., None]                          # (C, C, 1): s <= t
    decay = torch.exp((a.unsqueeze(3) - a.unsqueeze(2)).masked_fill(~causal, float("-inf")))  # (B, n, t, s, H)
    scores = torch.einsum("bctxhd,bcsrhd->bctxsrh", q, k)                           # q_t^x . k_s^r
    weights = scores * (decay * scale.unsqueeze(2)).unsqueeze(3).unsqueeze(5)       # (B, n, t, x, s, r, H)
    y = torch.einsum("bctxsrh,bcsrhp->bctxhp", weights, v)
    same_step = torch.einsum("bctxhd,bctrhd->bctxrh", q, k) * left_next[:, :, :, None, None, :]
    y = y - torch.einsum("bctxrh,bctrhp->bctxhp", same_step, v)
    to_end = torch.exp(a[:, :, -1:] - a) * scale                                    # (B, n, C, H)
    chunk_decay = torch.exp(a[:, :, -1])                                            # (B, n, H)
    decay_from_start = torch.exp(a)                                                 # (B, n, C, H)
    for c in range(n_chunks):
        read = torch.einsum("bhpn,btxhn->btxhp", ssm, q[:, c]) * decay_from_start[:, c][:, :, None, :, None]
        y[:, c] = y[:, c] + read
        ssm = chunk_decay[:, c][..., None, None] * ssm + torch.einsum("bsrhp,bsrhn,bsh->bhpn", v[:, c], k[:, c],
                                                                       to_end[:, c])
    y = y.reshape(batch, n_chunks * chunk, rank, heads, headdim)[:, :length]
    v = v.reshape(batch, n_chunks * chunk, rank, heads, headdim)[:, :length]
    if D is not None:
        y = y + D.to(dtype)[:, None] * v
    y = y.to(out_dtype)
    return (y, (final_theta, ssm, final_k, final_v)) if return_final_state else y
