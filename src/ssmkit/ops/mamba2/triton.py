"""Mamba-2's SSD in Triton: the chunked algorithm, forward and backward, with matrix products on tl.dot.

Equations, names and glossary as :mod:`ssmkit.ops.mamba2.reference` and :mod:`ssmkit.ops.mamba2.chunked`
(Dao & Gu 2024, "Transformers are SSMs", Sec. 6). Per batch row and head, with a_t = dt_t A (<= 0) and
cs_t its running sum inside the chunk (Q = chunk_size tokens):

    Y_diag[i] = sum_{j <= i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j        intra-chunk, "attention" form
    S_c       = sum_j exp(cs_last - cs_j) dt_j x_j B_j^T                   chunk state   (P, N)
    H_c       = exp(cs_last) H_{c-1} + S_c                                 state passing (H_{-1} = h0)
    Y_off[i]  = exp(cs_i) H_{c-1} C_i                                      state -> output
    y = (Y_diag + Y_off + D x) * silu(z)

Packed sequences (``seq_idx``) multiply every decay between tokens of different sequences by zero: the
masks [seq_i == seq_j], [seq_j == seq_last] and [seq_i == seq of the token before the chunk].

Kernels (grid axes in brackets):

* ``_chunk_state_kernel``   [batch*heads, chunks, N blocks]: S_c = (x dt w)^T B over the chunk, one tl.dot
  per sub-block; the same kernel gives the backward's E_c = sum_i exp(cs_i) dY_i C_i^T.
* ``_state_passing_kernel`` [batch*heads, P*N blocks]: the short sequential loop over chunks, in place
  (the buffer of chunk states becomes the buffer of states entering each chunk); run backwards it passes
  dL/dH_c and the gradient of each chunk's total decay.
* ``_chunk_scan_kernel``    [batch*heads, chunks * row blocks]: Y_off by one tl.dot with the
  entering state, Y_diag by a causal loop of two tl.dots per column block (C B^T, then (. o L) x), as a
  flash-attention forward without the softmax; then D and the gate.
* backward: ``_bwd_columns_kernel`` (per column block j: dx_j, dB_j, ddt_j and the column part of dcs) and
  ``_bwd_rows_kernel`` (per row block i: dC_i and the row part of dcs), each recomputing C B^T and dY x^T.

The dt preprocessing (bias, softplus, clamp) and the in-chunk cumulative sum are elementwise on
(batch, heads, L) and run as torch ops under autograd around the kernels, which take and return
gradients for dt and cs; so every gradient, down to dt_bias and A, is the chain rule of a few torch ops
on top of the kernels. No (batch, L, heads, headdim, N) tensor exists; the largest extra buffers are the
per-chunk states (batch, chunks, heads, headdim, N) in float32.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .args import DEFAULT_DT_LIMIT, check_ssd_inputs
from .reference import process_dt

__all__ = ["ssd_triton", "override_config"]

_CFG = dict(BLOCK_M=64, BLOCK_K=32, BLOCK_PN=1024, num_warps=4, bwd_warps=4)
_override: dict = {}


@contextlib.contextmanager
def override_config(**kwargs):
    """Temporarily force block sizes (BLOCK_M, BLOCK_K, BLOCK_PN, num_warps, bwd_warps): tests, tuning."""
    old = dict(_override)
    _override.update(kwargs)
    try:
        yield
    finally:
        _override.clear()
        _override.update(old)


def _config(chunk: int, headdim: int, d_state: int, elem_size: int) -> dict:
    cfg = dict(_CFG)
    cfg.update(_override)
    q_pad = max(16, triton.next_power_of_2(chunk))
    cfg["P_PAD"] = max(16, triton.next_power_of_2(headdim))
    cfg["N_PAD"] = max(16, triton.next_power_of_2(d_state))
    if elem_size * max(cfg["P_PAD"], cfg["N_PAD"]) > 256:
        # wide rows (float32 with N >= 128, or N = 256): smaller tiles keep the backward's operand tiles
        # within shared memory (a (64, 128) float32 tile pair with pipelining needs over 227 KB)
        cfg["BLOCK_M"], cfg["BLOCK_K"] = min(cfg["BLOCK_M"], 32), min(cfg["BLOCK_K"], 32)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], q_pad)
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], q_pad)
    cfg["BLOCK_N"] = min(cfg["N_PAD"], 64)
    cfg["BLOCK_PN"] = min(cfg["BLOCK_PN"], cfg["P_PAD"] * cfg["N_PAD"])
    return cfg


def _precision(dtype):
    # float32 operands: three tf32 passes (about float32 accuracy on the tensor cores)
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _upcast(dtype) -> bool:
    # Triton's CPU interpreter keeps bfloat16 as raw 16-bit integers and multiplies those in tl.dot, so under
    # the interpreter bf16 operands are widened first (the bf16 rounding of every operand is kept)
    from .._triton import _interpreting
    return dtype == torch.bfloat16 and _interpreting()


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=PRECISION)


# --------------------------------------------------------------------------------------------------
# Chunk states (forward S_c; backward E_c)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_state_kernel(
    x_ptr, B_ptr, dt_ptr, cs_ptr, seq_ptr, out_ptr,
    L, Lp, Q, heads, P, N, heads_per_group,
    s_xb, s_xl, s_xh, s_xp, s_bb, s_bl, s_bg, s_bn, s_sb,
    TO_END: tl.constexpr, HAS_SEQ: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr, P_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """TO_END: out[c] = sum_j exp(cs_last - cs_j) dt_j [seq_j = seq_last] x_j B_j^T  (the chunk state S_c);
    else:      out[c] = sum_i exp(cs_i) [seq_i = seq_prev] x_i B_i^T  (x = dY, B = C: the backward's E_c)."""
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    pid_n = tl.program_id(2)
    b = pid_bh // heads
    h = pid_bh % heads
    g = h // heads_per_group
    offs_p = tl.arange(0, P_PAD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row = (b * heads + h) * Lp
    chunk0 = c * Q
    if TO_END:
        ref_pos = chunk0 + Q - 1
    else:
        ref_pos = tl.maximum(chunk0 - 1, 0)
    cs_ref = tl.load(cs_ptr + row + chunk0 + Q - 1)
    if HAS_SEQ:
        seq_ref = tl.load(seq_ptr + b * s_sb + ref_pos)
    acc = tl.zeros((P_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Q, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        pos = chunk0 + k
        valid = (k < Q) & (pos < L)
        cs = tl.load(cs_ptr + row + pos, mask=valid, other=0.0)
        if TO_END:
            dt = tl.load(dt_ptr + row + pos, mask=valid, other=0.0)
            w = tl.exp(cs_ref - cs) * dt
        else:
            w = tl.exp(cs)
        if HAS_SEQ:
            seq = tl.load(seq_ptr + b * s_sb + pos, mask=valid, other=-1)
            w = tl.where(seq == seq_ref, w, 0.0)
        w = tl.where(valid, w, 0.0)
        xt = tl.load(x_ptr + b * s_xb + h * s_xh + offs_p[:, None] * s_xp + pos[None, :] * s_xl,
                     mask=(offs_p[:, None] < P) & valid[None, :], other=0.0)           # (P, K)
        Bk = tl.load(B_ptr + b * s_bb + g * s_bg + pos[:, None] * s_bl + offs_n[None, :] * s_bn,
                     mask=valid[:, None] & (offs_n[None, :] < N), other=0.0)            # (K, BN)
        Bw = (Bk.to(tl.float32) * w[:, None]).to(xt.dtype)
        acc += _dot(xt, Bw, PRECISION, UPCAST)
    n_chunks = Lp // Q
    out = out_ptr + (((b * n_chunks + c) * heads + h) * P) * N
    tl.store(out + offs_p[:, None] * N + offs_n[None, :], acc, mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


# --------------------------------------------------------------------------------------------------
# State passing (forward and backward), in place over the per-chunk buffer
# --------------------------------------------------------------------------------------------------
@triton.jit
def _state_passing_kernel(
    buf_ptr, cs_ptr, seq_ptr, h0_ptr, final_ptr, states_ptr, dcs_last_ptr,
    L, Lp, Q, n_chunks, heads, PN,
    s_sb, s_h0b, s_h0h,
    REVERSE: tl.constexpr, HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    """Forward (REVERSE False): buf[c] holds S_c on entry and H_{c-1} (the state entering chunk c) on exit;
    final_ptr gets H_last.  Backward (REVERSE True): buf[c] holds E_c on entry and dL/dH_c on exit, h0_ptr
    is dL/dH_last (or absent), final_ptr gets dL/dH_{-1}, and dcs_last[c] += m_c e^{cs_last} <dH_c, H_{c-1}>
    with H_{c-1} read from states_ptr (the forward's output)."""
    pid_bh = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    row = (b * heads + h) * Lp
    if HAS_H0:
        s = tl.load(h0_ptr + b * s_h0b + h * s_h0h + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    for it in range(n_chunks):
        if REVERSE:
            c = n_chunks - 1 - it
        else:
            c = it
        chunk0 = c * Q
        decay = tl.exp(tl.load(cs_ptr + row + chunk0 + Q - 1))
        if HAS_SEQ:
            last_pos = tl.minimum(chunk0 + Q - 1, L - 1)
            seq_last = tl.load(seq_ptr + b * s_sb + last_pos)
            seq_prev = tl.load(seq_ptr + b * s_sb + tl.maximum(chunk0 - 1, 0))
            decay = tl.where(seq_last == seq_prev, decay, 0.0)
        ptr = buf_ptr + ((b * n_chunks + c) * heads + h) * PN + offs
        incoming = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, s, mask=mask)
        if REVERSE:
            h_prev = tl.load(states_ptr + ((b * n_chunks + c) * heads + h) * PN + offs, mask=mask, other=0.0)
            tl.atomic_add(dcs_last_ptr + (b * heads + h) * n_chunks + c, decay * tl.sum(s * h_prev))
        s = decay * s + incoming
    tl.store(final_ptr + (b * heads + h) * PN + offs, s, mask=mask)


# --------------------------------------------------------------------------------------------------
# Chunk scan: outputs
# --------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_scan_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, cs_ptr, seq_ptr, states_ptr, D_ptr, z_ptr, y_ptr, outpre_ptr,
    L, Lp, Q, heads, P, N, heads_per_group, n_mblocks,
    s_xb, s_xl, s_xh, s_xp, s_bb, s_bl, s_bg, s_bn, s_cb, s_cl, s_cg, s_cn,
    s_zb, s_zl, s_zh, s_zp, s_sb,
    HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
    STORE_OUTPRE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, P_PAD: tl.constexpr, N_PAD: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    g = h // heads_per_group
    c = pid_m // n_mblocks
    m0 = (pid_m % n_mblocks) * BLOCK_M
    n_chunks = Lp // Q
    row = (b * heads + h) * Lp
    chunk0 = c * Q
    offs_p = tl.arange(0, P_PAD)
    offs_n = tl.arange(0, N_PAD)
    p_mask = offs_p < P
    n_mask = offs_n < N
    i = m0 + tl.arange(0, BLOCK_M)
    pos_i = chunk0 + i
    valid_i = (i < Q) & (pos_i < L)
    cs_i = tl.load(cs_ptr + row + pos_i, mask=valid_i, other=0.0)
    C_i = tl.load(C_ptr + b * s_cb + g * s_cg + pos_i[:, None] * s_cl + offs_n[None, :] * s_cn,
                  mask=valid_i[:, None] & n_mask[None, :], other=0.0)                     # (M, N)
    # Y_off: the state entering the chunk, read out by C and decayed from the chunk's start
    H_in = tl.load(states_ptr + (((b * n_chunks + c) * heads + h) * P + offs_p[None, :]) * N + offs_n[:, None],
                   mask=p_mask[None, :] & n_mask[:, None], other=0.0)                     # (N, P)
    v = tl.exp(cs_i)
    if HAS_SEQ:
        seq_i = tl.load(seq_ptr + b * s_sb + pos_i, mask=valid_i, other=-1)
        seq_prev = tl.load(seq_ptr + b * s_sb + tl.maximum(chunk0 - 1, 0))
        v = tl.where(seq_i == seq_prev, v, 0.0)
    acc = _dot(C_i, H_in.to(C_i.dtype), PRECISION, UPCAST) * v[:, None]          # (M, P)
    # Y_diag: causal loop over column blocks of the chunk
    j_end = tl.minimum(m0 + BLOCK_M, Q)
    for j0 in range(0, j_end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        pos_j = chunk0 + j
        valid_j = (j < Q) & (pos_j < L)
        cs_j = tl.load(cs_ptr + row + pos_j, mask=valid_j, other=0.0)
        dt_j = tl.load(dt_ptr + row + pos_j, mask=valid_j, other=0.0)
        B_j = tl.load(B_ptr + b * s_bb + g * s_bg + pos_j[:, None] * s_bl + offs_n[None, :] * s_bn,
                      mask=valid_j[:, None] & n_mask[None, :], other=0.0)                 # (K, N)
        x_j = tl.load(x_ptr + b * s_xb + h * s_xh + pos_j[:, None] * s_xl + offs_p[None, :] * s_xp,
                      mask=valid_j[:, None] & p_mask[None, :], other=0.0)                 # (K, P)
        cb = _dot(C_i, tl.trans(B_j), PRECISION, UPCAST)                       # (M, K)
        keep = (j[None, :] <= i[:, None]) & valid_j[None, :]
        if HAS_SEQ:
            seq_j = tl.load(seq_ptr + b * s_sb + pos_j, mask=valid_j, other=-2)
            keep = keep & (seq_i[:, None] == seq_j[None, :])
        # the exponent is set to -inf before exp where masked, so nothing positive is exponentiated
        decay = tl.exp(tl.where(keep, cs_i[:, None] - cs_j[None, :], float("-inf")))
        w = cb * decay * dt_j[None, :]
        acc += _dot(w.to(x_j.dtype), x_j, PRECISION, UPCAST)
    out_mask = valid_i[:, None] & p_mask[None, :]
    if HAS_D:
        x_i = tl.load(x_ptr + b * s_xb + h * s_xh + pos_i[:, None] * s_xl + offs_p[None, :] * s_xp,
                      mask=out_mask, other=0.0).to(tl.float32)
        if D_PER_P:
            Dv = tl.load(D_ptr + h * P + offs_p, mask=p_mask, other=0.0).to(tl.float32)
            acc += x_i * Dv[None, :]
        else:
            acc += x_i * tl.load(D_ptr + h).to(tl.float32)
    # outputs are contiguous (batch, L, heads, P)
    o_off = ((b * L + pos_i[:, None]) * heads + h) * P + offs_p[None, :]
    if HAS_Z:
        if STORE_OUTPRE:
            tl.store(outpre_ptr + o_off, acc.to(outpre_ptr.dtype.element_ty), mask=out_mask)
        zt = tl.load(z_ptr + b * s_zb + h * s_zh + pos_i[:, None] * s_zl + offs_p[None, :] * s_zp,
                     mask=out_mask, other=0.0).to(tl.float32)
        acc = acc * zt / (1.0 + tl.exp(-zt))
    tl.store(y_ptr + o_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------------
# Backward: column side (dx, dB, ddt, dcs from the j side) and row side (dC, dcs from the i side)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_columns_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, cs_ptr, seq_ptr, dout_ptr, dstates_ptr, D_ptr,
    dx_ptr, dB_ptr, ddt_ptr, dcs_ptr, dcs_last_ptr,
    L, Lp, Q, heads, P, N, heads_per_group, n_kblocks,
    s_xb, s_xl, s_xh, s_xp, s_bb, s_bl, s_bg, s_bn, s_cb, s_cl, s_cg, s_cn, s_sb,
    HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, P_PAD: tl.constexpr, N_PAD: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    g = h // heads_per_group
    c = pid_k // n_kblocks
    k0 = (pid_k % n_kblocks) * BLOCK_K
    n_chunks = Lp // Q
    row = (b * heads + h) * Lp
    chunk0 = c * Q
    offs_p = tl.arange(0, P_PAD)
    offs_n = tl.arange(0, N_PAD)
    p_mask = offs_p < P
    n_mask = offs_n < N
    j = k0 + tl.arange(0, BLOCK_K)
    pos_j = chunk0 + j
    valid_j = (j < Q) & (pos_j < L)
    cs_j = tl.load(cs_ptr + row + pos_j, mask=valid_j, other=0.0)
    dt_j = tl.load(dt_ptr + row + pos_j, mask=valid_j, other=0.0)
    x_j = tl.load(x_ptr + b * s_xb + h * s_xh + pos_j[:, None] * s_xl + offs_p[None, :] * s_xp,
                  mask=valid_j[:, None] & p_mask[None, :], other=0.0)                     # (K, P)
    B_j = tl.load(B_ptr + b * s_bb + g * s_bg + pos_j[:, None] * s_bl + offs_n[None, :] * s_bn,
                  mask=valid_j[:, None] & n_mask[None, :], other=0.0)                     # (K, N)
    # through the chunk state: S_c = sum_j w_j dt_j x_j B_j^T, w_j = exp(cs_last - cs_j)
    cs_last = tl.load(cs_ptr + row + chunk0 + Q - 1)
    w = tl.exp(cs_last - cs_j)
    if HAS_SEQ:
        seq_j = tl.load(seq_ptr + b * s_sb + pos_j, mask=valid_j, other=-2)
        seq_last = tl.load(seq_ptr + b * s_sb + tl.minimum(chunk0 + Q - 1, L - 1))
        w = tl.where(seq_j == seq_last, w, 0.0)
    w = tl.where(valid_j, w, 0.0)
    dH = tl.load(dstates_ptr + (((b * n_chunks + c) * heads + h) * P + offs_p[:, None]) * N + offs_n[None, :],
                 mask=p_mask[:, None] & n_mask[None, :], other=0.0).to(x_j.dtype)         # (P, N)
    xdH = _dot(x_j, dH, PRECISION, UPCAST)                                     # (K, N)
    s_raw = tl.sum(xdH * B_j.to(tl.float32), axis=1)                                     # x_j^T dH B_j
    wdt = w * dt_j
    dB_acc = xdH * wdt[:, None]
    dx_acc = _dot(B_j, tl.trans(dH), PRECISION, UPCAST) * wdt[:, None]          # (K, P)
    ddt_acc = w * s_raw
    s_state = wdt * s_raw
    dcs_acc = -s_state
    tl.atomic_add(dcs_last_ptr + (b * heads + h) * n_chunks + c, tl.sum(s_state))
    # through Y_diag: rows i >= j of the chunk
    for i0 in range(k0 - k0 % BLOCK_M, Q, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        pos_i = chunk0 + i
        valid_i = (i < Q) & (pos_i < L)
        cs_i = tl.load(cs_ptr + row + pos_i, mask=valid_i, other=0.0)
        C_i = tl.load(C_ptr + b * s_cb + g * s_cg + pos_i[:, None] * s_cl + offs_n[None, :] * s_cn,
                      mask=valid_i[:, None] & n_mask[None, :], other=0.0)                 # (M, N)
        dy_i = tl.load(dout_ptr + ((b * L + pos_i[:, None]) * heads + h) * P + offs_p[None, :],
                       mask=valid_i[:, None] & p_mask[None, :], other=0.0)                # (M, P)
        keep = (i[None, :] >= j[:, None]) & valid_i[None, :] & valid_j[:, None]
        if HAS_SEQ:
            seq_i = tl.load(seq_ptr + b * s_sb + pos_i, mask=valid_i, other=-1)
            keep = keep & (seq_i[None, :] == seq_j[:, None])
        decay = tl.exp(tl.where(keep, cs_i[None, :] - cs_j[:, None], float("-inf")))      # (K, M)
        cbt = _dot(B_j, tl.trans(C_i), PRECISION, UPCAST) * decay               # (K, M)
        dxt = _dot(x_j, tl.trans(dy_i), PRECISION, UPCAST)                      # (K, M)
        dx_acc += _dot(cbt.to(dy_i.dtype), dy_i, PRECISION, UPCAST) * dt_j[:, None]
        dB_acc += _dot((dxt * decay).to(C_i.dtype), C_i, PRECISION, UPCAST) * dt_j[:, None]
        ksum = tl.sum(cbt * dxt, axis=1)
        ddt_acc += ksum
        dcs_acc -= dt_j * ksum
    out_mask = valid_j[:, None] & p_mask[None, :]
    o_off = ((b * L + pos_j[:, None]) * heads + h) * P + offs_p[None, :]
    if HAS_D:
        dy_j = tl.load(dout_ptr + o_off, mask=out_mask, other=0.0).to(tl.float32)
        if D_PER_P:
            Dv = tl.load(D_ptr + h * P + offs_p, mask=p_mask, other=0.0).to(tl.float32)
            dx_acc += dy_j * Dv[None, :]
        else:
            dx_acc += dy_j * tl.load(D_ptr + h).to(tl.float32)
    tl.store(dx_ptr + o_off, dx_acc.to(dx_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dB_ptr + ((b * L + pos_j[:, None]) * heads + h) * N + offs_n[None, :], dB_acc,
             mask=valid_j[:, None] & n_mask[None, :])
    tl.store(ddt_ptr + row + pos_j, ddt_acc, mask=valid_j)
    tl.store(dcs_ptr + row + pos_j, dcs_acc, mask=valid_j)


@triton.jit
def _bwd_rows_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, cs_ptr, seq_ptr, dout_ptr, states_ptr,
    dC_ptr, dcs_ptr,
    L, Lp, Q, heads, P, N, heads_per_group, n_mblocks,
    s_xb, s_xl, s_xh, s_xp, s_bb, s_bl, s_bg, s_bn, s_cb, s_cl, s_cg, s_cn, s_sb,
    HAS_SEQ: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, P_PAD: tl.constexpr, N_PAD: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    g = h // heads_per_group
    c = pid_m // n_mblocks
    m0 = (pid_m % n_mblocks) * BLOCK_M
    n_chunks = Lp // Q
    row = (b * heads + h) * Lp
    chunk0 = c * Q
    offs_p = tl.arange(0, P_PAD)
    offs_n = tl.arange(0, N_PAD)
    p_mask = offs_p < P
    n_mask = offs_n < N
    i = m0 + tl.arange(0, BLOCK_M)
    pos_i = chunk0 + i
    valid_i = (i < Q) & (pos_i < L)
    cs_i = tl.load(cs_ptr + row + pos_i, mask=valid_i, other=0.0)
    C_i = tl.load(C_ptr + b * s_cb + g * s_cg + pos_i[:, None] * s_cl + offs_n[None, :] * s_cn,
                  mask=valid_i[:, None] & n_mask[None, :], other=0.0)                     # (M, N)
    dy_i = tl.load(dout_ptr + ((b * L + pos_i[:, None]) * heads + h) * P + offs_p[None, :],
                   mask=valid_i[:, None] & p_mask[None, :], other=0.0)                    # (M, P)
    # through Y_off = v_i H_{c-1} C_i
    H_in = tl.load(states_ptr + (((b * n_chunks + c) * heads + h) * P + offs_p[:, None]) * N + offs_n[None, :],
                   mask=p_mask[:, None] & n_mask[None, :], other=0.0).to(dy_i.dtype)      # (P, N)
    v = tl.exp(cs_i)
    if HAS_SEQ:
        seq_i = tl.load(seq_ptr + b * s_sb + pos_i, mask=valid_i, other=-1)
        seq_prev = tl.load(seq_ptr + b * s_sb + tl.maximum(chunk0 - 1, 0))
        v = tl.where(seq_i == seq_prev, v, 0.0)
    v = tl.where(valid_i, v, 0.0)
    dyH = _dot(dy_i, H_in, PRECISION, UPCAST)                                  # (M, N)
    dC_acc = dyH * v[:, None]
    dcs_acc = v * tl.sum(dyH * C_i.to(tl.float32), axis=1)
    # through Y_diag: columns j <= i
    j_end = tl.minimum(m0 + BLOCK_M, Q)
    for j0 in range(0, j_end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        pos_j = chunk0 + j
        valid_j = (j < Q) & (pos_j < L)
        cs_j = tl.load(cs_ptr + row + pos_j, mask=valid_j, other=0.0)
        dt_j = tl.load(dt_ptr + row + pos_j, mask=valid_j, other=0.0)
        B_j = tl.load(B_ptr + b * s_bb + g * s_bg + pos_j[:, None] * s_bl + offs_n[None, :] * s_bn,
                      mask=valid_j[:, None] & n_mask[None, :], other=0.0)                 # (K, N)
        x_j = tl.load(x_ptr + b * s_xb + h * s_xh + pos_j[:, None] * s_xl + offs_p[None, :] * s_xp,
                      mask=valid_j[:, None] & p_mask[None, :], other=0.0)                 # (K, P)
        keep = (j[None, :] <= i[:, None]) & valid_j[None, :] & valid_i[:, None]
        if HAS_SEQ:
            seq_j = tl.load(seq_ptr + b * s_sb + pos_j, mask=valid_j, other=-2)
            keep = keep & (seq_i[:, None] == seq_j[None, :])
        decay = tl.exp(tl.where(keep, cs_i[:, None] - cs_j[None, :], float("-inf"))) * dt_j[None, :]
        dx = _dot(dy_i, tl.trans(x_j), PRECISION, UPCAST) * decay               # (M, K)
        cb = _dot(C_i, tl.trans(B_j), PRECISION, UPCAST)                        # (M, K)
        dC_acc += _dot(dx.to(B_j.dtype), B_j, PRECISION, UPCAST)
        dcs_acc += tl.sum(cb * dx, axis=1)
    tl.store(dC_ptr + ((b * L + pos_i[:, None]) * heads + h) * N + offs_n[None, :], dC_acc,
             mask=valid_i[:, None] & n_mask[None, :])
    tl.store(dcs_ptr + row + pos_i, dcs_acc, mask=valid_i)


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
def _chunk_states(x, B, dt_p, cs, seq, L, Q, heads_per_group, cfg, to_end):
    batch, _, heads, P = x.shape
    N = B.shape[-1]
    Lp = dt_p.shape[-1]
    n_chunks = Lp // Q
    out = torch.empty(batch, n_chunks, heads, P, N, device=x.device, dtype=torch.float32)
    grid = (batch * heads, n_chunks, triton.cdiv(N, cfg["BLOCK_N"]))
    _chunk_state_kernel[grid](
        x, B, dt_p, cs, seq if seq is not None else cs, out,
        L, Lp, Q, heads, P, N, heads_per_group,
        *x.stride(), *B.stride(), seq.stride(0) if seq is not None else 0,
        TO_END=to_end, HAS_SEQ=seq is not None, PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype),
        BLOCK_K=cfg["BLOCK_K"], P_PAD=cfg["P_PAD"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return out


def _pass_states(buf, cs, seq, L, Q, h0, cfg, reverse=False, states=None):
    batch, n_chunks, heads, P, N = buf.shape
    PN = P * N
    final = torch.empty(batch, heads, P, N, device=buf.device, dtype=torch.float32)
    dcs_last = torch.zeros(batch, heads, n_chunks, device=buf.device, dtype=torch.float32) if reverse else None
    grid = (batch * heads, triton.cdiv(PN, cfg["BLOCK_PN"]))
    if h0 is not None:
        h0 = h0.contiguous()
    _state_passing_kernel[grid](
        buf, cs, seq if seq is not None else cs, h0 if h0 is not None else buf, final,
        states if states is not None else buf, dcs_last if dcs_last is not None else cs,
        L, cs.shape[-1], Q, n_chunks, heads, PN,
        seq.stride(0) if seq is not None else 0,
        h0.stride(0) if h0 is not None else 0, h0.stride(1) if h0 is not None else 0,
        REVERSE=reverse, HAS_H0=h0 is not None, HAS_SEQ=seq is not None, BLOCK=cfg["BLOCK_PN"],
        num_warps=4,
    )
    return final, dcs_last


class _SSDFn(torch.autograd.Function):
    """Kernels of the chunked SSD; dt_p and cs (batch, heads, Lp) float32 come from torch ops outside."""

    @staticmethod
    def forward(ctx, x, dt_p, cs, B, C, D, z, h0, seq, Q):
        batch, L, heads, P = x.shape
        G, N = B.shape[2], B.shape[3]
        hpg = heads // G
        cfg = _config(Q, P, N, x.element_size())
        save = any(ctx.needs_input_grad)
        states = _chunk_states(x, B, dt_p, cs, seq, L, Q, hpg, cfg, to_end=True)
        final, _ = _pass_states(states, cs, seq, L, Q, h0, cfg)                   # states: H_{c-1} now
        y = torch.empty(batch, L, heads, P, device=x.device, dtype=x.dtype)
        outpre = torch.empty_like(y) if (z is not None and save) else None
        n_mblocks = triton.cdiv(Q, cfg["BLOCK_M"])
        n_chunks = states.shape[1]
        zz = z if z is not None else x
        _chunk_scan_kernel[(batch * heads, n_chunks * n_mblocks)](
            x, B, C, dt_p, cs, seq if seq is not None else cs, states, D if D is not None else x, zz, y,
            outpre if outpre is not None else y,
            L, cs.shape[-1], Q, heads, P, N, hpg, n_mblocks,
            *x.stride(), *B.stride(), *C.stride(), *zz.stride(), seq.stride(0) if seq is not None else 0,
            HAS_SEQ=seq is not None, HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2,
            HAS_Z=z is not None, STORE_OUTPRE=outpre is not None,
            PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], P_PAD=cfg["P_PAD"], N_PAD=cfg["N_PAD"],
            num_warps=cfg["num_warps"],
        )
        if save:
            # the per-chunk states are recomputed in the backward rather than kept
            ctx.save_for_backward(x, dt_p, cs, B, C, D, z, h0, seq, outpre)
            ctx.Q = Q
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt_p, cs, B, C, D, z, h0, seq, outpre = ctx.saved_tensors
        Q = ctx.Q
        batch, L, heads, P = x.shape
        G, N = B.shape[2], B.shape[3]
        hpg = heads // G
        cfg = _config(Q, P, N, x.element_size())
        Lp = cs.shape[-1]
        if dy is None:
            dy = torch.zeros_like(x)
        # gate and skip, elementwise: dout = dL/d(y before the gate)
        if z is not None:
            zf = z.float()
            sig = torch.sigmoid(zf)
            dyf = dy.float()
            dz = (dyf * outpre.float() * sig * (1 + zf * (1 - sig))).to(z.dtype)
            dout = (dyf * zf * sig).to(x.dtype)
        else:
            dz = None
            dout = dy.to(x.dtype)
        dout = dout.contiguous()
        dD = None
        if D is not None:
            prod = dout.float() * x.float()
            dD = (prod.sum((0, 1)) if D.dim() == 2 else prod.sum((0, 1, 3))).to(D.dtype)
        # recompute the states entering each chunk
        states = _chunk_states(x, B, dt_p, cs, seq, L, Q, hpg, cfg, to_end=True)
        _pass_states(states, cs, seq, L, Q, h0, cfg)
        # E_c, then dL/dH_c by the reverse state passing
        dstates = _chunk_states(dout, C, dt_p, cs, seq, L, Q, hpg, cfg, to_end=False)
        dh0, dcs_last = _pass_states(dstates, cs, seq, L, Q, dfinal, cfg, reverse=True, states=states)
        n_chunks = Lp // Q
        f32 = dict(device=x.device, dtype=torch.float32)
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # the kernel writes dx at contiguous offsets
        dB_h = torch.empty(batch, L, heads, N, **f32)
        dC_h = torch.empty(batch, L, heads, N, **f32)
        ddt = torch.zeros(batch, heads, Lp, **f32)
        dcs_col = torch.zeros(batch, heads, Lp, **f32)
        dcs_row = torch.zeros(batch, heads, Lp, **f32)
        seq_arg = seq if seq is not None else cs
        s_seq = seq.stride(0) if seq is not None else 0
        common = dict(PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype),
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
                      P_PAD=cfg["P_PAD"], N_PAD=cfg["N_PAD"], num_warps=cfg["bwd_warps"])
        n_kblocks = triton.cdiv(Q, cfg["BLOCK_K"])
        _bwd_columns_kernel[(batch * heads, n_chunks * n_kblocks)](
            x, B, C, dt_p, cs, seq_arg, dout, dstates, D if D is not None else x,
            dx, dB_h, ddt, dcs_col, dcs_last,
            L, Lp, Q, heads, P, N, hpg, n_kblocks,
            *x.stride(), *B.stride(), *C.stride(), s_seq,
            HAS_SEQ=seq is not None, HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, **common,
        )
        n_mblocks = triton.cdiv(Q, cfg["BLOCK_M"])
        _bwd_rows_kernel[(batch * heads, n_chunks * n_mblocks)](
            x, B, C, dt_p, cs, seq_arg, dout, states, dC_h, dcs_row,
            L, Lp, Q, heads, P, N, hpg, n_mblocks,
            *x.stride(), *B.stride(), *C.stride(), s_seq,
            HAS_SEQ=seq is not None, **common,
        )
        dB = dB_h.view(batch, L, G, hpg, N).sum(3).to(B.dtype)
        dC = dC_h.view(batch, L, G, hpg, N).sum(3).to(C.dtype)
        dcs = dcs_row.add_(dcs_col)
        # the chunk's total decay cs_last sits at the chunk's last (possibly padded) position
        dcs.view(batch, heads, n_chunks, Q)[..., Q - 1] += dcs_last
        dinit = dh0.to(h0.dtype) if h0 is not None else None
        return dx, ddt, dcs, dB, dC, dD, dz, dinit, None, None


def ssd_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=DEFAULT_DT_LIMIT, initial_states=None, seq_idx=None, return_final_states=False):
    """Chunked SSD on Triton; arguments and results as :func:`ssmkit.ops.mamba2.ssd` (backend "triton").

    Args:
        x: (batch, L, heads, headdim); dt: (batch, L, heads); A: (heads,); B, C: (batch, L, groups, N);
        chunk_size: tokens per chunk (any positive int; results do not depend on it, speed does: 64-256);
        D: (heads,) or (heads, headdim); z: like x; dt_bias: (heads,); dt_softplus, dt_limit: as ``ssd``;
        initial_states: (batch, heads, headdim, N); seq_idx: (batch, L) non-decreasing integer ids.

    Returns:
        y (batch, L, heads, headdim) in x's dtype, or ``(y, final_states)`` with final_states
        (batch, heads, headdim, N) float32. Gradients flow to every tensor argument.
    """
    from .._triton import _check_runnable

    batch, L, heads, P, G, N = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_limit,
                                                chunk_size)
    _check_runnable("ssd_triton", x)
    if N > 256 or P > 256:
        raise ValueError(f"the triton SSD supports headdim <= 256 and N <= 256; got headdim={P}, N={N}")
    Q = int(chunk_size)
    n_chunks = -(-L // Q)
    Lp = n_chunks * Q
    # dt preprocessing and in-chunk cumulative decay: tiny (batch, heads, L) tensors, differentiated by torch
    dt_p = process_dt(dt.float(), None if dt_bias is None else dt_bias.float(), dt_softplus, dt_limit)
    dt_p = F.pad(dt_p.transpose(1, 2), (0, Lp - L))                                      # (batch, heads, Lp)
    cs = (dt_p * A.float()[:, None]).view(batch, heads, n_chunks, Q).cumsum(-1).view(batch, heads, Lp)
    seq = None
    if seq_idx is not None:
        seq = seq_idx.to(torch.int32)
        seq = torch.cat([seq, seq[:, -1:].expand(batch, Lp - L)], dim=1).contiguous()  # padding: last id
    D = D.contiguous() if D is not None else None  # the kernels index D as (heads,) or (heads, headdim) rows
    y, final = _SSDFn.apply(x, dt_p.contiguous(), cs.contiguous(), B, C, D, z, initial_states, seq, Q)
    return (y, final) if return_final_states else y
