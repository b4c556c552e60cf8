"""Every fast op on the tensor layouts the layers really pass: transposed, sliced and stride-0 views.

The kernel tests feed contiguous tensors; the layers do not. Mamba2 splits x, B and C out of the
(batch, channels, L) convolution output and transposes them, Mamba feeds B and C as slices of x_proj's
output, and mamba_ssm's decoding step expands per-head parameters with stride 0. A fast path that writes a
gradient at contiguous offsets into a tensor allocated with a view's strides (``empty_like``) gives wrong
gradients only on such views: the Triton SSD did, and trained Mamba-2 on garbage for it.

Each case builds its inputs as views of one leaf tensor, runs the op with a fast backend, and compares the
outputs, final states and the gradient of that leaf with the float64 reference run on the same views.
The Triton backend runs under the interpreter on the CPU (small sizes), compiled on a GPU.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()

from ssmkit.ops import selective_scan as scan_pkg  # noqa: E402,F401  (the package, for the backends)
from ssmkit.ops.conv1d import causal_conv1d  # noqa: E402
from ssmkit.ops.selective_scan import selective_scan  # noqa: E402
from ssmkit.ops.selective_scan import cpp as scan_cpp  # noqa: E402
from ssmkit.ops.ssd import ssd  # noqa: E402
from ssmkit.ops.triton import triton_available  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def _backends(fast):
    """Fast backends that can run here; the C++ one is required where SSMKIT_REQUIRE_CPP=1 (never skipped)."""
    names = []
    for name in fast:
        if name == "triton":
            names.append(pytest.param(name, marks=pytest.mark.skipif(
                not triton_available(DEVICE), reason="triton is not installed")))
        elif name == "cpp":
            required = os.environ.get("SSMKIT_REQUIRE_CPP") == "1"
            names.append(pytest.param(name, marks=pytest.mark.skipif(
                ON_GPU or (not required and not scan_cpp.is_available()),
                reason="the C++ scan runs on CPU tensors and could not be built here")))
        else:
            names.append(name)
    return names


def rel_err(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check(fast_out, ref_out, fast_grad, ref_grad, tol):
    errors = {f"out{i}": rel_err(a, e) for i, (a, e) in enumerate(zip(fast_out, ref_out))}
    errors["grad"] = rel_err(fast_grad, ref_grad)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


def run_twice(make_views, op, fast_backend, ref_backend, dtype, leaf_value):
    """Run ``op(views, backend)`` on views of a leaf in ``dtype`` (fast) and float64 (reference)."""
    results = []
    for backend, dt in ((fast_backend, dtype), (ref_backend, torch.float64)):
        leaf = leaf_value.detach().to(DEVICE, dt, copy=True).requires_grad_()
        outs = op(*make_views(leaf), backend=backend)
        outs = outs if isinstance(outs, tuple) else (outs,)
        seeds = [torch.linspace(-1, 1, o.numel(), dtype=torch.float64, device=o.device).view_as(o) for o in outs]
        sum((o.double() * s).sum() for o, s in zip(outs, seeds)).backward()
        results.append(([o.detach() for o in outs], leaf.grad))
    (fast_out, fast_grad), (ref_out, ref_grad) = results
    return fast_out, ref_out, fast_grad, ref_grad


# --------------------------------------------------------------------------------------------------
# Mamba-2's SSD on the conv output views (the layout of layers/mamba2.py)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends(["torch", "triton"]))
@pytest.mark.parametrize("layout", ["mamba2_views", "sliced_heads"])
def test_ssd_on_layer_views(backend, layout):
    g = torch.Generator().manual_seed(1)
    batch, L, H, P, G, N, chunk = 2, 21, 4, 3, 2, 5, 8
    conv_dim = H * P + 2 * G * N
    value = torch.randn(batch, conv_dim + H * P + H, L, generator=g)   # [xBC | z | dt] channels first
    A, D = -torch.rand(H, generator=g) - 0.5, torch.rand(H, generator=g)
    dt_bias = torch.rand(H, generator=g) - 1.0

    def views(leaf):
        if layout == "mamba2_views":                      # split from (batch, channels, L), then transposed
            xBC, z, dt = leaf.transpose(1, 2).split([conv_dim, H * P, H], dim=-1)
            xs, B, C = xBC.split([H * P, G * N, G * N], dim=-1)
            x = xs.reshape(batch, L, H, P)
        else:                                             # every other head of a wider tensor
            xBC, z, dt = leaf.transpose(1, 2).split([conv_dim, H * P, H], dim=-1)
            wide = torch.cat([xBC[..., :H * P], xBC[..., :H * P]], -1).view(batch, L, 2 * H, P)
            x = wide[:, :, ::2]
            B, C = xBC[..., H * P:].split([G * N, G * N], dim=-1)
        return (x, dt, A.to(leaf), B.reshape(batch, L, G, N), C.reshape(batch, L, G, N),
                z.reshape(batch, L, H, P))

    def op(x, dt, A, B, C, z, backend):
        return ssd(x, dt, A, B, C, chunk, D=D.to(x), z=z, dt_bias=dt_bias.to(x), dt_softplus=True,
                   return_final_states=True, backend=backend)

    check(*run_twice(views, op, backend, "reference", torch.float32, value), tol=1e-4)


# --------------------------------------------------------------------------------------------------
# Mamba's selective scan on x_proj / in_proj views (the layout of layers/mamba.py)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends(["torch", "cpp", "triton"]))
@pytest.mark.parametrize("layout", ["channel_first_views", "expanded_bc"])
def test_selective_scan_on_layer_views(backend, layout):
    g = torch.Generator().manual_seed(2)
    batch, dim, N, L = 2, 6, 4, 19
    value = torch.randn(batch, L, 3 * dim + 2 * N, generator=g)    # channel-last [u | delta | z | B | C]
    A = -torch.rand(dim, N, generator=g) - 0.2
    Dskip, bias = torch.randn(dim, generator=g), torch.rand(dim, generator=g) - 0.5
    h0 = torch.randn(batch, dim, N, generator=g)

    def views(leaf):
        u, delta, z, B, C = leaf.transpose(1, 2).split([dim, dim, dim, N, N], dim=1)   # (batch, ., L) views
        if layout == "expanded_bc":                       # one B/C for every batch row: stride 0 over batch
            B, C = B[:1].expand(batch, N, L), C[:1].expand(batch, N, L)
        return u, delta, B, C, z

    def op(u, delta, B, C, z, backend):
        return selective_scan(u, delta, A.to(u), B, C, D=Dskip.to(u), z=z, delta_bias=bias.to(u),
                              delta_softplus=True, return_last_state=True, initial_state=h0.to(u),
                              backend=backend)

    check(*run_twice(views, op, backend, "reference", torch.float32, value), tol=1e-4)


# --------------------------------------------------------------------------------------------------
# Causal conv1d on the in_proj split (Mamba, Mamba2)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends(["triton"]))
def test_causal_conv1d_on_layer_views(backend):
    g = torch.Generator().manual_seed(3)
    batch, dim, L, width = 2, 5, 17, 4
    value = torch.randn(batch, L, 2 * dim + 3, generator=g)
    weight, bias = torch.randn(dim, 1, width, generator=g), torch.randn(dim, generator=g)
    state = torch.randn(batch, dim, width - 1, generator=g)

    def views(leaf):
        return (leaf[..., 3:3 + dim].transpose(1, 2),)    # a channel slice of (batch, L, C), channels first

    def op(x, backend):
        return causal_conv1d(x, weight.to(x), bias.to(x), state.to(x), activation="silu",
                             return_final_state=True, backend=backend)

    check(*run_twice(views, op, backend, "torch", torch.float32, value), tol=1e-4)
