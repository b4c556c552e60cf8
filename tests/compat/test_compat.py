"""ssmkit.compat: the peers' signatures and semantics (in-place caches, padding ids, mixed precision).

Each semantic is checked against a small loop written here from its definition, in float64 where it helps.
"""

import pytest
import torch
import torch.nn.functional as F

from ssmkit.compat.causal_conv1d import (causal_conv1d_fn, causal_conv1d_update, causal_conv1d_update_ref,
                                         causal_conv1d_varlen_states, causal_conv1d_varlen_states_ref)
from ssmkit.compat.mamba_ssm import (mamba_chunk_scan_combined, selective_scan_fn, selective_state_update,
                                     selective_state_update_ref)


def conv_loop(x, weight, bias=None, history=None, activation=None):
    """y[t] = bias + sum_k weight[k] * window[t + k], window = history then x; float64."""
    x, weight = x.double(), weight.double()
    width = weight.shape[1]
    history = x.new_zeros(x.shape[0], x.shape[1], width - 1) if history is None else history.double()
    window = torch.cat([history, x], -1)
    y = torch.stack([(window[..., t:t + width] * weight).sum(-1) for t in range(x.shape[-1])], -1)
    if bias is not None:
        y = y + bias.double()[:, None]
    return F.silu(y) if activation == "silu" else y


# ------------------------------------------------------------------------------------------ conv
@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16, torch.float16])
def test_conv_fn_mixed_precision_grads_reach_fp32_weight(itype):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 11, dtype=itype).requires_grad_()
    weight = torch.randn(7, 4, requires_grad=True)
    bias = torch.randn(7, requires_grad=True)
    initial = torch.randn(2, 7, 3, dtype=itype).requires_grad_()
    y, final = causal_conv1d_fn(x, weight, bias, initial_states=initial, return_final_states=True,
                                activation="silu")
    assert y.dtype == itype and final.dtype == itype
    x64, w64, b64, i64 = (t.detach().double().requires_grad_() for t in (x, weight, bias, initial))
    y64 = conv_loop(x64, w64, b64, i64, "silu")
    tol = 1e-5 if itype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    torch.testing.assert_close(final, torch.cat([initial, x], -1)[..., -3:])
    g = torch.randn_like(y64)
    y.backward(g.to(itype))
    y64.backward(g)
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == itype
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(bias.grad.double(), b64.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(initial.grad.double(), i64.grad, rtol=tol, atol=tol * 10)


def test_conv_fn_final_states_out_is_written_and_returned():
    x = torch.randn(2, 5, 9)
    weight = torch.randn(5, 3)
    out = torch.empty(2, 5, 2)
    y, final = causal_conv1d_fn(x, weight, return_final_states=True, final_states_out=out)
    assert final is out
    torch.testing.assert_close(out, x[..., -2:])


def test_conv_fn_seq_idx_minus_one_is_padding():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 10, dtype=torch.float64)
    weight, bias = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1, -1, -1], [2, 2, 2, 2, 2, 3, 3, 3, 3, -1]], dtype=torch.int32)
    y = causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx)
    for b in range(2):
        for sid in seq_idx[b].unique().tolist():
            at = (seq_idx[b] == sid).nonzero()[:, 0]
            expected = torch.zeros(4, len(at), dtype=torch.float64) if sid < 0 else \
                conv_loop(x[b:b + 1, :, at], weight, bias)[0]
            torch.testing.assert_close(y[b][:, at], expected)


# ------------------------------------------------------------------------------------------ conv update
def ring_update_loop(x, state, weight, bias, cache_seqlen):
    """One row: read the width-1 entries before ``cache_seqlen`` (mod state_len), then append x there."""
    width, state_len = weight.shape[1], state.shape[-1]
    ring = state.clone()
    history = torch.stack([ring[:, (cache_seqlen - width + 1 + k) % state_len] for k in range(width - 1)], -1) \
        if width > 1 else ring[:, :0]
    y = conv_loop(x[None], weight, bias, history[None])[0]
    for t in range(x.shape[-1]):
        ring[:, (cache_seqlen + t) % state_len] = x[:, t]
    return y, ring


