"""The fast scans (associative, chunked) against the sequential reference: outputs and gradients."""

import pytest
import torch

from ssmkit.ops.scan import (associative_scan, chunked_scan, linear_recurrence,
                             linear_recurrence_ref)

torch.set_flush_denormal(True)

FAST = {
    "associative": associative_scan,
    "chunked16": lambda *args, **kw: chunked_scan(*args, chunk_size=16, **kw),
    "chunked7": lambda *args, **kw: chunked_scan(*args, chunk_size=7, **kw),
}


def _complex(shape, generator, scale=1.0):
    return torch.complex(torch.randn(shape, generator=generator, dtype=torch.float64),
                         torch.randn(shape, generator=generator, dtype=torch.float64)) * scale


def _stable_a(shape, generator, complex_=True):
    """|a| in [0.5, 1): decaying, oscillating transitions like a discretised SSM's."""
    radius = 0.5 + 0.5 * torch.rand(shape, generator=generator, dtype=torch.float64)
    if not complex_:
        return radius
    angle = 2 * torch.pi * torch.rand(shape, generator=generator, dtype=torch.float64)
    return torch.polar(radius, angle)


def _run(fn, a, b, h0, dim, reverse, cotangent):
    """Outputs and the gradients of <cotangent, h> w.r.t. every input (zero where unused)."""
    leaves = [t for t in (a, b, h0) if t is not None]
    h = fn(a, b, h0, dim=dim, reverse=reverse)
    loss = (h * cotangent.conj()).real.sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return (h,) + grads


def _assert_close(got, want, what):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=what)


@pytest.mark.parametrize("L", [1, 2, 63, 64, 1000])
@pytest.mark.parametrize("name", list(FAST))
def test_fast_matches_reference_complex_time_varying(name, L):
    g = torch.Generator().manual_seed(L)
    batch, modes = 2, 5
    a = _stable_a((batch, L, modes), g).requires_grad_()
    b = _complex((batch, L, modes), g).requires_grad_()
    h0 = _complex((batch, modes), g).requires_grad_()
    cot = _complex((batch, L, modes), g)
    for use_h0 in (False, True):
        for reverse in (False, True):
            args = (a, b, h0 if use_h0 else None, 1, reverse, cot)
            _assert_close(_run(FAST[name], *args), _run(linear_recurrence_ref, *args),
                          f"{name} L={L} h0={use_h0} reverse={reverse}")


@pytest.mark.parametrize("L", [1, 2, 63, 64, 1000])
@pytest.mark.parametrize("name", list(FAST))
def test_fast_matches_reference_time_invariant_real_a(name, L):
    """a (modes,) shared by every step (as in S5: Lambda_bar), real, broadcast against complex b."""
    g = torch.Generator().manual_seed(100 + L)
    a = _stable_a((3,), g, complex_=False).requires_grad_()
    b = _complex((L, 2, 3), g).requires_grad_()
    h0 = _complex((2, 3), g).requires_grad_()
    cot = _complex((L, 2, 3), g)
    for reverse in (False, True):
        args = (a, b, h0, 0, reverse, cot)
        got, want = _run(FAST[name], *args), _run(linear_recurrence_ref, *args)
        assert got[1].dtype == torch.float64  # the gradient of a real input is real
        _assert_close(got, want, f"{name} L={L} reverse={reverse}")


