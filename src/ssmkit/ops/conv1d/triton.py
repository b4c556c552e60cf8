"""Causal depthwise conv1d (+ SiLU) in Triton, forward, backward and the one-step update for decoding.

Same formula, state layout and glossary as :mod:`ssmkit.ops.conv1d` (Mamba Sec. 3.4, the short convolution
before the scan): with ``xs = concat(state, x)`` along time (state = the width-1 inputs before x, oldest
first),

    y[b, d, t] = act(bias[d] + sum_k weight[d, k] * xs[b, d, t + k]),    k = 0 .. width-1

and with ``seq_idx`` an input contributes to output t only when it belongs to t's sequence (state entries
belong to the sequence at position 0).

Kernels: ``_conv_fwd_kernel`` [batch, L blocks, dim blocks] computes y (width unrolled; x read through its
strides, so the (batch, dim, L) view of a (batch, L, dim) projection needs no copy).
``_conv_bwd_dy_kernel`` recomputes the pre-activation, writes dy' = dy * act'(pre) and per-program partial
sums of dweight and dbias; ``_conv_bwd_dx_kernel`` gathers dxs[p] = sum_k weight[k] dy'[p + width-1-k] for
p over the state's positions and x's, so the initial state gets its gradient from the same pass.
The final state (the last width-1 inputs) is cut from x by torch ops and differentiates by itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import check_inference_only, check_state_batch_indices
from .args import _check_sequence_args, _weight_2d
from .shifted import _final_state
from ..._checks import check_choice, check_same_device, check_shape, check_tensor

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton"]

_BLOCK_L, _BLOCK_D = 64, 64


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, seq_ptr, y_ptr,
    dim, L,
    s_xb, s_xd, s_xl, s_wd, s_wk, s_sb, s_sd, s_sk, s_qb, s_yb, s_yd, s_yl,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr,
    SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < dim
    t_mask = t < L
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + b * s_qb + t, mask=t_mask, other=0)
        seq_0 = tl.load(seq_ptr + b * s_qb)
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        src = t + (k - (WIDTH - 1))                                   # input position, < 0: in the state
        wk = tl.load(w_ptr + d * s_wd + k * s_wk, mask=d_mask, other=0.0).to(tl.float32)
        in_x = (src >= 0) & t_mask
        xv = tl.load(x_ptr + b * s_xb + d[:, None] * s_xd + src[None, :] * s_xl,
                     mask=d_mask[:, None] & in_x[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            in_s = (src < 0) & t_mask
            sv = tl.load(state_ptr + b * s_sb + d[:, None] * s_sd + (src[None, :] + WIDTH - 1) * s_sk,
                         mask=d_mask[:, None] & in_s[None, :], other=0.0).to(tl.float32)
            xv += sv
        if HAS_SEQ:
            seq_src = tl.load(seq_ptr + b * s_qb + tl.maximum(src, 0), mask=t_mask, other=0)
            seq_src = tl.where(src >= 0, seq_src, seq_0)
            xv = tl.where((seq_src == seq_t)[None, :], xv, 0.0)
        acc += wk[:, None] * xv
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + b * s_yb + d[:, None] * s_yd + t[None, :] * s_yl, acc.to(y_ptr.dtype.element_ty),
             mask=d_mask[:, None] & t_mask[None, :])


@triton.jit
def _conv_bwd_dy_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, seq_ptr, dy_ptr, g_ptr, dw_ptr, db_ptr,
    dim, L, n_lblocks,
    s_xb, s_xd, s_xl, s_wd, s_wk, s_sb, s_sd, s_sk, s_qb, s_gb, s_gd, s_gl,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr,
    SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, W_PAD: tl.constexpr,
):
    """g = dy * act'(pre) into g_ptr (batch, dim, L) float32; dweight, dbias partials per (b, L block)."""
    b = tl.program_id(0)
    pid_l = tl.program_id(1)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < dim
    t_mask = t < L
    m2 = d_mask[:, None] & t_mask[None, :]
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + b * s_qb + t, mask=t_mask, other=0)
        seq_0 = tl.load(seq_ptr + b * s_qb)
    g = tl.load(dy_ptr + b * s_gb + d[:, None] * s_gd + t[None, :] * s_gl, mask=m2, other=0.0).to(tl.float32)
    if SILU:
        pre = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for k in tl.static_range(WIDTH):
            src = t + (k - (WIDTH - 1))
            wk = tl.load(w_ptr + d * s_wd + k * s_wk, mask=d_mask, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + b * s_xb + d[:, None] * s_xd + src[None, :] * s_xl,
                         mask=d_mask[:, None] & ((src >= 0) & t_mask)[None, :], other=0.0).to(tl.float32)
            if HAS_STATE:
                xv += tl.load(state_ptr + b * s_sb + d[:, None] * s_sd + (src[None, :] + WIDTH - 1) * s_sk,
                              mask=d_mask[:, None] & ((src < 0) & t_mask)[None, :], other=0.0).to(tl.float32)
            if HAS_SEQ:
                seq_src = tl.where(src >= 0, tl.load(seq_ptr + b * s_qb + tl.maximum(src, 0), mask=t_mask,
                                                     other=0), seq_0)
                xv = tl.where((seq_src == seq_t)[None, :], xv, 0.0)
            pre += wk[:, None] * xv
        if HAS_BIAS:
            pre += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[:, None]
        sig = 1.0 / (1.0 + tl.exp(-pre))
        g = g * sig * (1.0 + pre * (1.0 - sig))
    g = tl.where(m2, g, 0.0)
    tl.store(g_ptr + b * s_gb + d[:, None] * s_gd + t[None, :] * s_gl, g, mask=m2)
    # dweight[d, k] = sum_t g[t] xs[t + k - (width-1)]
    part = b * n_lblocks + pid_l
    offs_k = tl.arange(0, W_PAD)
    dw = tl.zeros((BLOCK_D, W_PAD), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        src = t + (k - (WIDTH - 1))
        xv = tl.load(x_ptr + b * s_xb + d[:, None] * s_xd + src[None, :] * s_xl,
                     mask=d_mask[:, None] & ((src >= 0) & t_mask)[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            xv += tl.load(state_ptr + b * s_sb + d[:, None] * s_sd + (src[None, :] + WIDTH - 1) * s_sk,
                          mask=d_mask[:, None] & ((src < 0) & t_mask)[None, :], other=0.0).to(tl.float32)
        if HAS_SEQ:
            seq_src = tl.where(src >= 0, tl.load(seq_ptr + b * s_qb + tl.maximum(src, 0), mask=t_mask, other=0),
                               seq_0)
            xv = tl.where((seq_src == seq_t)[None, :], xv, 0.0)
        col = tl.sum(g * xv, axis=1)
        dw = tl.where((offs_k == k)[None, :], col[:, None], dw)
    tl.store(dw_ptr + (part * dim + d[:, None]) * WIDTH + offs_k[None, :], dw,
             mask=d_mask[:, None] & (offs_k < WIDTH)[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + part * dim + d, tl.sum(g, axis=1), mask=d_mask)


@triton.jit
def _conv_bwd_dx_kernel(
    g_ptr, w_ptr, seq_ptr, dx_ptr, ds_ptr,
    dim, L,
    s_wd, s_wk, s_qb, s_gb, s_gd, s_gl, s_xb, s_xd, s_xl, s_sb, s_sd, s_sk,
    WIDTH: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dxs[p] = sum_k weight[k] g[p + width-1-k] over p in [-(width-1), L); p < 0 goes to the state."""
    b = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L) - (WIDTH - 1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < dim
    p_mask = p < L
    if HAS_SEQ:
        seq_p = tl.load(seq_ptr + b * s_qb + tl.maximum(p, 0), mask=p_mask, other=0)
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        t = p + (WIDTH - 1 - k)                                       # the output that reads p through tap k
        ok = (t >= 0) & (t < L) & p_mask
        if HAS_SEQ:
            seq_t = tl.load(seq_ptr + b * s_qb + t, mask=ok, other=0)
            ok = ok & (seq_t == seq_p)
        wk = tl.load(w_ptr + d * s_wd + k * s_wk, mask=d_mask, other=0.0).to(tl.float32)
        gv = tl.load(g_ptr + b * s_gb + d[:, None] * s_gd + t[None, :] * s_gl,
                     mask=d_mask[:, None] & ok[None, :], other=0.0)
        acc += wk[:, None] * gv
    tl.store(dx_ptr + b * s_xb + d[:, None] * s_xd + p[None, :] * s_xl, acc.to(dx_ptr.dtype.element_ty),
             mask=d_mask[:, None] & ((p >= 0) & p_mask)[None, :])
    if HAS_STATE:
        tl.store(ds_ptr + b * s_sb + d[:, None] * s_sd + (p[None, :] + WIDTH - 1) * s_sk,
                 acc.to(ds_ptr.dtype.element_ty), mask=d_mask[:, None] & (p < 0)[None, :])


def _channel_last(t: torch.Tensor) -> bool:
    """Whether a (batch, dim, L) tensor is a transposed view of a contiguous (batch, L, dim) one."""
    return t.shape[1] > 1 and t.transpose(1, 2).is_contiguous()


def _empty_in_layout(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty (batch, dim, L) tensor laid out as ``like``: channel-last in, channel-last out. Mamba-2 feeds
    the transposed in_proj output and reads the result back transposed, so keeping its layout saves two
    copies and keeps every later read coalesced (the kernels take any strides)."""
    batch, dim, L = shape
    if _channel_last(like):
        return torch.empty(batch, L, dim, device=like.device, dtype=dtype).transpose(1, 2)
    return torch.empty(batch, dim, L, device=like.device, dtype=dtype)


def _launch_fwd(x, w, bias, state, seq, silu):
    batch, dim, L = x.shape
    width = w.shape[1]
    y = _empty_in_layout((batch, dim, L), x, x.dtype)
    grid = (batch, triton.cdiv(L, _BLOCK_L), triton.cdiv(dim, _BLOCK_D))
    _conv_fwd_kernel[grid](
        x, w, bias if bias is not None else w, state if state is not None else x, seq if seq is not None else x,
        y, dim, L, *x.stride(), *w.stride(), *(state.stride() if state is not None else (0, 0, 0)),
        seq.stride(0) if seq is not None else 0, *y.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, HAS_STATE=state is not None, HAS_SEQ=seq is not None,
        SILU=silu, BLOCK_L=_BLOCK_L, BLOCK_D=_BLOCK_D, num_warps=4,
    )
    return y


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, state, seq, silu):
        y = _launch_fwd(x, w, bias, state, seq, silu)
        ctx.save_for_backward(x, w, bias, state, seq)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, bias, state, seq = ctx.saved_tensors
        batch, dim, L = x.shape
        width = w.shape[1]
        n_lblocks = triton.cdiv(L, _BLOCK_L)
        f32 = dict(device=x.device, dtype=torch.float32)
        # g (the gradient before the activation) is read with dy's strides: both in dy's layout
        dy = dy.transpose(1, 2).contiguous().transpose(1, 2) if _channel_last(dy) else dy.contiguous()
        g = _empty_in_layout((batch, dim, L), dy, torch.float32)
        dw_part = torch.empty(batch * n_lblocks, dim, width, **f32)
        db_part = torch.empty(batch * n_lblocks, dim, **f32) if bias is not None else None
        s_state = state.stride() if state is not None else (0, 0, 0)
        s_seq = seq.stride(0) if seq is not None else 0
        grid = (batch, n_lblocks, triton.cdiv(dim, _BLOCK_D))
        _conv_bwd_dy_kernel[grid](
            x, w, bias if bias is not None else w, state if state is not None else x, seq if seq is not None else x,
            dy, g, dw_part, db_part if db_part is not None else dw_part,
            dim, L, n_lblocks, *x.stride(), *w.stride(), *s_state, s_seq, *g.stride(),
            WIDTH=width, HAS_BIAS=bias is not None, HAS_STATE=state is not None, HAS_SEQ=seq is not None,
            SILU=ctx.silu, BLOCK_L=_BLOCK_L, BLOCK_D=_BLOCK_D, W_PAD=max(2, triton.next_power_of_2(width)),
            num_warps=4,
        )
        dx = _empty_in_layout((batch, dim, L), x, x.dtype)
        dstate = torch.empty_like(state) if state is not None else None
        grid = (batch, triton.cdiv(L + width - 1, _BLOCK_L), triton.cdiv(dim, _BLOCK_D))
        _conv_bwd_dx_kernel[grid](
            g, w, seq if seq is not None else x, dx, dstate if dstate is not None else dx,
            dim, L, *w.stride(), s_seq, *g.stride(), *dx.stride(),
            *(dstate.stride() if dstate is not None else (0, 0, 0)),
            WIDTH=width, HAS_STATE=state is not None, HAS_SEQ=seq is not None,
            BLOCK_L=_BLOCK_L, BLOCK_D=_BLOCK_D, num_warps=4,
        )
        dw = dw_part.sum(0).to(w.dtype)
        db = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dw, db, dstate, None, None


def causal_conv1d_triton(x, weight, bias=None, initial_state=None, seq_idx=None, activation=None,
                         return_final_state=False):
    """Causal depthwise conv1d on Triton; arguments and results as :func:`ssmkit.ops.conv1d.causal_conv1d`.

    Args:
        x: (batch, dim, L), any strides; weight: (dim, width) or (dim, 1, width); bias: (dim,);
        initial_state: (batch, dim, width-1), oldest first; seq_idx: (batch, L) non-decreasing ids;
        activation: None or "silu"; return_final_state: also return (batch, dim, width-1).

    Returns:
        y (batch, dim, L) in x's dtype, and the final state when asked; differentiable in x, weight, bias
        and initial_state.
    """
    from .._triton import _check_runnable

    weight, width = _check_sequence_args(x, weight, bias, initial_state, seq_idx, activation)
    _check_runnable("causal_conv1d_triton", x)
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    state = initial_state if (initial_state is not None and width > 1) else None
    y = _CausalConv1dFn.apply(x, weight, bias, state, seq, activation == "silu")
    if return_final_state:
        return y, _final_state(x, initial_state, seq_idx, width)
    return y


# --------------------------------------------------------------------------------------------------
# One step for decoding
# --------------------------------------------------------------------------------------------------
@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, idx_ptr, y_ptr, out_state_ptr,
    dim,
    s_xb, s_xd, s_sb, s_sd, s_sk, s_wd, s_wk, s_ob, s_od, s_ok,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < dim
    if HAS_IDX:
        row = tl.load(idx_ptr + b).to(tl.int64)
    else:
        row = b
    xv = tl.load(x_ptr + b * s_xb + d * s_xd, mask=d_mask, other=0.0).to(tl.float32)
    acc = xv * tl.load(w_ptr + d * s_wd + (WIDTH - 1) * s_wk, mask=d_mask, other=0.0).to(tl.float32)
    # read the whole window before writing: the output state may be the input state (in place)
    for k in tl.static_range(WIDTH - 1):
        sv = tl.load(state_ptr + row * s_sb + d * s_sd + k * s_sk, mask=d_mask, other=0.0).to(tl.float32)
        acc += sv * tl.load(w_ptr + d * s_wd + k * s_wk, mask=d_mask, other=0.0).to(tl.float32)
        if k >= 1:
            tl.store(out_state_ptr + row * s_ob + d * s_od + (k - 1) * s_ok,
                     sv.to(out_state_ptr.dtype.element_ty), mask=d_mask)
    if WIDTH > 1:
        tl.store(out_state_ptr + row * s_ob + d * s_od + (WIDTH - 2) * s_ok, xv.to(out_state_ptr.dtype.element_ty),
                 mask=d_mask)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + b * dim + d, acc.to(y_ptr.dtype.element_ty), mask=d_mask)


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None, *, state_batch_indices=None,
                                inplace=False):
    """One conv step: x (batch, dim), conv_state (rows, dim, width-1) -> ``(y (batch, dim), new_state)``.

    ``state_batch_indices`` (batch,) picks the state row of each batch row (default: row i, rows == batch).
    ``inplace``: write the new window into ``conv_state`` and return it; otherwise a new (batch, dim, width-1)
    tensor is returned and ``conv_state`` is left as it was. Inference-only.
    """
    from .._triton import _check_runnable

    check_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, dim) for one step; got {tuple(x.shape)}")
    batch, dim = x.shape
    check_tensor("conv_state", conv_state)
    weight = _weight_2d(weight, dim)
    width = weight.shape[1]
    if conv_state.dim() != 3 or conv_state.shape[1:] != (dim, width - 1):
        raise ValueError(f"conv_state must be (rows, dim={dim}, width-1={width - 1}); got {tuple(conv_state.shape)}")
    if state_batch_indices is None and conv_state.shape[0] != batch:
        raise ValueError(f"conv_state must have batch={batch} rows (or pass state_batch_indices); "
                         f"got {tuple(conv_state.shape)}")
    if bias is not None:
        check_tensor("bias", bias)
        check_shape("bias", bias, (dim,), f"(dim={dim},)")
    check_choice("activation", activation, (None, "silu"))
    check_same_device({"x": x, "conv_state": conv_state, "weight": weight, "bias": bias})
    for name, value in (("weight", weight), ("bias", bias), ("conv_state", conv_state)):
        if value is not None and value.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}); got {value.dtype}")
    _check_runnable("causal_conv1d_update_triton", x)
    check_inference_only("causal_conv1d_update_triton", (x, conv_state, weight, bias))
    if state_batch_indices is not None:
        state_batch_indices = check_state_batch_indices(state_batch_indices, batch, conv_state.shape[0], x.device)
    out_state = conv_state if inplace else torch.empty(batch if state_batch_indices is None else
                                                       conv_state.shape[0], dim, width - 1,
                                                       device=x.device, dtype=conv_state.dtype)
    if not inplace and state_batch_indices is not None:
        out_state.copy_(conv_state)  # rows that no batch row touches keep their values
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    block = min(256, max(16, triton.next_power_of_2(dim)))
    _conv_update_kernel[(batch, triton.cdiv(dim, block))](
        x, conv_state, weight, bias if bias is not None else weight,
        state_batch_indices if state_batch_indices is not None else x, y, out_state,
        dim, *x.stride(), *conv_state.stride(), *weight.stride(), *out_state.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, HAS_IDX=state_batch_indices is not None,
        SILU=activation == "silu", BLOCK_D=block, num_warps=4,
    )
    return y, out_state
