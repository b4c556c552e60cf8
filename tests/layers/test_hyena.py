"""Hyena against its papers: the layer's FFT pass equals direct convolutions with the same implicit filters
(Poli et al. 2023, Sec. 3.3); the filters decay with the window of eq. 7; the distilled constant-state model
(Massaroli et al. 2023) runs forward == step, and its outputs stay within a stated bound of the original's."""

import torch

import ssmkit
from ssmkit.ops.hyena import hyena_recurrence_ref

from ..helpers import assert_close_scaled

DT = torch.float64


def make(order=2, l_max=256, seed=0):
    torch.manual_seed(seed)
    return ssmkit.Hyena(d_model=8, l_max=l_max, order=order, filter_order=16).to(DT)


def test_layer_fft_path_equals_direct_convolution():
    layer = make(order=3)
    x = torch.randn(2, 37, 8, dtype=DT)
    gates, v, _ = layer._gated_inputs(x, None)
    filters, bias = layer.long_filters(37)
    expected = layer.out_proj(hyena_recurrence_ref(gates, v, filters, bias).transpose(1, 2))
    assert_close_scaled(layer(x), expected, 1e-11, "FFT path vs direct sums")


def test_filters_decay_with_the_window():
    """The exponential window (eq. 7) bounds each filter: the fastest channel is down to 1 % of its scale by
    30 % of l_max, up to the FFN's own size."""
    layer = make(l_max=200)
    h, _ = layer.long_filters(200)  # (1, D, L)
    fast = h[0, -1]  # the last channel has the fastest decay
    assert fast[120:].abs().max() < 0.02 * layer.filter_fn.implicit_filter(layer.filter_fn.pos_emb(200)[0]).abs().max()


def run_steps(mixer, x, state):
    ys = []
    for x_t in x.unbind(1):
        y_t, state = mixer.step(x_t, state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


def test_distilled_forward_equals_step_and_chunks():
    distilled = make(order=3).distill(n_modes=8)
    assert distilled.constant_state
    x = torch.randn(2, 50, 8, dtype=DT)
    _, state0 = distilled(torch.randn(2, 5, 8, dtype=DT), return_state=True)
    y, state = distilled(x, state0, return_state=True)
    y_steps, state_steps = run_steps(distilled, x, state0)
    assert_close_scaled(y_steps, y, 1e-9, "distilled forward vs step")
    assert_close_scaled(torch.view_as_real(state_steps["hyena_distilled.z"]),
                        torch.view_as_real(state["hyena_distilled.z"]), 1e-9, "distilled final state")
    y1, s1 = distilled(x[:, :20], state0, return_state=True)
    y2 = distilled(x[:, 20:], s1)
    assert_close_scaled(torch.cat([y1, y2], 1), y, 1e-9, "distilled chunks")


def test_distilled_outputs_stay_within_the_fitting_bound():
    """Stated bound: max |y - y_distilled| <= 10 x (largest relative L2 filter error) x max |y|, for an order-2
    layer at its initialisation over its whole l_max (one long convolution, so the output error is that
    convolution's error, weighted by the gate and W_out); and 16 modes fit the initial filters to < 1e-3."""
    layer = make(order=2, l_max=256)
    distilled = layer.distill(n_modes=16)
    fit = distilled.fitting_error().max().item()
    assert fit < 1e-3, f"16 modes fit the filters only to {fit:.3g}"
    x = torch.randn(2, 256, 8, dtype=DT)
    with torch.no_grad():
        y, y_distilled = layer(x), distilled(x)
    scale = y.abs().max().item()
    err = (y - y_distilled).abs().max().item()
    assert err <= 10 * fit * scale, f"distilled output error {err:.3g} > 10 x fit {fit:.3g} x scale {scale:.3g}"


def test_fewer_modes_fit_worse_and_the_error_says_so():
    layer = make(order=2, l_max=256)
    coarse, fine = layer.distill(n_modes=2).fitting_error(), layer.distill(n_modes=16).fitting_error()
    assert coarse.max() > fine.max()


def test_history_state_grows_and_l_max_is_enforced():
    layer = make(l_max=16)
    state = layer.init_state(1)
    _, state = layer(torch.randn(1, 10, 8, dtype=DT), state, return_state=True)
    assert state["hyena.history"].shape == (1, 1, 8, 10)
    try:
        layer(torch.randn(1, 7, 8, dtype=DT), state)
    except ValueError as err:
        assert "l_max=16" in str(err)
    else:
        raise AssertionError("a sequence past l_max was accepted")


def test_distilled_half_precision_model_matches_float64():
    """A bfloat16 DistilledHyena (no autocast) follows layers/base.py's precision rule, as the contract's
    half-precision row checks for registered mixers: output in bfloat16, float32 core, a complex64 state z and
    a bfloat16 conv cache, forward and step within 4 u (u = 2^-8) of the float64 twin of the rounded model."""
    import copy

    u = 2.0 ** -8
    half = make(order=3).distill(n_modes=8).to(torch.bfloat16)
    exact = copy.deepcopy(half).double()
    x64 = torch.randn(2, 30, 8, dtype=DT).to(torch.bfloat16).double()
    with torch.no_grad():
        _, state0 = half(x64[:, :10].to(torch.bfloat16), return_state=True)
        assert {k: v.dtype for k, v in state0.items()} == {"hyena_distilled.conv": torch.bfloat16,
                                                           "hyena_distilled.z": torch.complex64}
        y, state = half(x64[:, 10:].to(torch.bfloat16), state0, return_state=True)
        y_steps, _ = run_steps(half, x64[:, 10:].to(torch.bfloat16), state0)
        y_ref = exact(x64[:, 10:], {k: v.to(torch.float64 if v.is_floating_point() else torch.complex128)
                                    for k, v in state0.items()})
    assert y.dtype == torch.bfloat16 and {k: v.dtype for k, v in state.items()} == \
        {k: v.dtype for k, v in state0.items()}
    assert_close_scaled(y.double(), y_ref, 4 * u, "bfloat16 distilled forward")
    assert_close_scaled(y_steps.double(), y_ref, 4 * u, "bfloat16 distilled steps")
