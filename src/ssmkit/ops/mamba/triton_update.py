"""One-token state update of Mamba's selective scan in Triton, for decoding (inference only).

Mamba (Gu & Dao 2023, Eq. (2) for one step), per channel d and state n:

    Delta = softplus(dt + dt_bias)   h = exp(Delta A) h + Delta B x   y = <C, h> + D x   y <- y silu(z)

Names as :mod:`ssmkit.ops.mamba.reference`. A decoding step
moves each state once through memory (read, update in registers, write), so the kernel is as fast as the
state's bytes allow; ``state_batch_indices`` lets a batch read and write any rows of a larger cache, and
``inplace`` skips the copy of the new state (the form a serving loop or a CUDA graph wants).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import _check_runnable, check_inference_only, check_state_batch_indices, output_state, rows_view
from .args import check_state_update_args

__all__ = ["selective_state_update_triton"]


@triton.jit
def _selective_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, idx_ptr, y_ptr, out_ptr,
    dim, N, dim_per_group,
    s_sb, s_sd, s_sn, s_xb, s_xd, s_tb, s_td, s_ad, s_an, s_bb, s_bg, s_bn, s_cb, s_cg, s_cn,
    s_zb, s_zd, s_ob, s_od, s_on,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_IDX: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, N_PAD)
    d_mask = d < dim
    n_mask = n < N
    m2 = d_mask[:, None] & n_mask[None, :]
    g = d // dim_per_group
    if HAS_IDX:
        row = tl.load(idx_ptr + b).to(tl.int64)
    else:
        row = b
    h = tl.load(state_ptr + row * s_sb + d[:, None] * s_sd + n[None, :] * s_sn, mask=m2, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * s_xb + d * s_xd, mask=d_mask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * s_tb + d * s_td, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
    A = tl.load(A_ptr + d[:, None] * s_ad + n[None, :] * s_an, mask=m2, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_bb + g[:, None] * s_bg + n[None, :] * s_bn, mask=m2, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_cb + g[:, None] * s_cg + n[None, :] * s_cn, mask=m2, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv
    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + d * s_zd, mask=d_mask, other=0.0).to(tl.float32)
        y = y * z / (1.0 + tl.exp(-z))
    tl.store(out_ptr + row * s_ob + d[:, None] * s_od + n[None, :] * s_on, h.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(y_ptr + b * dim + d, y.to(y_ptr.dtype.element_ty), mask=d_mask)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *,
                                  state_batch_indices=None, inplace=False):
    """One Mamba decoding step on Triton; arguments as :func:`ssmkit.ops.mamba.selective_state_update`.

    Args:
        state: (batch, dim, N), or (rows, dim, N) with ``state_batch_indices`` (batch,) naming the row of
            each batch element; x, dt, z: (batch, dim); A: (dim, N); B, C: (batch, N) or (batch, groups, N);
            D, dt_bias: (dim,).
        inplace: update ``state`` in place and return it; otherwise ``state`` is unchanged and a new tensor
            is returned (all rows of the cache when indexed).

    Returns:
        ``(y (batch, dim) in x's dtype, new_state in state's dtype)``.
    """
    if state_batch_indices is not None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"x must be (batch, dim); got {tuple(getattr(x, 'shape', ()))}")
        check_tensor_state = rows_view(state, x.shape[0])
    else:
        check_tensor_state = state
    B3, C3 = check_state_update_args(check_tensor_state, x, dt, A, B, C, D, z, dt_bias)
    _check_runnable("selective_state_update_triton", x)
    check_inference_only("selective_state_update_triton", (state, x, dt, A, B, C, D, z, dt_bias))
    batch, dim = x.shape
    N = A.shape[1]
    if state_batch_indices is not None:
        state_batch_indices = check_state_batch_indices(state_batch_indices, batch, state.shape[0], x.device)
    out = output_state(state, batch, state_batch_indices, inplace)
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    n_pad = max(2, triton.next_power_of_2(N))
    block_d = max(1, min(64, 2048 // n_pad))
    zz = z if z is not None else x
    _selective_update_kernel[(batch, triton.cdiv(dim, block_d))](
        state, x, dt, A, B3, C3, D if D is not None else x, zz, dt_bias if dt_bias is not None else x,
        state_batch_indices if state_batch_indices is not None else x, y, out,
        dim, N, dim // B3.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B3.stride(), *C3.stride(), *zz.stride(),
        *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        HAS_IDX=state_batch_indices is not None, BLOCK_D=block_d, N_PAD=n_pad, num_warps=4,
    )
    return y, out
