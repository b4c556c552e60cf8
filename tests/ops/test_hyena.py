"""Hyena's FFT recurrence (ssmkit.ops.hyena.fft) against the direct-sum specification (reference.py): outputs
and every gradient in float64 on awkward sizes; the modal kernel against repeated multiplication; the modal
fit recovering filters that are exact sums of exponentials, and reporting its error honestly otherwise."""

import pytest
import torch

from ssmkit.ops.hyena import fit_modal, hyena_recurrence, hyena_recurrence_ref, modal_kernel, modal_kernel_ref

from ..helpers import assert_close_scaled

DT = torch.float64


@pytest.mark.parametrize("order, L, D", [(2, 1, 3), (2, 63, 5), (3, 17, 6), (4, 40, 2)])
def test_fft_recurrence_equals_direct_convolution(order, L, D):
    """Hyena Sec. 3.3: the FFT path computes the same long convolutions as the explicit sums (eq. 5-6)."""
    torch.manual_seed(order * 100 + L)
    # the layer passes stacked channel slices of a transposed projection: mimic that layout
    proj = torch.randn(2, L, (order + 1) * D, dtype=DT).transpose(1, 2)
    gates = torch.stack(proj[:, : order * D].split(D, 1)).detach().requires_grad_()
    v = proj[:, order * D:].detach().requires_grad_()
    filters = (torch.randn(order - 1, D, L, dtype=DT) * torch.exp(-torch.arange(L, dtype=DT) / 10)).requires_grad_()
    bias = torch.randn(order - 1, D, dtype=DT, requires_grad=True)
    w = torch.randn(2, D, L, dtype=DT)
    inputs = (gates, v, filters, bias)
    y_ref = hyena_recurrence_ref(*inputs)
    g_ref = torch.autograd.grad((y_ref * w).sum(), inputs)
    y = hyena_recurrence(*inputs)
    g = torch.autograd.grad((y * w).sum(), inputs)
    assert_close_scaled(y, y_ref, 1e-11, "outputs")
    for name, a, b in zip(("gates", "v", "filters", "bias"), g, g_ref):
        assert_close_scaled(a, b, 1e-11, f"gradient of {name}")


def test_modal_kernel_equals_repeated_multiplication():
    torch.manual_seed(0)
    poles = torch.polar(torch.rand(3, 4, dtype=DT) * 0.99, torch.randn(3, 4, dtype=DT))
    residues = torch.randn(3, 4, dtype=torch.complex128)
    assert_close_scaled(modal_kernel(poles, residues, 50), modal_kernel_ref(poles, residues, 50), 1e-12, "kernel")


def test_fit_recovers_sums_of_exponentials():
    t = torch.arange(300, dtype=DT)
    h = torch.stack([0.97 ** t * torch.cos(0.3 * t) + 0.5 * 0.8 ** t, torch.sin(t / 10) * torch.exp(-t / 60),
                     -(0.99 ** t)])
    poles, residues, error = fit_modal(h, 4)
    assert error.max() < 1e-9
    assert_close_scaled(modal_kernel(poles, residues, 300), h, 1e-9, "refitted filters")
    assert (poles.abs() < 1).all()


def test_fit_reports_its_error():
    """Too few modes for a filter: the reported error is the true relative residual, and it is not small."""
    torch.manual_seed(0)
    h = torch.randn(2, 100, dtype=DT)
    poles, residues, error = fit_modal(h, 2)
    true = (modal_kernel(poles, residues, 100) - h).norm(dim=-1) / h.norm(dim=-1)
    assert torch.allclose(error, true, rtol=1e-8) and (error > 0.5).all()


def test_fit_refuses_short_filters():
    with pytest.raises(ValueError, match="at least 2 n_modes"):
        fit_modal(torch.randn(1, 6), 4)
