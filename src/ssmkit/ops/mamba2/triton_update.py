"""One-token state update of Mamba-2's SSD in Triton, for decoding (inference only).

Mamba-2 (Dao & Gu 2024, the recurrent form of SSD), per head with a scalar A and state (headdim, N):

    Delta = clamp(softplus(dt + dt_bias), dt_limit)   h = exp(Delta A) h + Delta x B^T   y = h C + D x

Names as :mod:`ssmkit.ops.mamba2.reference`. A decoding step
moves each state once through memory (read, update in registers, write), so the kernel is as fast as the
state's bytes allow; ``state_batch_indices`` lets a batch read and write any rows of a larger cache, and
``inplace`` skips the copy of the new state (the form a serving loop or a CUDA graph wants).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._triton import _check_runnable, check_inference_only, check_state_batch_indices, output_state, rows_view
from .args import DEFAULT_DT_LIMIT, _check_dt_limit, check_state_update_inputs

__all__ = ["ssd_state_update_triton"]


@triton.jit
def _ssd_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, idx_ptr, y_ptr, out_ptr,
    heads, P, N, heads_per_group, dt_min, dt_max,
    s_sb, s_sh, s_sp, s_sn, s_xb, s_xh, s_xp, s_tb, s_th, s_bb, s_bg, s_bn, s_cb, s_cg, s_cn,
    s_zb, s_zh, s_zp, s_ob, s_oh, s_op, s_on,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, HAS_IDX: tl.constexpr,
    BLOCK_P: tl.constexpr, N_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // heads
    hd = pid % heads
    g = hd // heads_per_group
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, N_PAD)
    p_mask = p < P
    n_mask = n < N
    m2 = p_mask[:, None] & n_mask[None, :]
    if HAS_IDX:
        row = tl.load(idx_ptr + b).to(tl.int64)
    else:
        row = b
    s = tl.load(state_ptr + row * s_sb + hd * s_sh + p[:, None] * s_sp + n[None, :] * s_sn, mask=m2,
                other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * s_xb + hd * s_xh + p * s_xp, mask=p_mask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * s_tb + hd * s_th).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + hd).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    A = tl.load(A_ptr + hd).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_bb + g * s_bg + n * s_bn, mask=n_mask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_cb + g * s_cg + n * s_cn, mask=n_mask, other=0.0).to(tl.float32)
    s = tl.exp(dt * A) * s + (dt * x)[:, None] * Bv[None, :]
    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        if D_PER_P:
            y += x * tl.load(D_ptr + hd * P + p, mask=p_mask, other=0.0).to(tl.float32)
        else:
            y += x * tl.load(D_ptr + hd).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + hd * s_zh + p * s_zp, mask=p_mask, other=0.0).to(tl.float32)
        y = y * z / (1.0 + tl.exp(-z))
    tl.store(out_ptr + row * s_ob + hd * s_oh + p[:, None] * s_op + n[None, :] * s_on, s.to(out_ptr.dtype.element_ty),
             mask=m2)
    tl.store(y_ptr + (b * heads + hd) * P + p, y.to(y_ptr.dtype.element_ty), mask=p_mask)


def ssd_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                            dt_limit=DEFAULT_DT_LIMIT, *, state_batch_indices=None, inplace=False):
    """One Mamba-2 decoding step on Triton; arguments as :func:`ssmkit.ops.mamba2.ssd_state_update`.

    Args:
        state: (batch, heads, headdim, N), or (rows, heads, headdim, N) with ``state_batch_indices`` (batch,);
        x, z: (batch, heads, headdim); dt: (batch, heads); A, dt_bias: (heads,); B, C: (batch, groups, N);
        D: (heads,) or (heads, headdim); dt_softplus, dt_limit: as ``ssd``; inplace: as
        :func:`selective_state_update_triton`.

    Returns:
        ``(y (batch, heads, headdim) in x's dtype, new_state in state's dtype)``.
    """
    if state_batch_indices is not None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must be (batch, heads, headdim); got {tuple(getattr(x, 'shape', ()))}")
        check_tensor_state = rows_view(state, x.shape[0])
    else:
        check_tensor_state = state
    batch, heads, P, G, N = check_state_update_inputs(check_tensor_state, x, dt, A, B, C, D, z, dt_bias, dt_limit)
    _check_runnable("ssd_state_update_triton", x)
    check_inference_only("ssd_state_update_triton", (state, x, dt, A, B, C, D, z, dt_bias))
    lo, hi = _check_dt_limit(dt_limit)
    clamp = (lo, hi) != DEFAULT_DT_LIMIT
    if state_batch_indices is not None:
        state_batch_indices = check_state_batch_indices(state_batch_indices, batch, state.shape[0], x.device)
    out = output_state(state, batch, state_batch_indices, inplace)
    D = D.contiguous() if D is not None else None
    A = A.contiguous()
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    y = torch.empty(batch, heads, P, device=x.device, dtype=x.dtype)
    n_pad = max(2, triton.next_power_of_2(N))
    block_p = max(1, min(triton.next_power_of_2(P), 4096 // n_pad))
    zz = z if z is not None else x
    _ssd_update_kernel[(batch * heads, triton.cdiv(P, block_p))](
        state, x, dt, A, B, C, D if D is not None else x, zz, dt_bias if dt_bias is not None else x,
        state_batch_indices if state_batch_indices is not None else x, y, out,
        heads, P, N, heads // G, lo if clamp else 0.0, hi if (clamp and math.isfinite(hi)) else 3.0e38,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *zz.stride(), *out.stride(),
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), CLAMP=clamp,
        HAS_IDX=state_batch_indices is not None, BLOCK_P=block_p, N_PAD=n_pad, num_warps=4,
    )
    return y, out
