"""The RG-LRU's fast paths (gates in parallel + chunked / associative scan) against its sequential reference:
outputs, final states and every gradient, in float64, on awkward sizes and the layouts the layer passes."""

import pytest
import torch

from ssmkit.ops import use_backend
from ssmkit.ops.backends import last_backend
from ssmkit.ops.rglru import MAX_SQRT_GRADIENT, rglru, rglru_ref, rglru_step, sqrt_bounded_derivative

torch.set_flush_denormal(True)

FAST = ("chunked", "associative")


def make_params(n_heads, block, generator, dtype=torch.float64):
    width = n_heads * block

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).requires_grad_()

    # recurrent_param over a wide range: a = sigmoid(-p) from ~0.05 to ~0.999
    return [randn(width, scale=3.0), randn(n_heads, block, block, scale=0.5), randn(n_heads, block),
            randn(n_heads, block, block, scale=0.5), randn(n_heads, block)]


def run(backend, x, params, h0, reset):
    """Outputs, final state and the gradients of a random functional of both w.r.t. every input."""
    leaves = [x] + params + ([h0] if h0 is not None else [])
    h, h_last = rglru(x, *params, initial_state=h0, reset=reset, return_final_state=True, backend=backend)
    g = torch.Generator().manual_seed(99)
    loss = (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum() + h_last.square().sum()
    grads = torch.autograd.grad(loss, leaves)
    return (h, h_last) + grads


@pytest.mark.parametrize("length", [1, 2, 63, 64, 130])
@pytest.mark.parametrize("backend", FAST)
def test_fast_paths_match_the_reference(backend, length):
    g = torch.Generator().manual_seed(length)
    n_heads, block = 3, 5  # width 15
    params = make_params(n_heads, block, g)
    x = torch.randn(2, length, n_heads * block, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, n_heads * block, generator=g, dtype=torch.float64, requires_grad=True)
    reset = torch.rand(2, length, generator=g) < 0.1
    reset[0, 0] = True
    for use_h0 in (False, True):
        for use_reset in (False, True):
            args = (x, params, h0 if use_h0 else None, reset if use_reset else None)
            got, want = run(backend, *args), run("reference", *args)
            for i, (a, b) in enumerate(zip(got, want)):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10,
                                           msg=f"{backend} L={length} h0={use_h0} reset={use_reset} item {i}")