@pytest.mark.parametrize("length", [1, 3, 6])
@pytest.mark.parametrize("use_indices", [False, True])
@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16])
def test_conv_update_circular_buffer_and_state_indices_in_place(length, use_indices, itype):
    torch.manual_seed(length)
    batch, dim, width, state_len = 4, 6, 4, 5
    x = torch.randn(batch, dim, length, dtype=itype)
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    entries = 9 if use_indices else batch
    conv_state = torch.randn(entries, dim, state_len, dtype=itype)
    original = conv_state.clone()
    indices = torch.tensor([7, -1, 2, 0], dtype=torch.int32) if use_indices else None
    cache_seqlens = torch.tensor([0, 3, 11, 4], dtype=torch.int32)
    y = causal_conv1d_update(x, conv_state, weight, bias, cache_seqlens=cache_seqlens,
                             conv_state_indices=indices)
    expected_state = original.clone()
    for b in range(batch):
        row = b if indices is None else int(indices[b])
        if row < 0:
            assert bool((y[b] == 0).all())
            continue
        y_b, ring = ring_update_loop(x[b], original[row], weight, bias, int(cache_seqlens[b]))
        expected_state[row] = ring
        torch.testing.assert_close(y[b].double(), y_b, rtol=2e-2, atol=2e-2)
    assert torch.equal(conv_state, expected_state)


def test_conv_update_shift_without_cache_seqlens_matches_a_sequence():
    """Without cache_seqlens the newest state_len inputs are kept, and the output continues the sequence."""
    torch.manual_seed(2)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    weight = torch.randn(5, 4, dtype=torch.float64)
    state = torch.zeros(3, 5, 6, dtype=torch.float64)
    ys = [causal_conv1d_update(x[..., :7], state, weight), causal_conv1d_update(x[..., 7:], state, weight)]
    torch.testing.assert_close(torch.cat(ys, -1), conv_loop(x, weight))
    torch.testing.assert_close(state, x[..., -6:])
    ref_state = torch.zeros(3, 5, 6, dtype=torch.float64)
    causal_conv1d_update_ref(x, ref_state, weight)
    torch.testing.assert_close(ref_state, state)


def test_conv_varlen_states_match_the_loop():
    x = torch.randn(17, 3)
    cu = torch.tensor([0, 2, 10, 17])
    states = causal_conv1d_varlen_states(x, cu, 4)
    assert torch.equal(states, causal_conv1d_varlen_states_ref(x, cu, 4))
    assert torch.equal(states[0, :, 2:], x[0:2].T) and bool((states[0, :, :2] == 0).all())
    assert torch.equal(states[2], x[13:17].T)


