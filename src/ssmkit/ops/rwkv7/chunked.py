"""WKV-7 in chunks: matrix products inside each chunk, the state passed from chunk to chunk.

Same arguments and results as :func:`~ssmkit.ops.rwkv7.reference.wkv7_ref`. Derivation (per head; S is
(V, K); inside a chunk t, s = 1..C count from its start, S_0 is the state before it):

The update S_t = S_{t-1} diag(w_t) + h_t b_t^T + v_t k_t^T with h_t = S_{t-1} a_t is a diagonal-decay
recurrence with two rank-one inputs, so with g_t = sum_{i<=t} log w_i (the in-chunk cumulative log decay):

    S_t = S_0 diag(exp g_t) + sum_{s<=t} (h_s b_s^T + v_s k_s^T) diag(exp(g_t - g_s))                 (1)

Reading (1) at t - 1 along a_t gives the h_t as a unit lower-triangular system (fla's DPLR / WY form):

    h_t - sum_{s<t} [sum_n a_tn b_sn e^(g_{t-1,n} - g_sn)] h_s
        = sum_{s<t} [sum_n a_tn k_sn e^(g_{t-1,n} - g_sn)] v_s + S_0 (a_t * exp g_{t-1})                (2)

solved by forward substitution (``solve_triangular``). Outputs and the next chunk's state are then (1) read
along r_t and at t = C. **Stability**: every decay factor is formed as exp(g_t - g_s) with s <= t, an exponent
<= 0, never as a ratio exp(g_t) / exp(g_s) of cumulative decays (which under- and overflows once the decays
compound over a long chunk); the pairs s > t are masked to -inf before the exponential. The price is one
(C, C, key_dim) tensor of pairwise decays per chunk, which is why the chunks are short (16 by default).

The in-chunk matrices of all chunks are formed at once; only the state passes through a loop over chunks.
Everything is plain autograd, so gradients (of the initial state too) come from PyTorch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._checks import check_positive_int
from .._precision import compute_dtype
from .args import check_wkv7_args

DEFAULT_CHUNK_SIZE = 16


def _chunks(t: torch.Tensor, n_chunks: int, chunk: int, dtype) -> torch.Tensor:
    """(B, L, H, D) -> (B, H, n_chunks, chunk, D), zero-padded at the end (a zero log decay keeps the state)."""
    batch, length, heads, dim = t.shape
    t = F.pad(t.to(dtype), (0, 0, 0, 0, 0, n_chunks * chunk - length))
    return t.reshape(batch, n_chunks, chunk, heads, dim).permute(0, 3, 1, 2, 4)


def wkv7_chunked(r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, initial_state: Optional[torch.Tensor] = None, return_final_state: bool = False,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
    """The WKV-7 recurrence by chunks (module docstring); shapes as in ``wkv7_ref``."""
    batch, heads, key_dim, value_dim = check_wkv7_args(r, log_w, k, v, a, b, initial_state, time=True)
    chunk = check_positive_int("chunk_size", chunk_size)
    length = r.shape[1]
    n_chunks = -(-length // chunk)
    out_dtype, dtype = r.dtype, compute_dtype(r.dtype)
    r, log_w, k, v, a, b = (_chunks(t, n_chunks, chunk, dtype) for t in (r, log_w, k, v, a, b))  # (B,H,N,C,D)

    g = torch.cumsum(log_w, dim=-2)                                   # g_t, inclusive     (B, H, N, C, K)
    g_before = g - log_w                                              # g_{t-1}
    steps = torch.arange(chunk, device=r.device)
    before = (steps[:, None] > steps[None, :]).unsqueeze(-1)          # s < t   (C, C, 1)
    up_to = (steps[:, None] >= steps[None, :]).unsqueeze(-1)          # s <= t
    # pairwise decays exp(g_{t-1} - g_s) (s < t) and exp(g_t - g_s) (s <= t); exponents <= 0 where kept
    decay_before = torch.exp((g_before.unsqueeze(-2) - g.unsqueeze(-3)).masked_fill(~before, float("-inf")))
    decay_up_to = torch.exp((g.unsqueeze(-2) - g.unsqueeze(-3)).masked_fill(~up_to, float("-inf")))

    def pair(left, right, decay):                                     # sum_n left_tn right_sn decay_tsn
        return torch.einsum("...tn,...sn,...tsn->...ts", left, right, decay)

    system = torch.eye(chunk, dtype=dtype, device=r.device) - pair(a, b, decay_before)   # (2): I - L_ab
    h_from_values = torch.linalg.solve_triangular(system, pair(a, k, decay_before) @ v, upper=False,
                                                  unitriangular=True)                     # (B, H, N, C, V)
    h_per_state = torch.linalg.solve_triangular(system, a * torch.exp(g_before), upper=False,
                                                unitriangular=True)                       # (B, H, N, C, K)
    read_b, read_k = pair(r, b, decay_up_to), pair(r, k, decay_up_to)                     # (B, H, N, C, C)
    r_decayed = r * torch.exp(g)                                                          # r_t * exp g_t
    to_end = torch.exp(g[..., -1:, :] - g)                                                # exp(g_C - g_s)
    b_to_end, k_to_end = b * to_end, k * to_end
    chunk_decay = torch.exp(g[..., -1, :]).unsqueeze(-2)                                  # (B, H, N, 1, K)

    state = (torch.zeros(batch, heads, value_dim, key_dim, dtype=dtype, device=r.device)
             if initial_state is None else initial_state.to(dtype))
    outputs = []
    for c in range(n_chunks):
        state_t = state.transpose(-1, -2)                                                 # (B, H, K, V)
        h = h_from_values[:, :, c] + h_per_state[:, :, c] @ state_t                       # (B, H, C, V)
        outputs.append(r_decayed[:, :, c] @ state_t + read_b[:, :, c] @ h + read_k[:, :, c] @ v[:, :, c])
        state = (state * chunk_decay[:, :, c] + h.transpose(-1, -2) @ b_to_end[:, :, c]
                 + v[:, :, c].transpose(-1, -2) @ k_to_end[:, :, c])
    y = torch.stack(outputs, dim=2)                                                       # (B, H, N, C, V)
    y = y.reshape(batch, heads, n_chunks * chunk, value_dim)[:, :, :length].transpose(1, 2).to(out_dtype)
    return (y, state) if return_final_state else y
