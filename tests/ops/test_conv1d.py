"""Causal depthwise conv1d: fast path == loop reference == torch's Conv1d on outputs, final states and
gradients; one-step update == sequence; state passing; packed sequences; bad input."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops.conv1d import (causal_conv1d, causal_conv1d_ref, causal_conv1d_update, check_seq_idx,
                               packed_seq_idx)

from ..helpers import assert_close_scaled as _assert_close_scaled

F64 = torch.float64


def assert_close_scaled(actual, expected, tol, what):
    """The shared check, also for the empty states of width-1 kernels."""
    if expected.numel() == 0:
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        return
    _assert_close_scaled(actual, expected, tol, what)


def make(batch, dim, length, width, dtype=F64, channel_last=False, requires_grad=False):
    if channel_last:  # a (batch, dim, L) view of (batch, L, dim) memory, as cut from a projection's output
        x = torch.randn(batch, length, dim, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(batch, dim, length, dtype=dtype)
    weight = torch.randn(dim, width, dtype=dtype)
    bias = torch.randn(dim, dtype=dtype)
    state = torch.randn(batch, dim, width - 1, dtype=dtype)
    tensors = [x, weight, bias, state]
    if requires_grad:
        tensors = [t.detach().requires_grad_() for t in tensors]
    return tensors


def grads(fn, inputs, seed=1):
    """Outputs and the gradients of a random projection of (y, final_state) w.r.t. every input."""
    y, final = fn()
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g, dtype=y.dtype)).sum()
    return (y, final), torch.autograd.grad(loss, inputs, allow_unused=True)


def random_seq_idx(batch, length, n_boundaries, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(length - 1, generator=g)[:n_boundaries] + 1
        row = torch.zeros(length, dtype=torch.long)
        row[cuts] = 1
        rows.append(row.cumsum(0) + 3)  # ids need not start at 0
    return torch.stack(rows)


@pytest.mark.parametrize("width", [1, 2, 4, 5])
@pytest.mark.parametrize("channel_last", [False, True], ids=["channel_first", "channel_last"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
def test_fast_equals_reference_outputs_states_gradients(width, channel_last, packed, with_state):
    x, w, b, s = make(2, 60, 63, width, channel_last=channel_last, requires_grad=True)
    state = s if with_state else None
    seq_idx = random_seq_idx(2, 63, 5) if packed else None
    inputs = [x, w, b] + ([s] if with_state else [])
    args = dict(initial_state=state, seq_idx=seq_idx, activation="silu", return_final_state=True)
    (y, final), g_fast = grads(lambda: causal_conv1d(x, w, b, **args), inputs)
    (y_ref, final_ref), g_ref = grads(lambda: causal_conv1d_ref(x, w, b, **args), inputs)
    assert_close_scaled(y, y_ref, 1e-12, "outputs")
    assert_close_scaled(final, final_ref, 1e-12, "final state")
    for name, a, r, t in zip(["x", "weight", "bias", "initial_state"], g_fast, g_ref, inputs):
        assert a is not None and r is not None or t.numel() == 0, f"no gradient for {name}"
        if a is not None and r is not None:
            assert_close_scaled(a, r, 1e-12, f"grad {name}")


@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck(packed):
    x, w, b, s = make(2, 3, 7, 3, requires_grad=True)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]]) if packed else None

    def fn(x, w, b, s):
        y, final = causal_conv1d(x, w, b, s, seq_idx, "silu", return_final_state=True)
        return y, final

    assert torch.autograd.gradcheck(fn, (x, w, b, s))


def test_matches_torch_conv1d_module():
    """The layout of nn.Conv1d(groups=dim, padding=width-1) cropped to L outputs, weight (dim, 1, width)."""
    conv = torch.nn.Conv1d(6, 6, kernel_size=4, groups=6, padding=3).double()
    x = torch.randn(3, 6, 11, dtype=F64)
    expected = conv(x)[..., :11]
    assert_close_scaled(causal_conv1d(x, conv.weight, conv.bias), expected, 1e-13, "vs nn.Conv1d")
    assert_close_scaled(causal_conv1d(x, conv.weight[:, 0], conv.bias), expected, 1e-13, "2-D weight")
    assert_close_scaled(causal_conv1d(x, conv.weight, None), expected - conv.bias[:, None], 1e-13, "no bias")
    assert_close_scaled(causal_conv1d(x, conv.weight, conv.bias, activation="silu"), F.silu(expected), 1e-13,
                        "silu")


@pytest.mark.parametrize("width", [1, 4])
def test_update_loop_equals_sequence(width):
    x, w, b, s = make(2, 5, 9, width)
    y, final = causal_conv1d(x, w, b, s, activation="silu", return_final_state=True)
    state, ys = s, []
    for x_t in x.unbind(-1):
        y_t, state = causal_conv1d_update(x_t, state, w, b, activation="silu")
        ys.append(y_t)
    assert_close_scaled(torch.stack(ys, -1), y, 1e-13, "steps")
    assert torch.equal(state, final)


@pytest.mark.parametrize("splits", [[1] * 10, [2, 1, 7], [6, 4]], ids=["ones", "uneven", "two"])
@pytest.mark.parametrize("packed", [False, True])
def test_state_passing_equals_whole(splits, packed):
    """Shorter pieces than width-1 included: the state then mixes the old state and the new inputs.

    A carried state belongs to the first sequence of the piece, so where a piece starts a new sequence the
    caller starts it from a zero state (the state holds no sequence ids).
    """
    x, w, b, s = make(2, 4, 10, 5)
    seq_idx = torch.tensor([[0] * 3 + [1] * 7, [0] * 10]) if packed else None
    y_whole, final_whole = causal_conv1d(x, w, b, s, seq_idx, return_final_state=True)
    state, pieces, start = s, [], 0
    for n in splits:
        piece_idx = seq_idx[:, start:start + n] if packed else None
        if packed and start > 0:
            same = seq_idx[:, start - 1] == seq_idx[:, start]
            state = state * same[:, None, None]
        y, state = causal_conv1d(x[..., start:start + n], w, b, state, piece_idx, return_final_state=True)
        pieces.append(y)
        start += n
    assert_close_scaled(torch.cat(pieces, -1), y_whole, 1e-13, "pieces")
    assert_close_scaled(state, final_whole, 1e-13, "final state")


def test_packed_equals_separate_runs():
    x, w, b, s = make(1, 5, 20, 4)
    lengths = [2, 7, 1, 10]
    cu = torch.tensor([0, 2, 9, 10, 20])
    y, final = causal_conv1d(x, w, b, s, packed_seq_idx(1, 20, cu_seqlens=cu), return_final_state=True)
    for i, (start, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        state = s if i == 0 else None  # the carried state belongs to the first sequence
        y_alone, final_alone = causal_conv1d(x[..., start:start + n], w, b, state, return_final_state=True)
        assert_close_scaled(y[..., start:start + n], y_alone, 1e-13, f"sequence {i}")
    assert_close_scaled(final, final_alone, 1e-13, "final state = that of the last sequence")


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), dim=st.integers(1, 9), length=st.integers(1, 12), width=st.integers(1, 6),
       n_boundaries=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_random_shapes_fast_equals_reference(batch, dim, length, width, n_boundaries, seed):
    torch.manual_seed(seed)
    x, w, b, s = make(batch, dim, length, width)
    seq_idx = random_seq_idx(batch, length, min(n_boundaries, length - 1), seed) if length > 1 else None
    y, final = causal_conv1d(x, w, b, s, seq_idx, return_final_state=True)
    y_ref, final_ref = causal_conv1d_ref(x, w, b, s, seq_idx, return_final_state=True)
    assert_close_scaled(y, y_ref, 1e-13, "outputs")
    assert_close_scaled(final, final_ref, 1e-13, "final state")


def test_float32_matches_float64():
    x, w, b, s = make(2, 16, 33, 4)
    y64 = causal_conv1d(x, w, b, s)
    y32 = causal_conv1d(x.float(), w.float(), b.float(), s.float())
    assert y32.dtype == torch.float32
    assert_close_scaled(y32.double(), y64, 1e-5, "float32")


def test_packed_seq_idx_from_cu_seqlens():
    assert packed_seq_idx(1, 6, cu_seqlens=torch.tensor([0, 2, 5, 6])).tolist() == [[0, 0, 1, 1, 1, 2]]
    assert packed_seq_idx(2, 3) is None
    both = packed_seq_idx(1, 4, seq_idx=torch.tensor([[7, 8, 8, 9]]), cu_seqlens=torch.tensor([0, 1, 3, 4]))
    assert both.tolist() == [[7, 8, 8, 9]]


def test_bad_input_is_refused():
    x, w, b, s = make(2, 4, 6, 3)
    with pytest.raises(ValueError, match=r"x must be \(batch, dim, L\); got \(4, 6\)"):
        causal_conv1d(x[0], w)
    with pytest.raises(ValueError, match=r"weight must be \(dim=4, width\) or \(dim=4, 1, width\); got \(5, 3\)"):
        causal_conv1d(x, torch.randn(5, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"bias must be \(dim=4,\); got \(3,\)"):
        causal_conv1d(x, w, torch.randn(3, dtype=F64))
    with pytest.raises(ValueError, match=r"initial_state must be \(batch=2, dim=4, width-1=2\); got \(2, 4, 3\)"):
        causal_conv1d(x, w, b, torch.randn(2, 4, 3, dtype=F64))
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        causal_conv1d(x, w.float())
    with pytest.raises(ValueError, match="activation must be None or 'silu'; got 'relu'"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match="seq_idx must be non-decreasing.*row 1 goes from 2 to 1 at position 3"):
        causal_conv1d(x, w, seq_idx=torch.tensor([[0, 0, 0, 0, 1, 1], [0, 1, 2, 1, 2, 2]]))
    with pytest.raises(ValueError, match=r"seq_idx must be \(batch=2, length=6\); got \(2, 5\)"):
        causal_conv1d(x, w, seq_idx=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="seq_idx must be an integer tensor"):
        check_seq_idx(torch.zeros(2, 6), 2, 6)
    with pytest.raises(ValueError, match=r"conv_state must be \(batch=2, dim=4, width-1=2\)"):
        causal_conv1d_update(x[..., 0], s[..., :1], w)
    with pytest.raises(ValueError, match=r"x must be \(batch, dim\) for one step"):
        causal_conv1d_update(x, s, w)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at the packed length L=6"):
        packed_seq_idx(1, 6, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="batch of one; got batch size 2"):
        packed_seq_idx(2, 6, cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        packed_seq_idx(1, 6, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match="mark different sequence boundaries"):
        packed_seq_idx(1, 4, seq_idx=torch.tensor([[0, 0, 1, 1]]), cu_seqlens=torch.tensor([0, 1, 4]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_keeps_a_channel_last_layout(backend):
    """Mamba-2 passes the transposed in_proj output and transposes the result back: a channel-last input gives a
    channel-last output (no copies on either side, coalesced reads after), channel-first gives channel-first."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = "cuda" if (backend == "triton" and torch.cuda.is_available()) else "cpu"
    for channel_last in (True, False):
        base = torch.randn(2, 9, 6, device=device) if channel_last else torch.randn(2, 6, 9, device=device)
        x = (base.transpose(1, 2) if channel_last else base).requires_grad_()
        y = causal_conv1d(x, torch.randn(6, 4, device=device), activation="silu", backend=backend)
        assert y.transpose(1, 2).is_contiguous() == channel_last and y.is_contiguous() != channel_last
        y.backward(torch.randn(2, 9, 6, device=device).transpose(1, 2) if channel_last else torch.randn_like(y))
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_weights_beside_half_inputs(backend):
    """As causal-conv1d: bf16 x with float32 weight and bias; y in bf16 within bf16 rounding of the float64
    result, each gradient in its argument's dtype."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = "cuda" if (backend == "triton" and torch.cuda.is_available()) else "cpu"
    x = torch.randn(2, 9, 5, device=device).to(torch.bfloat16).transpose(1, 2).requires_grad_()
    w = torch.randn(5, 4, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    y = causal_conv1d(x, w, b, activation="silu", backend=backend)
    ref = causal_conv1d_ref(x.detach().double(), w.detach().double(), b.detach().double(), activation="silu")
    assert y.dtype == torch.bfloat16
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    y.float().sum().backward()
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        causal_conv1d(x.detach().float(), w.detach().half(), backend=backend)