# ------------------------------------------------------------------------------------------ state update
def ssm_step_loop(state, x, dt, A, B, C, D, z, dt_bias):
    """Per-head step, every index spelled out: state (heads, P, N), x (heads, P), A (heads, P, N)..."""
    state, x, dt, A, B, C, D, dt_bias = (t.double() for t in (state, x, dt, A, B, C, D, dt_bias))
    heads, ratio = state.shape[0], state.shape[0] // B.shape[0]
    delta = F.softplus(dt + dt_bias)
    new = torch.empty_like(state)
    y = torch.empty_like(x)
    for h in range(heads):
        g = h // ratio
        new[h] = torch.exp(delta[h][:, None] * A[h]) * state[h] + (delta[h] * x[h])[:, None] * B[g]
        y[h] = new[h] @ C[g] + D[h] * x[h]
    if z is not None:
        y = y * F.silu(z.double())
    return y, new


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16])
def test_state_update_heads_in_place_with_batch_indices_and_padding(tied, itype):
    torch.manual_seed(3)
    batch, heads, headdim, N, groups, entries = 4, 4, 3, 5, 2, 7
    state = torch.randn(entries, heads, headdim, N, dtype=itype)
    original = state.clone()
    x = torch.randn(batch, heads, headdim, dtype=itype)
    z = torch.randn_like(x)
    if tied:  # Mamba-2's step: stride-0 expansions of per-head values
        dt = torch.randn(batch, heads, dtype=itype)[..., None].expand(-1, -1, headdim)
        dt_bias = (torch.rand(heads) - 4)[:, None].expand(-1, headdim)
        A = (-torch.rand(heads) - 1)[:, None, None].expand(-1, headdim, N)
        D = torch.randn(heads)[:, None].expand(-1, headdim)
    else:
        dt = torch.randn(batch, heads, headdim, dtype=itype)
        dt_bias, A, D = torch.rand(heads, headdim) - 4, -torch.rand(heads, headdim, N) - 1, torch.randn(heads, headdim)
    B, C = torch.randn(batch, groups, N), torch.randn(batch, groups, N)  # float32 beside itype, as mamba_ssm
    indices = torch.tensor([5, -1, 0, 3], dtype=torch.int32)
    y = selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                               state_batch_indices=indices)
    assert y.dtype == itype
    tol = 1e-5 if itype == torch.float32 else 5e-2
    expected_state = original.clone()
    for b, row in enumerate(indices.tolist()):
        if row < 0:
            assert bool((y[b] == 0).all())
            continue
        y_b, new = ssm_step_loop(original[row], x[b], dt[b], A, B[b], C[b], D, z[b], dt_bias)
        torch.testing.assert_close(y[b].double(), y_b, rtol=tol, atol=tol)
        expected_state[row] = new.to(itype)
    torch.testing.assert_close(state, expected_state, rtol=tol, atol=tol)
    assert torch.equal(state[[1, 2, 4, 6]], original[[1, 2, 4, 6]])  # untouched rows


def test_state_update_mamba1_layout_in_place_matches_ref():
    torch.manual_seed(4)
    state = torch.randn(2, 6, 4, dtype=torch.float16)
    args = (torch.randn(2, 6, dtype=torch.float16), torch.randn(2, 6, dtype=torch.float16),
            -torch.rand(6, 4) - 1, torch.randn(2, 4), torch.randn(2, 4))
    other = state.clone()
    y = selective_state_update(state, *args, D=torch.randn(6), dt_bias=torch.rand(6), dt_softplus=True)
    assert y.shape == (2, 6) and not torch.equal(state, other)


def test_state_update_ref_also_updates_in_place():
    state = torch.randn(2, 3, 4, 5)
    before = state.clone()
    selective_state_update_ref(state, torch.randn(2, 3, 4), torch.randn(2, 3, 4), -torch.rand(3, 4, 5),
                               torch.randn(2, 1, 5), torch.randn(2, 1, 5))
    assert not torch.equal(state, before)


# ------------------------------------------------------------------------------------------ scans
def test_selective_scan_fn_accepts_fp32_weights_with_bf16_activations():
    torch.manual_seed(5)
    u, delta = torch.randn(2, 4, 9, dtype=torch.bfloat16), torch.rand(2, 4, 9, dtype=torch.bfloat16)
    A, B, C, D = -torch.rand(4, 3), torch.randn(2, 3, 9), torch.randn(2, 3, 9), torch.randn(4)
    y = selective_scan_fn(u, delta, A, B, C, D)
    assert y.dtype == torch.bfloat16
    y32 = selective_scan_fn(u.float(), delta.float(), A, B, C, D)
    torch.testing.assert_close(y.float(), y32, rtol=2e-2, atol=2e-2)


def test_chunk_scan_refuses_cu_seqlens_clearly():
    x = torch.randn(1, 8, 2, 3)
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        mamba_chunk_scan_combined(x, torch.rand(1, 8, 2), -torch.rand(2), torch.randn(1, 8, 1, 4),
                                  torch.randn(1, 8, 1, 4), 4, cu_seqlens=torch.tensor([0, 8]))
