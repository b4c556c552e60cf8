"""Liquid-S4's core (ops/liquid_s4): the FFT pass against the step-by-step specification in float64
(outputs, final states, every gradient, the initial state and input history included), for both kernels and
degrees 1 (plain S4D), 2 and 4, at lengths 1, 7 and 64; hand-checked small cases."""

import pytest
import torch

from ssmkit.ops.liquid_s4 import input_correlations, liquid_s4_fft, liquid_s4_ref, liquid_s4_step

from ..helpers import assert_close_scaled


def system(H=3, N2=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    dtA = torch.complex(-torch.rand(H, N2, generator=g, dtype=dtype) * 0.3 - 0.01,
                        torch.randn(H, N2, generator=g, dtype=dtype))
    # |Bbar| near 1 so that the liquid terms (Bbar^q) are of the order of the linear ones and really tested
    Bbar = torch.randn(H, N2, generator=g, dtype=cdtype)
    C = torch.randn(H, N2, generator=g, dtype=cdtype)
    D = torch.randn(H, generator=g, dtype=dtype)
    return dtA, Bbar, C, D


def test_input_correlations_by_hand():
    u = torch.tensor([[[2.0, 3.0, 5.0, 7.0]]], dtype=torch.float64)
    history = torch.tensor([[[11.0, 13.0]]], dtype=torch.float64)  # u_{-2}, u_{-1}
    c = input_correlations(u, 3, history)
    assert torch.equal(c[0, 0, 0], torch.tensor([2 * 13, 3 * 2, 5 * 3, 7 * 5], dtype=torch.float64))
    assert torch.equal(c[1, 0, 0], torch.tensor([2 * 13 * 11, 3 * 2 * 13, 5 * 3 * 2, 7 * 5 * 3], dtype=torch.float64))
    c0 = input_correlations(u, 2)  # no history: the first product reads a zero
    assert torch.equal(c0[0, 0, 0], torch.tensor([0, 6, 15, 35], dtype=torch.float64))


@pytest.mark.parametrize("kernel", ["kb", "polyb"])
def test_step_by_hand_degree_two(kernel):
    """One channel, one mode, two steps written out from the module's equations."""
    dtA = torch.tensor([[complex(-0.2, 0.5)]], dtype=torch.complex128)
    Bbar = torch.tensor([[complex(0.7, -0.3)]], dtype=torch.complex128)
    C = torch.tensor([[complex(0.4, 0.9)]], dtype=torch.complex128)
    D = torch.tensor([0.25], dtype=torch.float64)
    u0, u1 = 1.5, -2.0
    s, _, _ = liquid_s4_ref(torch.tensor([[[u0, u1]]], dtype=torch.float64), dtA, Bbar, C, D, 2, kernel)
    A = torch.exp(dtA)[0, 0]
    b, c = Bbar[0, 0], C[0, 0]
    h0 = b * u0  # c^(2)_0 = u0 * 0
    if kernel == "kb":
        h1 = A * h0 + b * u1 + b ** 2 * (u1 * u0)
        y1 = 2 * (c * h1).real + 0.25 * u1
    else:
        h1 = A * h0 + b * u1
        y1 = 2 * (c * h1).real + 0.25 * u1 + 2 * (c * b ** 2).real * (u1 * u0)
    y0 = 2 * (c * h0).real + 0.25 * u0
    assert torch.allclose(s[0, 0], torch.stack([y0, y1]).to(torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["kb", "polyb"])
@pytest.mark.parametrize("degree", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 7, 64])
def test_fft_equals_reference_with_states_and_gradients(kernel, degree, length):
    dtA, Bbar, C, D = (t.clone().requires_grad_() for t in system())
    u = torch.randn(2, 3, length, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 4, dtype=torch.complex128, requires_grad=True)
    history = torch.randn(2, 3, degree - 1, dtype=torch.float64, requires_grad=True)
    inputs = (u, dtA, Bbar, C, D, h0, history)
    s, h, hist = liquid_s4_fft(u, dtA, Bbar, C, D, degree, kernel, h0=h0, history=history, return_state=True)
    s_ref, h_ref, hist_ref = liquid_s4_ref(u, dtA, Bbar, C, D, degree, kernel, h0=h0, history=history)
    assert_close_scaled(s, s_ref, 1e-10, "outputs")
    assert_close_scaled(torch.view_as_real(h), torch.view_as_real(h_ref), 1e-10, "final state")
    assert torch.equal(hist, hist_ref)
    wants = [torch.randn_like(s), torch.randn_like(torch.view_as_real(h))]
    loss = (s * wants[0]).sum() + (torch.view_as_real(h) * wants[1]).sum()
    loss_ref = (s_ref * wants[0]).sum() + (torch.view_as_real(h_ref) * wants[1]).sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads_ref = torch.autograd.grad(loss_ref, inputs, allow_unused=True)
    for name, g, g_ref in zip(("u", "dtA", "Bbar", "C", "D", "h0", "history"), grads, grads_ref):
        if name == "history" and degree == 1:  # empty: nothing to compare
            continue
        assert g is not None and g_ref is not None, f"no gradient of {name}"
        g, g_ref = (torch.view_as_real(t) if t.is_complex() else t for t in (g, g_ref))
        assert_close_scaled(g, g_ref, 1e-9, f"gradient of {name}")


def test_the_liquid_terms_change_the_output():
    """Degree 2 differs from degree 1 (plain S4D) by exactly the correlation term, and that term is not 0."""
    dtA, Bbar, C, D = system()
    u = torch.randn(2, 3, 20, dtype=torch.float64)
    plain = liquid_s4_ref(u, dtA, Bbar, C, D, 1, "polyb")[0]
    liquid = liquid_s4_ref(u, dtA, Bbar, C, D, 2, "polyb")[0]
    corr = u * torch.nn.functional.pad(u[..., :-1], (1, 0))
    expected = 2 * (C * Bbar ** 2).sum(-1).real[None, :, None] * corr
    assert_close_scaled(liquid - plain, expected, 1e-12, "PB term")
    assert (liquid - plain).abs().max() > 1e-3


def test_bad_arguments_are_refused():
    dtA, Bbar, C, D = system()
    with pytest.raises(ValueError, match=r"history must be torch.float64 \(batch=2, H=3, degree - 1=2\)"):
        liquid_s4_step(torch.randn(2, 3, dtype=torch.float64), None, torch.zeros(2, 3, 1, dtype=torch.float64),
                       dtA, Bbar, C, D, 3)
    with pytest.raises(ValueError, match="kernel must be one of"):
        liquid_s4_ref(torch.randn(2, 3, 5, dtype=torch.float64), dtA, Bbar, C, D, 2, "pb")
