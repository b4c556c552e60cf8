"""Mamba-2's gated RMSNorm: the fused Triton kernels held to the reference (``ssmkit.ops.mamba2.rmsnorm_gated``).

Outputs and the gradients of x, z and weight against the float64 reference, for both gate positions, with and
without z, groups, awkward widths (not powers of two) and row counts, and on the layouts the Mamba-2 layer
passes: z a slice of the (batch, L, d_in_proj) projection (row stride larger than the width), x a transposed
view, and an expanded (stride-0) weight. Triton runs compiled on a GPU, else under the interpreter.
"""

import pytest
import torch

from ssmkit.ops import last_backend
from ssmkit.ops.mamba2 import rmsnorm_gated, rmsnorm_gated_ref

pytest.importorskip("triton", reason="the triton package is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(x, z, weight, group_size, norm_before_gate, tol):
    leaves = [t for t in (x, z, weight) if t is not None]
    out = rmsnorm_gated(x, z, weight, 1e-5, group_size, norm_before_gate, backend="triton")
    assert last_backend("rmsnorm_gated") == "triton"
    assert out.dtype == x.dtype and out.shape == x.shape
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rest = ref_leaves[0], ref_leaves[1:]
    rz = rest.pop(0) if z is not None else None
    rw = rest.pop(0)
    ref = rmsnorm_gated_ref(rx, rz, rw, 1e-5, group_size, norm_before_gate)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    assert _rel(out, ref) < tol, f"output {_rel(out, ref):.2e}"
    for name, g, rg in zip(("x", "z", "weight") if z is not None else ("x", "weight"), grads, ref_grads):
        assert g.shape == rg.shape
        assert _rel(g, rg) < tol, f"d{name} {_rel(g, rg):.2e}"


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("rows,hidden,group_size", [(1, 8, 8), (37, 24, 8), (19, 45, 15), (5, 96, 96)])
def test_triton_matches_reference(norm_before_gate, with_z, rows, hidden, group_size):
    torch.manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, device=DEVICE, requires_grad=True)
    z = torch.randn(rows, hidden, device=DEVICE, requires_grad=True) if with_z else None
    weight = (1 + 0.3 * torch.randn(hidden, device=DEVICE)).requires_grad_()
    _check(x, z, weight, group_size, norm_before_gate, 1e-5)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_triton_on_the_layers_views(norm_before_gate):
    """z sliced from the projection (row stride d_in_proj), x from a transposed buffer, weight expanded."""
    torch.manual_seed(1)
    batch, L, hidden = 2, 7, 12
    proj = torch.randn(batch, L, 3 * hidden + 5, device=DEVICE, requires_grad=True)
    z = proj[..., hidden + 2: 2 * hidden + 2]
    assert not z.is_contiguous()
    buf = torch.randn(batch, hidden, L, device=DEVICE, requires_grad=True)
    x = buf.transpose(1, 2)
    assert not x.is_contiguous()
    scale = torch.tensor([1.3], device=DEVICE, requires_grad=True)
    weight = scale.expand(hidden)
    assert weight.stride() == (0,)
    out = rmsnorm_gated(x, z, weight, 1e-5, 4, norm_before_gate, backend="triton")
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, (proj, buf, scale), dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (proj, buf, scale)]
    rp, rb, rs = ref_leaves
    ref = rmsnorm_gated_ref(rb.transpose(1, 2), rp[..., hidden + 2: 2 * hidden + 2], rs.expand(hidden), 1e-5, 4,
                            norm_before_gate)
    want = torch.autograd.grad(ref, ref_leaves, dy.double())
    assert _rel(out, ref) < 1e-5
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5


def test_half_precision_inputs():
    torch.manual_seed(2)
    x = torch.randn(9, 40, device=DEVICE).to(torch.bfloat16).requires_grad_()
    z = torch.randn(9, 40, device=DEVICE).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(40, device=DEVICE, requires_grad=True)  # float32, as under autocast
    _check(x, z, weight, 20, False, 2e-2)


def test_bad_arguments():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of hidden=8; got 3"):
        rmsnorm_gated(x, None, torch.ones(8), group_size=3)
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm_gated(x, None, torch.ones(7))
    with pytest.raises(ValueError, match="z must have x's shape"):
        rmsnorm_gated(x, torch.randn(3, 4), torch.ones(8))
