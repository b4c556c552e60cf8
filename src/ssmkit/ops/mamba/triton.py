"""Mamba's selective scan in Triton: forward and backward, the state never written to memory in full.

Same equations, names and glossary as :mod:`ssmkit.ops.mamba.reference` (Gu & Dao 2023, Eq. (2),
Algorithm 2, and the hardware-aware scan of Sec. 3.3):

    Delta_t = softplus(delta_t + delta_bias)      h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t u_t
    y_t = <C_t, h_t> + D u_t                      y_t <- y_t * silu(z_t)

**Work split.** One program owns ``BLOCK_D`` channels of one batch row (all in one group, so they share B
and C) and walks the sequence in tiles of ``T`` steps. A tile of (BLOCK_D channels, BLOCK_N states, T steps)
is discretised in registers and the recurrence inside the tile is a parallel associative scan over time with
the operator ``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)`` (S5's operator); the state entering the tile is
folded into the first step. Between tiles only the (BLOCK_D, N) state is carried, in registers. Loads are
contiguous tiles along L (the fastest axis of u, delta, B and C), so every input byte is read once.

**Memory.** The forward writes y and, when a gradient is needed, one state per tile, a checkpoint of size
(batch, dim, L / T, N) (1/T of the full state history), plus the pre-gate output when ``z`` is given.

**Backward.** Tiles are visited last to first. In each tile the states are recomputed from the tile's
checkpoint, and the adjoint g_t = dL/dh_t runs backwards with a reverse associative scan:

    g_t = C_t dy'_t + exp(Delta_{t+1} A) g_{t+1}   (dy' = dy * silu(z), plus dL/dh_L at t = L - 1)

after which every gradient is local: with a_t h_{t-1} = h_t - Delta_t B_t u_t (no shift of h needed),

    dDelta_t += sum_n g_t (h_t - Delta_t B_t u_t) A + g_t B_t u_t    du_t += sum_n g_t Delta_t B_t
    dA += sum_t g_t (h_t - Delta_t B_t u_t) Delta_t                 dB_t = sum_d g_t Delta_t u_t
    dC_t = sum_d dy'_t h_t                                          dh_0 = exp(Delta_1 A) g_1

The sums over channels (dB, dC) are added atomically into a few float32 slots per group and the slots
summed afterwards; the sums over batch (dA, dD, d delta_bias) are written per batch row and summed.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .args import check_scan_args

__all__ = ["selective_scan_triton", "override_config"]

# Tile sizes. ``T`` steps per tile; ``BLOCK_D`` channels and ``BLOCK_N`` states per register tile.
# Chosen on an H100 (bf16, dim 2048, N 16, L 8k; benchmarks/gpu_bench.py --sections tune): one warp per
# program keeps the scan along T and the sums over N inside a warp (no shared-memory round trips), which was
# 1.5-2x faster than 4 warps. The forward's T is also the backward's tile (the checkpoint interval).
_FWD = dict(T=64, BLOCK_D=1, BLOCK_N=16, num_warps=1)
_BWD = dict(T=64, BLOCK_D=2, BLOCK_N=4, num_warps=1, SLOTS=32)
_override: dict = {}


@contextlib.contextmanager
def override_config(**kwargs):
    """Temporarily force tile sizes (keys of ``_FWD``/``_BWD``: T, BLOCK_D, BLOCK_N, num_warps, SLOTS), for
    tests and tuning."""
    old = dict(_override)
    _override.update(kwargs)
    try:
        yield
    finally:
        _override.clear()
        _override.update(old)


def _config(base: dict, length: int, d_state: int) -> dict:
    cfg = dict(base)
    cfg.update(_override)
    cfg["N_PAD"] = max(2, triton.next_power_of_2(d_state))
    cfg["T"] = min(cfg["T"], max(16, triton.next_power_of_2(length)))
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], cfg["N_PAD"])
    return cfg


# --------------------------------------------------------------------------------------------------
# Shared device functions
# --------------------------------------------------------------------------------------------------
@triton.jit
def linear_combine(a1, b1, a2, b2):
    """Compose two steps h -> a h + b (first (a1, b1), then (a2, b2)): associative, S5 Sec. 2.2."""
    return a1 * a2, a2 * b1 + b2


# lets the interpreter shim in ``ssmkit.ops._triton`` run this operator vectorised on the CPU
getattr(linear_combine, "fn", linear_combine)._ssmkit_linear_recurrence = True


@triton.jit
def softplus(x):
    # torch's threshold: softplus(x) = x above 20, where log(1 + e^x) == x in float32 anyway
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _take_cols(full, offs_n, offs_full):
    """full (BD, N_PAD) -> its columns offs_n, (BD, BN): registers cannot be sliced at run time."""
    sel = offs_full[None, None, :] == offs_n[None, :, None]
    return tl.sum(tl.where(sel, full[:, None, :], 0.0), axis=2)


@triton.jit
def _put_cols(full, part, offs_n, offs_full):
    """Write part (BD, BN) into columns offs_n of full (BD, N_PAD)."""
    sel = offs_full[None, None, :] == offs_n[None, :, None]
    scattered = tl.sum(tl.where(sel, part[:, :, None], 0.0), axis=1)
    hit = tl.sum(sel.to(tl.int32), axis=1) > 0  # (1, N_PAD)
    return tl.where(hit, scattered, full)


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, outpre_ptr, ckpt_ptr, last_ptr,
    L, N, n_tiles, dim_per_group, n_dblocks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
    s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
    s_zb, s_zd, s_zl, s_hb, s_hd, s_hn,
    s_yb, s_yd, s_kb, s_kd, s_kc, s_lb, s_ld,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_CKPT: tl.constexpr, STORE_LAST: tl.constexpr, STORE_OUTPRE: tl.constexpr,
    T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, N_PAD: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid = tl.program_id(1)
    group = pid // n_dblocks
    d_local = (pid % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_local < dim_per_group
    offs_d = group * dim_per_group + d_local
    offs_full = tl.arange(0, N_PAD)
    full_mask = d_mask[:, None] & (offs_full[None, :] < N)
    offs_t0 = tl.arange(0, T)
    first = (offs_t0 == 0)[None, None, :]
    last_col = (offs_t0 == T - 1)[None, None, :]

    if HAS_H0:
        carry = tl.load(h0_ptr + pid_b * s_hb + offs_d[:, None] * s_hd + offs_full[None, :] * s_hn,
                        mask=full_mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    B_base = B_ptr + pid_b * s_bb + group * s_bg
    C_base = C_ptr + pid_b * s_cb + group * s_cg

    for c in range(n_tiles):
        if STORE_CKPT:
            tl.store(ckpt_ptr + pid_b * s_kb + offs_d[:, None] * s_kd + c * s_kc + offs_full[None, :],
                     carry, mask=full_mask)
        offs_t = c * T + offs_t0
        t_mask = offs_t < L
        m2 = d_mask[:, None] & t_mask[None, :]
        u = tl.load(u_ptr + pid_b * s_ub + offs_d[:, None] * s_ud + offs_t[None, :] * s_ul,
                    mask=m2, other=0.0).to(tl.float32)
        dl = tl.load(delta_ptr + pid_b * s_db + offs_d[:, None] * s_dd + offs_t[None, :] * s_dl,
                     mask=m2, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dl = dl + bias[:, None]
        if SOFTPLUS:
            dl = softplus(dl)
        dl = tl.where(m2, dl, 0.0)  # steps past L: a = 1, b = 0, so the state passes through unchanged
        du = dl * u
        acc = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            A_blk = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an,
                            mask=d_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            nt_mask = n_mask[:, None] & t_mask[None, :]
            B_blk = tl.load(B_base + offs_n[:, None] * s_bn + offs_t[None, :] * s_bl,
                            mask=nt_mask, other=0.0).to(tl.float32)
            C_blk = tl.load(C_base + offs_n[:, None] * s_cn + offs_t[None, :] * s_cl,
                            mask=nt_mask, other=0.0).to(tl.float32)
            a = tl.exp(dl[:, None, :] * A_blk[:, :, None])          # (BD, BN, T)
            b = du[:, None, :] * B_blk[None, :, :]
            if BLOCK_N == N_PAD:
                h_in = carry
            else:
                h_in = _take_cols(carry, offs_n, offs_full)
            b = tl.where(first, b + a * h_in[:, :, None], b)
            _, h = tl.associative_scan((a, b), axis=2, combine_fn=linear_combine)
            acc += tl.sum(h * C_blk[None, :, :], axis=1)
            h_out = tl.sum(tl.where(last_col, h, 0.0), axis=2)
            if BLOCK_N == N_PAD:
                carry = h_out
            else:
                carry = _put_cols(carry, h_out, offs_n, offs_full)
        if HAS_D:
            acc += Dv[:, None] * u
        if HAS_Z:
            if STORE_OUTPRE:
                tl.store(outpre_ptr + pid_b * s_yb + offs_d[:, None] * s_yd + offs_t[None, :],
                         acc.to(outpre_ptr.dtype.element_ty), mask=m2)
            zt = tl.load(z_ptr + pid_b * s_zb + offs_d[:, None] * s_zd + offs_t[None, :] * s_zl,
                         mask=m2, other=0.0).to(tl.float32)
            acc = acc * zt * tl.sigmoid(zt)
        tl.store(y_ptr + pid_b * s_yb + offs_d[:, None] * s_yd + offs_t[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=m2)
    if STORE_LAST:
        tl.store(last_ptr + pid_b * s_lb + offs_d[:, None] * s_ld + offs_full[None, :],
                 carry.to(last_ptr.dtype.element_ty), mask=full_mask)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, outpre_ptr, ckpt_ptr,
    dy_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    L, N, n_tiles, dim, dim_per_group, n_dblocks, n_groups, n_slots,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
    s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
    s_zb, s_zd, s_zl, s_yb, s_yd, s_kb, s_kd, s_kc,
    s_gb, s_gd, s_gl, s_lb, s_ld, s_ln,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, N_PAD: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid = tl.program_id(1)
    group = pid // n_dblocks
    d_local = (pid % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_local < dim_per_group
    offs_d = group * dim_per_group + d_local
    offs_full = tl.arange(0, N_PAD)
    full_mask = d_mask[:, None] & (offs_full[None, :] < N)
    offs_t0 = tl.arange(0, T)
    first = (offs_t0 == 0)[None, None, :]
    last_col = (offs_t0 == T - 1)[None, None, :]

    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    B_base = B_ptr + pid_b * s_bb + group * s_bg
    C_base = C_ptr + pid_b * s_cb + group * s_cg
    # partial sums over channels, (batch, groups, slots, N, L) float32: program k of a group adds into slot
    # k % slots, which bounds both the buffer and the number of atomic adds landing on one address
    part_off = ((pid_b * n_groups + group) * n_slots + (pid % n_dblocks) % n_slots) * N * L

    g_carry = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)   # g at the first step of the tile after
    dA_acc = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    dh0 = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for cc in range(n_tiles):
        c = n_tiles - 1 - cc
        offs_t = c * T + offs_t0
        t_mask = offs_t < L
        m2 = d_mask[:, None] & t_mask[None, :]
        m2n = d_mask[:, None] & (offs_t + 1 < L)[None, :]
        u = tl.load(u_ptr + pid_b * s_ub + offs_d[:, None] * s_ud + offs_t[None, :] * s_ul,
                    mask=m2, other=0.0).to(tl.float32)
        pre = tl.load(delta_ptr + pid_b * s_db + offs_d[:, None] * s_dd + offs_t[None, :] * s_dl,
                      mask=m2, other=0.0).to(tl.float32)
        # Delta_{t+1}: the decay that carries g_{t+1} back to step t (a shifted reload, not a register shift)
        pre_next = tl.load(delta_ptr + pid_b * s_db + offs_d[:, None] * s_dd + (offs_t[None, :] + 1) * s_dl,
                           mask=m2n, other=0.0).to(tl.float32)
        if HAS_BIAS:
            pre = pre + bias[:, None]
            pre_next = pre_next + bias[:, None]
        if SOFTPLUS:
            dl = softplus(pre)
            dl_next = softplus(pre_next)
        else:
            dl = pre
            dl_next = pre_next
        dl = tl.where(m2, dl, 0.0)
        dl_next = tl.where(m2n, dl_next, 0.0)
        dy = tl.load(dy_ptr + pid_b * s_gb + offs_d[:, None] * s_gd + offs_t[None, :] * s_gl,
                     mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_ptr + pid_b * s_zb + offs_d[:, None] * s_zd + offs_t[None, :] * s_zl,
                         mask=m2, other=0.0).to(tl.float32)
            outpre = tl.load(outpre_ptr + pid_b * s_yb + offs_d[:, None] * s_yd + offs_t[None, :],
                             mask=m2, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zt)
            dz = dy * outpre * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_ptr + pid_b * s_yb + offs_d[:, None] * s_yd + offs_t[None, :],
                     dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dout = dy * zt * sig
        else:
            dout = dy
        if HAS_D:
            dD_acc += tl.sum(dout * u, axis=1)
            du = dout * Dv[:, None]
        else:
            du = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        ddl = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        dlu = dl * u
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            dn_mask = d_mask[:, None] & n_mask[None, :]
            A_blk = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an,
                            mask=dn_mask, other=0.0).to(tl.float32)
            nt_mask = n_mask[:, None] & t_mask[None, :]
            B_blk = tl.load(B_base + offs_n[:, None] * s_bn + offs_t[None, :] * s_bl,
                            mask=nt_mask, other=0.0).to(tl.float32)
            C_blk = tl.load(C_base + offs_n[:, None] * s_cn + offs_t[None, :] * s_cl,
                            mask=nt_mask, other=0.0).to(tl.float32)
            h_in = tl.load(ckpt_ptr + pid_b * s_kb + offs_d[:, None] * s_kd + c * s_kc + offs_n[None, :],
                           mask=dn_mask, other=0.0)
            # recompute the tile's states from its checkpoint
            a = tl.exp(dl[:, None, :] * A_blk[:, :, None])            # (BD, BN, T)
            b = dlu[:, None, :] * B_blk[None, :, :]
            _, h = tl.associative_scan((a, tl.where(first, b + a * h_in[:, :, None], b)), axis=2,
                                       combine_fn=linear_combine)
            tl.atomic_add(dC_ptr + part_off + offs_n[:, None] * L + offs_t[None, :],
                          tl.sum(dout[:, None, :] * h, axis=0), mask=nt_mask)
            # adjoint, backwards in time
            a_next = tl.exp(dl_next[:, None, :] * A_blk[:, :, None])
            src = dout[:, None, :] * C_blk[None, :, :]
            if BLOCK_N == N_PAD:
                g_in = g_carry
            else:
                g_in = _take_cols(g_carry, offs_n, offs_full)
            src = tl.where(last_col, src + a_next * g_in[:, :, None], src)
            if HAS_DLAST:
                dlast = tl.load(dlast_ptr + pid_b * s_lb + offs_d[:, None] * s_ld + offs_n[None, :] * s_ln,
                                mask=dn_mask, other=0.0).to(tl.float32)
                src = tl.where((offs_t == L - 1)[None, None, :], src + dlast[:, :, None], src)
            _, g = tl.associative_scan((a_next, src), axis=2, combine_fn=linear_combine, reverse=True)
            gB = g * B_blk[None, :, :]
            tl.atomic_add(dB_ptr + part_off + offs_n[:, None] * L + offs_t[None, :],
                          tl.sum(g * dlu[:, None, :], axis=0), mask=nt_mask)
            ah = h - b                                                  # a_t h_{t-1}
            gah = g * ah
            ddl += tl.sum(gah * A_blk[:, :, None], axis=1) + u * tl.sum(gB, axis=1)
            du += dl * tl.sum(gB, axis=1)
            dA_part = tl.sum(gah * dl[:, None, :], axis=2)
            g_first = tl.sum(tl.where(first, g, 0.0), axis=2)
            dh0_part = tl.sum(tl.where(first, a * g, 0.0), axis=2)
            if BLOCK_N == N_PAD:
                dA_acc += dA_part
                g_carry = g_first
                dh0 = dh0_part
            else:
                dA_acc = _put_cols(dA_acc, _take_cols(dA_acc, offs_n, offs_full) + dA_part, offs_n, offs_full)
                g_carry = _put_cols(g_carry, g_first, offs_n, offs_full)
                dh0 = _put_cols(dh0, dh0_part, offs_n, offs_full)
        if SOFTPLUS:
            ddl = ddl * tl.where(pre > 20.0, 1.0, tl.sigmoid(pre))
        ddl = tl.where(m2, ddl, 0.0)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddl, axis=1)
        tl.store(ddelta_ptr + pid_b * s_yb + offs_d[:, None] * s_yd + offs_t[None, :],
                 ddl.to(ddelta_ptr.dtype.element_ty), mask=m2)
        tl.store(du_ptr + pid_b * s_yb + offs_d[:, None] * s_yd + offs_t[None, :],
                 du.to(du_ptr.dtype.element_ty), mask=m2)
    # per-batch-row partials (fp32), summed over the batch by the caller
    tl.store(dA_ptr + pid_b * s_lb + offs_d[:, None] * s_ld + offs_full[None, :] * s_ln, dA_acc, mask=full_mask)
    tl.store(dh0_ptr + pid_b * s_lb + offs_d[:, None] * s_ld + offs_full[None, :] * s_ln, dh0, mask=full_mask)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * dim + offs_d, dbias_acc, mask=d_mask)


# --------------------------------------------------------------------------------------------------
# Autograd glue
# --------------------------------------------------------------------------------------------------
def _grid(batch, groups, dim_per_group, block_d):
    n_dblocks = triton.cdiv(dim_per_group, block_d)
    return (batch, groups * n_dblocks), n_dblocks


def _forward(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, initial_state, want_last, save):
    batch, dim, length = u.shape
    groups, d_state = B4.shape[1], A.shape[1]
    dpg = dim // groups
    cfg = _config(_FWD, length, d_state)
    grid, n_dblocks = _grid(batch, groups, dpg, cfg["BLOCK_D"])
    n_tiles = triton.cdiv(length, cfg["T"])
    y = torch.empty(batch, dim, length, device=u.device, dtype=u.dtype)
    outpre = torch.empty_like(y) if (z is not None and save) else None
    ckpt = (torch.empty(batch, dim, n_tiles, d_state, device=u.device, dtype=torch.float32) if save else None)
    # the last state in the compute dtype (float32 for half u), as the reference returns it
    last = torch.empty(batch, dim, d_state, device=u.device, dtype=torch.promote_types(u.dtype, torch.float32)) \
        if want_last else None
    dummy = y
    h0 = initial_state
    zz = z if z is not None else u
    _scan_fwd_kernel[grid](
        u, delta, A, B4, C4, D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy,
        h0 if h0 is not None else dummy,
        y, outpre if outpre is not None else dummy, ckpt if ckpt is not None else dummy,
        last if last is not None else dummy,
        length, d_state, n_tiles, dpg, n_dblocks,
        *u.stride(), *delta.stride(), *A.stride(), *B4.stride(), *C4.stride(), *zz.stride(),
        *(h0.stride() if h0 is not None else (0, 0, 0)),
        y.stride(0), y.stride(1),
        *(ckpt.stride()[:3] if ckpt is not None else (0, 0, 0)),
        *(last.stride()[:2] if last is not None else (0, 0)),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), HAS_H0=h0 is not None, STORE_CKPT=save, STORE_LAST=want_last,
        STORE_OUTPRE=outpre is not None,
        T=cfg["T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], N_PAD=cfg["N_PAD"],
        num_warps=cfg["num_warps"],
    )
    return y, last, outpre, ckpt, cfg["T"]


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B4, C4, D, z, delta_bias, initial_state, delta_softplus, want_last):
        save = any(ctx.needs_input_grad)
        y, last, outpre, ckpt, tile = _forward(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus,
                                               initial_state, want_last, save)
        if save:
            ctx.save_for_backward(u, delta, A, B4, C4, D, z, delta_bias, initial_state, outpre, ckpt)
            ctx.delta_softplus = bool(delta_softplus)
            ctx.tile = tile
        ctx.set_materialize_grads(False)
        return y if last is None else (y, last)

    @staticmethod
    def backward(ctx, dy, dlast=None):
        u, delta, A, B4, C4, D, z, delta_bias, initial_state, outpre, ckpt = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, d_state = B4.shape[1], A.shape[1]
        dpg = dim // groups
        cfg = _config(_BWD, length, d_state)
        cfg["T"] = ctx.tile  # the checkpoints were taken every ``tile`` steps
        grid, n_dblocks = _grid(batch, groups, dpg, cfg["BLOCK_D"])
        n_slots = min(n_dblocks, cfg["SLOTS"])
        f32 = dict(device=u.device, dtype=torch.float32)
        if dy is None:
            dy = torch.zeros(batch, dim, length, device=u.device, dtype=u.dtype)
        if dlast is not None:
            dlast = dlast.contiguous()
        du = torch.empty(batch, dim, length, device=u.device, dtype=u.dtype)
        ddelta = torch.empty_like(du)
        dz = torch.empty_like(du) if z is not None else None
        dA_part = torch.empty(batch, dim, d_state, **f32)
        dh0 = torch.empty(batch, dim, d_state, **f32)
        dB_part = torch.zeros(batch, groups, n_slots, d_state, length, **f32)
        dC_part = torch.zeros(batch, groups, n_slots, d_state, length, **f32)
        dD_part = torch.empty(batch, dim, **f32) if D is not None else None
        dbias_part = torch.empty(batch, dim, **f32) if delta_bias is not None else None
        dummy = du
        zz = z if z is not None else u
        _scan_bwd_kernel[grid](
            u, delta, A, B4, C4, D if D is not None else dummy, zz,
            delta_bias if delta_bias is not None else dummy, outpre if outpre is not None else dummy, ckpt,
            dy, dlast if dlast is not None else dummy,
            du, ddelta, dz if dz is not None else dummy, dA_part, dB_part, dC_part,
            dD_part if dD_part is not None else dA_part, dbias_part if dbias_part is not None else dA_part, dh0,
            length, d_state, triton.cdiv(length, cfg["T"]), dim, dpg, n_dblocks, groups, n_slots,
            *u.stride(), *delta.stride(), *A.stride(), *B4.stride(), *C4.stride(), *zz.stride(),
            du.stride(0), du.stride(1), *ckpt.stride()[:3],
            *dy.stride(), dim * d_state, d_state, 1,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, HAS_DLAST=dlast is not None,
            T=cfg["T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], N_PAD=cfg["N_PAD"],
            num_warps=cfg["num_warps"],
        )
        dB = dB_part.sum(2).to(B4.dtype)
        dC = dC_part.sum(2).to(C4.dtype)
        dA = dA_part.sum(0).to(A.dtype)
        dD = dD_part.sum(0).to(D.dtype) if D is not None else None
        dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
        dinit = dh0.to(initial_state.dtype) if initial_state is not None else None
        return du, ddelta, dA, dB, dC, dD, dz, dbias, dinit, None, None


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None):
    """Selective scan on Triton kernels; arguments and results as :func:`ssmkit.ops.selective_scan`.

    Args:
        u, delta: (batch, dim, L), any strides.
        A: (dim, N), real; B, C: (batch, N, L) or (batch, groups, N, L); D, delta_bias: (dim,);
        z: optional (batch, dim, L) gate; initial_state: optional (batch, dim, N).

    Returns:
        y (batch, dim, L) in u's dtype, or ``(y, last_state)`` with last_state (batch, dim, N) in the
        compute dtype (float32 for half-precision u). Every
        tensor argument gets a gradient (initial_state included), and last_state passes one back.
    """
    from .._triton import _check_runnable

    args = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    _check_runnable("selective_scan_triton", u)
    if args.d_state > 256:
        raise ValueError(f"the triton selective scan supports N <= 256 states; got A of shape {tuple(A.shape)}")
    D = D.contiguous() if D is not None else None  # indexed as flat (dim,) vectors in the kernels
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    out = _SelectiveScanFn.apply(u, delta, A, args.B, args.C, D, z, delta_bias, initial_state,
                                 bool(delta_softplus), bool(return_last_state))
    return out