@pytest.mark.parametrize("backend", FAST + ("reference",))
def test_views_as_the_layer_passes_them(backend):
    """The layer passes the convolution's output as a (B, L, W) view of a (B, W, L) tensor; an initial state
    may be a stride-0 broadcast and the reset mask a slice. Outputs and gradients equal those on copies."""
    g = torch.Generator().manual_seed(5)
    params = make_params(2, 4, g)
    channel_first = torch.randn(3, 8, 29, generator=g, dtype=torch.float64, requires_grad=True)
    x = channel_first.transpose(1, 2)
    h0_row = torch.randn(1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = h0_row.expand(3, 8)
    reset = (torch.rand(3, 40, generator=g) < 0.2)[:, 5:34]
    assert not x.is_contiguous() and h0.stride(0) == 0 and not reset.is_contiguous()
    got = run(backend, x, params, h0, reset)
    x_copy = x.detach().contiguous().requires_grad_()
    h0_copy = h0.detach().contiguous().requires_grad_()
    want = run("reference", x_copy, params, h0_copy, reset.contiguous())
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{backend} item {i}")


def test_reference_is_the_paper_recurrence():
    """Eqs. (1)-(4) written out by hand for one channel-block of width 1 and two steps."""
    p = torch.tensor([0.3], dtype=torch.float64)
    wx, bx = torch.tensor([[[0.7]]], dtype=torch.float64), torch.tensor([[0.1]], dtype=torch.float64)
    wa, ba = torch.tensor([[[-0.4]]], dtype=torch.float64), torch.tensor([[0.2]], dtype=torch.float64)
    xs = torch.tensor([[[1.5], [-2.0]]], dtype=torch.float64)
    a_base = torch.sigmoid(-p)  # a = sigmoid(Lambda), Lambda = -recurrent_param
    h = torch.zeros(1, dtype=torch.float64)
    expected = []
    for x in xs[0]:
        r, i = torch.sigmoid(wa[0, 0] * x + ba[0]), torch.sigmoid(wx[0, 0] * x + bx[0])
        a_t = a_base ** (8 * r)
        h = a_t * h + torch.sqrt(1 - a_t ** 2) * (i * x)
        expected.append(h.clone())
    got = rglru_ref(xs, p, wx, bx, wa, ba)
    torch.testing.assert_close(got[0], torch.stack(expected), rtol=1e-14, atol=1e-14)
    # a reset makes a_t = 0: the state is forgotten and the input enters unnormalised
    h_reset = rglru_step(xs[:, 1], torch.full((1, 1), 5.0, dtype=torch.float64), p, wx, bx, wa, ba,
                         reset=torch.tensor([True]))
    torch.testing.assert_close(h_reset, torch.sigmoid(wx[0, 0] * xs[:, 1] + bx[0]) * xs[:, 1])


def test_sqrt_derivative_is_bounded():
    u = torch.tensor([1e-12, 0.25, 4.0], dtype=torch.float64, requires_grad=True)
    y = sqrt_bounded_derivative(u)
    torch.testing.assert_close(y, u.detach().sqrt())
    (grad,) = torch.autograd.grad(y.sum(), u)
    torch.testing.assert_close(grad, torch.tensor([MAX_SQRT_GRADIENT, 1.0, 0.25], dtype=torch.float64))
    v = torch.tensor([0.3, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sqrt_bounded_derivative, (v,))
    assert torch.autograd.gradgradcheck(sqrt_bounded_derivative, (v,))


def test_gradcheck_of_the_fast_path():
    g = torch.Generator().manual_seed(3)
    params = [p.detach().requires_grad_() for p in make_params(2, 2, g)]
    x = torch.randn(1, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for backend in FAST:
        assert torch.autograd.gradcheck(lambda x, h0, *p: rglru(x, *p, initial_state=h0, backend=backend),
                                        (x, h0, *params))


def test_long_sequence_stays_finite_and_agrees():
    """10k steps with a near 1 and near 0: no under/overflow in the scans, same numbers as the loop."""
    g = torch.Generator().manual_seed(8)
    params = [p.detach() for p in make_params(2, 3, g)]
    params[0] = torch.tensor([-8.0, -3.0, 0.0, 3.0, 8.0, 12.0], dtype=torch.float64)
    x = torch.randn(1, 10_000, 6, generator=g, dtype=torch.float64)
    want = rglru_ref(x, *params)
    for backend in FAST:
        got = rglru(x, *params, backend=backend)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=backend)


def test_backend_choice_is_visible():
    g = torch.Generator().manual_seed(1)
    params = [p.detach() for p in make_params(1, 2, g)]
    x = torch.randn(1, 5, 2, dtype=torch.float64)
    rglru(x, *params)
    assert last_backend("rglru") == "chunked"
    with use_backend("associative"):
        rglru(x, *params)
    assert last_backend("rglru") == "associative"
    with pytest.raises(ValueError, match="backend must be one of"):
        rglru(x, *params, backend="triton")


def test_bad_arguments_are_refused():
    g = torch.Generator().manual_seed(2)
    params = [p.detach() for p in make_params(2, 3, g)]
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x must be \(batch, length, width\); got \(5, 6\)"):
        rglru(x[0], *params)
    with pytest.raises(ValueError, match=r"recurrent_param must be \(width=7,\)"):
        rglru(torch.randn(2, 5, 7, dtype=torch.float64), *params)
    with pytest.raises(ValueError, match="input_gate_weight must be"):
        rglru(x, params[0], params[1][:, :2], *params[2:])
    with pytest.raises(ValueError, match=r"initial_state must be \(batch=2, width=6\)"):
        rglru(x, *params, initial_state=torch.zeros(3, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="reset must be a bool tensor"):
        rglru(x, *params, reset=torch.zeros(2, 5))
    with pytest.raises(TypeError, match=r"input_gate_bias must have the dtype of x \(torch.float64\); got torch.float32"):
        rglru(x, params[0], params[1], params[2].float(), *params[3:])
    with pytest.raises(ValueError, match="reset must be"):
        rglru(x, *params, reset=torch.zeros(2, 4, dtype=torch.bool))