@pytest.mark.parametrize("name", list(FAST))
def test_real_inputs_and_time_last(name):
    g = torch.Generator().manual_seed(7)
    a = _stable_a((4, 63), g, complex_=False).requires_grad_()
    b = torch.randn(4, 63, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(4, 63, generator=g, dtype=torch.float64)
    got = _run(FAST[name], a, b, h0, -1, False, cot)
    assert got[0].dtype == torch.float64
    _assert_close(got, _run(linear_recurrence_ref, a, b, h0, -1, False, cot), name)


def test_reference_is_the_recurrence():
    """The specification itself, written out for three steps."""
    a = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    b = torch.tensor([1.0, 3.0, 4.0], dtype=torch.float64)
    h = linear_recurrence_ref(a, b, torch.tensor(10.0, dtype=torch.float64), dim=0)
    assert h.tolist() == [0.5 * 10 + 1, 2 * 6 + 3, -1 * 15 + 4]
    h_rev = linear_recurrence_ref(a, b, torch.tensor(10.0, dtype=torch.float64), dim=0, reverse=True)
    assert h_rev.tolist() == [0.5 * -9.0 + 1, 2 * -6.0 + 3, -1 * 10 + 4]


def test_initial_state_continues_a_split_sequence():
    """Scanning two halves, passing the state on, equals scanning the whole."""
    g = torch.Generator().manual_seed(3)
    a, b = _stable_a((2, 101, 3), g), _complex((2, 101, 3), g)
    for name, fn in FAST.items():
        whole = fn(a, b, dim=1)
        first = fn(a[:, :40], b[:, :40], dim=1)
        second = fn(a[:, 40:], b[:, 40:], first[:, -1], dim=1)
        torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12, msg=name)


def test_h0_broadcasts_and_outputs_are_fresh():
    a = torch.full((5, 1), 0.9, dtype=torch.float64)
    b = torch.ones(5, 3, dtype=torch.float64)
    h0 = torch.tensor([2.0], dtype=torch.float64)  # broadcast over the 3 channels
    want = linear_recurrence_ref(a, b, h0, dim=0)
    for fn in FAST.values():
        torch.testing.assert_close(fn(a, b, h0, dim=0), want)
    b1 = torch.ones(1, 3)
    out = associative_scan(torch.ones(1, 3), b1, dim=0)
    out.add_(1)
    assert b1.eq(1).all(), "a fast scan of length 1 must not return the caller's tensor"


@pytest.mark.slow  # ~3 s on 2 shared cores
def test_gradcheck_and_double_backward():
    g = torch.Generator().manual_seed(11)
    a = (_stable_a((2, 6), g) * 0.9).requires_grad_()
    b = _complex((2, 6), g).requires_grad_()
    h0 = _complex((2,), g).requires_grad_()
    for name, fn in FAST.items():
        for reverse in (False, True):
            f = lambda a, b, h0: fn(a, b, h0, dim=-1, reverse=reverse)  # noqa: E731
            assert torch.autograd.gradcheck(f, (a, b, h0))
            if (name, reverse) in {("associative", False), ("chunked7", True)}:  # the backward is itself a scan
                assert torch.autograd.gradgradcheck(f, (a, b, h0))


def test_decaying_a_is_stable_over_long_sequences():
    """|a| = 0.5 over 4000 steps: cumulative products underflow to 0, the scans must not divide by them."""
    a = torch.full((4000, 2), 0.5, dtype=torch.float64)
    b = torch.ones(4000, 2, dtype=torch.float64)
    for fn in FAST.values():
        h = fn(a, b, dim=0)
        assert torch.isfinite(h).all()
        torch.testing.assert_close(h[-1], torch.full((2,), 2.0, dtype=torch.float64))


def test_backend_dispatch_and_errors():
    a, b = torch.rand(10, 2), torch.randn(10, 2)
    for backend in ("reference", "associative", "chunked"):
        torch.testing.assert_close(linear_recurrence(a, b, dim=0, backend=backend),
                                   linear_recurrence_ref(a, b, dim=0))
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_recurrence(a, b, dim=0, backend="auto")
    with pytest.raises(ValueError, match=r"a and b must broadcast.*\(3,\).*\(10, 2\)"):
        associative_scan(torch.rand(3), b, dim=0)
    with pytest.raises(ValueError, match=r"h0 must broadcast to the state shape \(2,\).*\(3,\)"):
        associative_scan(a, b, torch.zeros(3), dim=0)
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\]"):
        chunked_scan(a, b, dim=2)
    with pytest.raises(ValueError, match="at least one step"):
        associative_scan(torch.rand(0, 2), torch.rand(0, 2), dim=0)
    with pytest.raises(TypeError, match="b must be a floating-point or complex tensor"):
        associative_scan(a, torch.ones(10, 2, dtype=torch.long), dim=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_scan(a, b, dim=0, chunk_size=0)
