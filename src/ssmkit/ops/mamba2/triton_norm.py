"""Mamba-2's gated RMSNorm in Triton: one kernel forward, one backward (the specification is
``norm_reference.rmsnorm_gated_ref``).

Unfused, the norm costs a dozen elementwise kernels forward and more backward, each reading and writing the
whole (tokens, d_inner) activation; here each is read once. Rows are the flattened leading dimensions; one
program owns a run of rows of one normalisation group, kept in registers as float32 (``BLOCK`` >= group_size).

Backward, with s = silu(z), s' = sigmoid(z) (1 + z (1 - sigmoid(z))), r = 1 / rms and g the gradient reaching
the normalised values:

    norm_before_gate=False:  v = x s, out = v r w;  g = dy w;  dv = r g - v r^3 mean(g v)
                             dx = dv s,  dz = dv x s',  dw = sum_rows dy v r
    norm_before_gate=True:   out = x r w s;  g = dy w s;  dx = r g - x r^3 mean(g x)
                             dz = dy x r w s',  dw = sum_rows dy x r s

dw is summed per program in registers and the per-program partial sums are added afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rmsnorm_gated_triton"]

ROWS_PER_PROGRAM = 16     # forward: enough rows per program to amortise loading the weight
MAX_BWD_PROGRAMS = 1024   # backward: at most this many row blocks per group, so few partial dw rows to add


@triton.jit
def _gated_norm_fwd_kernel(x_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, M, rows, group_size, n_groups,
                           s_xm, s_zm, s_om, eps,
                           HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    group = tl.program_id(1)
    cols = group * group_size + tl.arange(0, BLOCK)
    col_mask = tl.arange(0, BLOCK) < group_size
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    for i in range(rows):
        row = pid_m * rows + i
        if row < M:
            x = tl.load(x_ptr + row * s_xm + cols, mask=col_mask, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + row * s_zm + cols, mask=col_mask, other=0.0).to(tl.float32)
                gate = z * tl.sigmoid(z)
                if not NORM_BEFORE_GATE:
                    x = x * gate
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / group_size + eps)
            out = x * rstd * w
            if HAS_Z:
                if NORM_BEFORE_GATE:
                    out = out * gate
            tl.store(out_ptr + row * s_om + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)
            tl.store(rstd_ptr + row * n_groups + group, rstd)


@triton.jit
def _gated_norm_bwd_kernel(x_ptr, z_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_ptr, M, rows, group_size,
                           n_groups, hidden, s_xm, s_zm, s_dym,
                           HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                           BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    group = tl.program_id(1)
    cols = group * group_size + tl.arange(0, BLOCK)
    col_mask = tl.arange(0, BLOCK) < group_size
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(rows):
        row = pid_m * rows + i
        if row < M:
            x = tl.load(x_ptr + row * s_xm + cols, mask=col_mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * s_dym + cols, mask=col_mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row * n_groups + group)
            if HAS_Z:
                z = tl.load(z_ptr + row * s_zm + cols, mask=col_mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                gate = z * sig
                dgate = sig * (1.0 + z * (1.0 - sig))
                if NORM_BEFORE_GATE:
                    normed = x * rstd
                    g = dy * w * gate
                    dw += dy * normed * gate
                    dz = dy * normed * w * dgate
                    dx = rstd * g - x * (rstd * rstd * rstd) * (tl.sum(g * x, axis=0) / group_size)
                else:
                    v = x * gate
                    g = dy * w
                    dw += dy * v * rstd
                    dv = rstd * g - v * (rstd * rstd * rstd) * (tl.sum(g * v, axis=0) / group_size)
                    dx = dv * gate
                    dz = dv * x * dgate
                tl.store(dz_ptr + row * hidden + cols, dz.to(dz_ptr.dtype.element_ty), mask=col_mask)
            else:
                g = dy * w
                dw += dy * x * rstd
                dx = rstd * g - x * (rstd * rstd * rstd) * (tl.sum(g * x, axis=0) / group_size)
            tl.store(dx_ptr + row * hidden + cols, dx.to(dx_ptr.dtype.element_ty), mask=col_mask)
    tl.store(dw_ptr + pid_m * hidden + cols, dw, mask=col_mask)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """(..., hidden) -> (M, hidden) with unit column stride (a view when the strides allow it)."""
    t = t.reshape(-1, hidden)
    return t if t.stride(1) == 1 else t.contiguous()


class _RMSNormGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, weight, eps, group_size, norm_before_gate):
        hidden = x.shape[-1]
        weight = weight.contiguous()  # the kernels read it at unit stride (an expanded view has stride 0)
        x2 = _rows(x, hidden)
        z2 = _rows(z, hidden) if z is not None else None
        M, n_groups = x2.shape[0], hidden // group_size
        out = torch.empty((M, hidden), dtype=x.dtype, device=x.device)
        rstd = torch.empty((M, n_groups), dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(group_size)
        rows = ROWS_PER_PROGRAM
        grid = (triton.cdiv(M, rows), n_groups)
        _gated_norm_fwd_kernel[grid](
            x2, z2 if z2 is not None else x2, weight, out, rstd, M, rows, group_size, n_groups,
            x2.stride(0), z2.stride(0) if z2 is not None else 0, out.stride(0), float(eps),
            HAS_Z=z is not None, NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK=block,
            num_warps=min(max(block // 256, 1), 8))
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.meta = (x.shape, None if z is None else z.shape, group_size, norm_before_gate, block)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, rstd = ctx.saved_tensors
        x_shape, z_shape, group_size, norm_before_gate, block = ctx.meta
        hidden = x2.shape[1]
        M, n_groups = x2.shape[0], hidden // group_size
        dy2 = _rows(dy, hidden)
        dx = torch.empty((M, hidden), dtype=x2.dtype, device=x2.device)
        dz = torch.empty((M, hidden), dtype=z2.dtype, device=z2.device) if z2 is not None else None
        rows = triton.cdiv(M, min(M, MAX_BWD_PROGRAMS))
        n_programs = triton.cdiv(M, rows)
        dw_partial = torch.empty((n_programs, hidden), dtype=torch.float32, device=x2.device)
        _gated_norm_bwd_kernel[(n_programs, n_groups)](
            x2, z2 if z2 is not None else x2, weight, dy2, rstd, dx, dz if dz is not None else dx, dw_partial,
            M, rows, group_size, n_groups, hidden, x2.stride(0), z2.stride(0) if z2 is not None else 0,
            dy2.stride(0), HAS_Z=z2 is not None, NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK=block,
            num_warps=min(max(block // 256, 1), 8))
        dw = dw_partial.sum(0).to(weight.dtype)
        return (dx.view(x_shape), None if dz is None else dz.view(z_shape), dw, None, None, None)


def rmsnorm_gated_triton(x, z, weight, eps, group_size, norm_before_gate):
    """x, z (..., hidden), weight (hidden,) -> (..., hidden) in x's dtype; differentiable in x, z, weight."""
    return _RMSNormGated.apply(x, z, weight, eps, group_size, norm_before_gate)
