"""The chunked SSD algorithm in pure PyTorch (Dao & Gu 2024, "Transformers are SSMs", Sec. 6, Listing 1).

The sequence is cut into chunks of T = ``chunk_size`` tokens. With a_t = dt_t A_h (<= 0) and the in-chunk
cumulative sum cs_t = a_1 + ... + a_t, the output splits into four steps (paper Fig. 5):

1. intra-chunk (diagonal blocks), the quadratic "attention" form:
       Y_diag[t] = sum_{s <= t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s
   where exp(cs_t - cs_s) is the 1-semiseparable mask L = exp(segsum(a)); the exponent is <= 0 below the
   diagonal and set to -inf above it *before* the exponential, so no large positive number is ever
   exponentiated;
2. chunk states (right factors): S_c = sum_s exp(cs_T - cs_s) dt_s x_s B_s^T, the state a chunk leaves
   behind when it starts from zero;
3. state passing (centre factors): h_{c+1} = exp(cs_T of chunk c) h_c + S_c, a sequential loop over chunks
   (linear in the number of chunks, where the (chunks x chunks) decay-matrix form is quadratic);
4. state to output (left factors): Y_off[t] = exp(cs_t) h_c C_t for the state h_c entering the chunk.

y = Y_diag + Y_off, then the D skip and the silu(z) gate. Packed sequences (``seq_idx``) mask the decay
between tokens of different sequences in steps 1, 2 and 4 and cut the chain in step 3. No tensor of size
(batch, L, heads, headdim, N) is formed; the largest are (batch, chunks, heads, T, T) and the per-chunk
states (batch, chunks, heads, headdim, N), which are N / T times the size of x and are kept for the
backward: a larger chunk saves memory, a smaller one the quadratic work.

Glossary: see ``reference.py`` (x = X, dt = Delta, A, B, C, D; N = d_state, P = headdim, G = ngroups);
T = chunk_size, c = number of chunks, R = heads per group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .._precision import compute_dtype
from .args import DEFAULT_DT_LIMIT, check_ssd_inputs, check_state_update_inputs
from .reference import apply_skip_and_gate, process_dt


def _pad_length(t: torch.Tensor, extra: int) -> torch.Tensor:
    """Zero-pad dim 1 (the length) of t by ``extra`` entries."""
    if extra == 0:
        return t
    return F.pad(t, [0, 0] * (t.dim() - 2) + [0, extra])


def _decay_matrix(cs: torch.Tensor, same_seq: Optional[torch.Tensor]) -> torch.Tensor:
    """L[t, s] = exp(cs_t - cs_s) for s <= t (and same sequence), else 0: (b, c, H, T, T).

    The exponent is masked to -inf before the exponential, so only numbers <= 0 are exponentiated
    (cs is a cumulative sum of dt A <= 0, non-increasing in t).
    """
    T = cs.shape[-1]
    keep = torch.ones(T, T, dtype=torch.bool, device=cs.device).tril()
    if same_seq is not None:
        keep = (keep & same_seq)[:, :, None]                          # (b, c, 1, T, T)
    seg = cs[..., :, None] - cs[..., None, :]
    return seg.masked_fill_(~keep, float("-inf")).exp_()


class _ChunkedSSD(torch.autograd.Function):
    """The four SSD steps on padded, chunked inputs, with a hand-written backward.

    The backward recomputes the (T, T) blocks instead of saving them (autograd would keep several per
    head), runs every product as a batched matmul laid out for BLAS, and writes the reversed state
    passing into one preallocated buffer. It is checked against autograd through the reference.

    Inputs: x_dt (b, c, T, H, P) = dt x; a (b, c, T, H) = dt A; B, C (b, c, T, G, N); h0 (b, H, P, N) or
    None; same_seq (b, c, T, T) bool, to_end, from_start (b, c, T) and carry (b, c), or all None without
    seq_idx. Outputs: y (b, c, T, H, P), final state (b, H, P, N).
    """

    @staticmethod
    def forward(ctx, x_dt, a, B, C, h0, same_seq, to_end, from_start, carry):
        x_dt = x_dt.contiguous()                                             # the views below need it
        b, c, T, H, P = x_dt.shape
        G, N = B.shape[3], B.shape[4]
        R = H // G
        cs = a.transpose(2, 3).cumsum(dim=-1)                                # (b, c, H, T)
        cs_last = cs[..., -1]                                                # (b, c, H)
        Bg = B.transpose(2, 3)                                               # (b, c, G, T, N)
        Cg = C.transpose(2, 3)

        # 1. intra-chunk: y_diag = (L o C B^T) (dt x), head by head
        M = _decay_matrix(cs, same_seq)                                      # (b, c, H, T, T)
        M.view(b, c, G, R, T, T).mul_((Cg @ Bg.transpose(-1, -2))[:, :, :, None])
        x_dt_h = x_dt.transpose(2, 3).contiguous()                           # (b, c, H, T, P)
        y_diag = M @ x_dt_h                                                  # (b, c, H, T, P)
        del M

        # 2. chunk states: S = (w o dt x)^T B with w the decay to the chunk's end
        w = torch.exp(cs_last[..., None] - cs)                               # (b, c, H, T)
        if to_end is not None:
            w = w * to_end[:, :, None]
        x_w = x_dt * w.transpose(2, 3)[..., None]                            # (b, c, T, H, P)
        S = x_w.view(b, c, T, G, R * P).permute(0, 1, 3, 4, 2) @ Bg          # (b, c, G, R*P, N)
        S = S.view(b, c, H, P, N)

        # 3. state passing; incoming[k] is the state entering chunk k, kept chunk-major for out=
        e = torch.exp(cs_last)                                               # (b, c, H)
        if carry is not None:
            e = e * carry[..., None]
        incoming = x_dt.new_empty(c, b, H, P, N)
        if h0 is None:
            incoming[0].zero_()
        else:
            incoming[0].copy_(h0)
        final = x_dt.new_empty(b, H, P, N)
        for k in range(c):
            out = incoming[k + 1] if k + 1 < c else final
            torch.addcmul(S[:, k], e[:, k, :, None, None], incoming[k], out=out)

        # 4. state to output: y_off = u o (C h^T), u the decay from the chunk's start
        u = torch.exp(cs)                                                    # (b, c, H, T)
        if from_start is not None:
            u = u * from_start[:, :, None]
        C_cb = C.permute(1, 0, 3, 2, 4)                                      # (c, b, G, T, N)
        y_off_raw = C_cb @ incoming.view(c, b, G, R * P, N).transpose(-1, -2)   # (c, b, G, T, R*P)

        y = x_dt.new_empty(b, c, T, H, P)
        y6 = y.view(b, c, T, G, R, P)
        torch.mul(y_off_raw.permute(1, 0, 3, 2, 4).view(b, c, T, G, R, P),
                  u.transpose(2, 3).reshape(b, c, T, G, R, 1), out=y6)
        y.add_(y_diag.transpose(2, 3))

        ctx.save_for_backward(x_dt, cs, B, C, incoming, y_off_raw, e, u, w, same_seq, to_end)
        ctx.has_h0 = h0 is not None
        return y, final

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y, g_final):
        x_dt, cs, B, C, incoming, y_off_raw, e, u, w, same_seq, to_end = ctx.saved_tensors
        b, c, T, H, P = x_dt.shape
        G, N = B.shape[3], B.shape[4]
        R = H // G
        g_y = g_y.contiguous()
        Bg = B.transpose(2, 3)                                               # (b, c, G, T, N)
        Cg = C.transpose(2, 3)
        C_cb = C.permute(1, 0, 3, 2, 4)                                      # (c, b, G, T, N)
        u_t = u.transpose(2, 3)[..., None]                                   # (b, c, T, H, 1)

        # 4. y_off = u o y_off_raw, y_off_raw = C h^T
        y_off = y_off_raw.permute(1, 0, 3, 2, 4).reshape(b, c, T, H, P)
        g_cs = ((g_y * y_off).sum(-1).transpose(2, 3)) * u                   # (b, c, H, T): du/dcs = u
        g_raw = (g_y * u_t).view(b, c, T, G, R * P).permute(1, 0, 3, 2, 4)   # (c, b, G, T, R*P)
        g_C = (g_raw @ incoming.view(c, b, G, R * P, N)).permute(1, 0, 3, 2, 4)  # (b, c, T, G, N)
        g_incoming = (g_raw.transpose(-1, -2) @ C_cb).view(c, b, H, P, N)

        # 3. state passing, backwards: g_S[k] is the gradient of the state leaving chunk k
        g_S = x_dt.new_empty(c, b, H, P, N)
        if g_final is None:
            g_S[c - 1].zero_()
        else:
            g_S[c - 1].copy_(g_final)
        for k in range(c - 2, -1, -1):
            torch.addcmul(g_incoming[k + 1], e[:, k + 1, :, None, None], g_S[k + 1], out=g_S[k])
        g_h0 = torch.addcmul(g_incoming[0], e[:, 0, :, None, None], g_S[0]) if ctx.has_h0 else None
        # g_e = <g_S, incoming> over (P, N), as batched dot products (no temporary of the states' size)
        g_e = (g_S.view(c * b * H, 1, P * N) @ incoming.view(c * b * H, P * N, 1)).view(c, b, H).transpose(0, 1)
        g_cs_last = g_e * e                                                  # (b, c, H)

        # 2. chunk states S = x_w^T B, x_w = w o dt x
        g_S_g = g_S.view(c, b, G, R * P, N).transpose(0, 1)                  # (b, c, G, R*P, N)
        g_xw = (Bg @ g_S_g.transpose(-1, -2))                                # (b, c, G, T, R*P)
        g_xw = g_xw.transpose(2, 3).reshape(b, c, T, H, P)
        x_w = x_dt * w.transpose(2, 3)[..., None]
        g_B = (x_w.view(b, c, T, G, R * P).permute(0, 1, 3, 2, 4) @ g_S_g)   # (b, c, G, T, N)
        g_ws = (g_xw * x_dt).sum(-1).transpose(2, 3) * w                     # (b, c, H, T)
        g_x_dt = g_xw * w.transpose(2, 3)[..., None]
        g_cs_last = g_cs_last + g_ws.sum(-1)
        g_cs = g_cs - g_ws

        # 1. intra-chunk, with L and C B^T recomputed
        CB = Cg @ Bg.transpose(-1, -2)                                       # (b, c, G, T, T)
        L = _decay_matrix(cs, same_seq)                                      # (b, c, H, T, T)
        g_y_h = g_y.transpose(2, 3).contiguous()                             # (b, c, H, T, P)
        x_dt_h = x_dt.transpose(2, 3).contiguous()
        g_M = g_y_h @ x_dt_h.transpose(-1, -2)                               # (b, c, H, T, T)
        g_CB = (g_M * L).view(b, c, G, R, T, T).sum(3)                       # (b, c, G, T, T)
        M = L.view(b, c, G, R, T, T).mul_(CB[:, :, :, None]).view(b, c, H, T, T)
        g_x_dt += (M.transpose(-1, -2) @ g_y_h).transpose(2, 3)
        g_seg = g_M.mul_(M)                                                  # dL/dseg = L; L o CB = M
        g_cs = g_cs + g_seg.sum(-1) - g_seg.sum(-2)
        g_C = g_C + (g_CB @ Bg).transpose(2, 3)
        g_B = (g_B + g_CB.transpose(-1, -2) @ Cg).transpose(2, 3)

        # cs = cumsum(a): the gradient is the reversed cumulative sum
        g_cs[..., -1] += g_cs_last
        g_a = g_cs.flip(-1).cumsum(-1).flip(-1).transpose(2, 3)              # (b, c, T, H)
        return g_x_dt, g_a, g_B, g_C, g_h0, None, None, None, None


def _sequence_masks(seq_idx: torch.Tensor, chunks: int, T: int, extra: int, dtype: torch.dtype):
    """Masks of the packed sequences, per chunk: (same_seq, to_end, from_start, carry).

    same_seq (b, c, T, T): tokens t and s belong to one sequence; to_end (b, c, T): the token's sequence
    is the one alive at the chunk's end; from_start (b, c, T): it is the one whose state enters the chunk;
    carry (b, c): the state entering the chunk survives it. The state entering chunk 0 belongs to the
    row's first sequence.
    """
    b = seq_idx.shape[0]
    ids = seq_idx
    if extra:
        ids = torch.cat([ids, ids[:, -1:].expand(b, extra)], dim=1)
    ids = ids.reshape(b, chunks, T)
    ids_last = ids[:, :, -1]                                                 # (b, c)
    ids_prev = torch.cat([ids[:, :1, 0], ids_last[:, :-1]], dim=1)           # (b, c)
    same_seq = ids[:, :, :, None] == ids[:, :, None, :]
    to_end = (ids == ids_last[..., None]).to(dtype)
    from_start = (ids == ids_prev[..., None]).to(dtype)
    carry = (ids_last == ids_prev).to(dtype)
    return same_seq, to_end, from_start, carry


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                dt_limit=DEFAULT_DT_LIMIT, initial_states=None, seq_idx=None, return_final_states=False):
    """Chunked SSD; arguments, shapes and results as :func:`ssmkit.ops.mamba2.ssd` (backend "torch").

    Any L: the sequence is padded to a multiple of the chunk with dt = 0 steps, which neither decay nor
    feed the state, so the final state is exact. A chunk longer than L is shortened to L.
    """
    batch, length, heads, headdim, groups, N = check_ssd_inputs(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_limit, chunk_size)
    ctype = compute_dtype(x.dtype)
    T = min(chunk_size, length)
    chunks = -(-length // T)
    extra = chunks * T - length

    xc = x.to(ctype)
    dt = process_dt(dt.to(ctype), None if dt_bias is None else dt_bias.to(ctype), dt_softplus, dt_limit)
    x_dt = _pad_length(xc * dt[..., None], extra).view(batch, chunks, T, heads, headdim)
    a = _pad_length(dt * A.to(ctype), extra).view(batch, chunks, T, heads)
    Bc = _pad_length(B.to(ctype), extra).reshape(batch, chunks, T, groups, N)
    Cc = _pad_length(C.to(ctype), extra).reshape(batch, chunks, T, groups, N)
    h0 = None if initial_states is None else initial_states.to(ctype)
    masks = (None,) * 4 if seq_idx is None else _sequence_masks(seq_idx, chunks, T, extra, ctype)

    y, final = _ChunkedSSD.apply(x_dt, a, Bc, Cc, h0, *masks)
    y = y.view(batch, chunks * T, heads, headdim)[:, :length]
    y = apply_skip_and_gate(y, xc, None if D is None else D.to(ctype), None if z is None else z.to(ctype))
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y


def ssd_state_update_torch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           dt_limit=DEFAULT_DT_LIMIT):
    """One token, all heads at once (heads grouped as (groups, R) so B and C are broadcast, not copied).

    Shapes and results as :func:`ssmkit.ops.mamba2.ssd_state_update`.
    """
    batch, heads, headdim, groups, N = check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias, dt_limit)
    ctype = compute_dtype(x.dtype)
    R = heads // groups
    dt = process_dt(dt.to(ctype), None if dt_bias is None else dt_bias.to(ctype), dt_softplus, dt_limit)
    decay = torch.exp(dt * A.to(ctype))                                    # (batch, heads)
    xc = x.to(ctype)
    x_dt = (xc * dt[..., None]).reshape(batch, groups, R * headdim, 1)
    update = (x_dt * B.to(ctype)[:, :, None, :]).view(batch, heads, headdim, N)
    new_state = torch.addcmul(update, decay[:, :, None, None], state.to(ctype))
    y = (new_state.reshape(batch, groups, R * headdim, N) @ C.to(ctype)[..., None]).view(batch, heads, headdim)
    y = apply_skip_and_gate(y, xc, None if D is None else D.to(ctype), None if z is None else z.to(ctype))
    return y.to(x.dtype), new_state.to(state.dtype)
