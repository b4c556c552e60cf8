"""Fast ops on the tensor layouts the layers pass them: transposed, sliced and stride-0 (expanded) views.

Each fast path is compared with the float64 reference on outputs, final states and every gradient. Inputs are
built the way the layers build them (e.g. Mamba-2 splits x, B, C from the (batch, channels, L) conv output,
transposes and reshapes them, so they arrive channel-first strided), and the gradients must come back with
the input's shape whatever layout the kernel writes.

Triton runs compiled on CUDA tensors when a GPU exists, else on the CPU under its interpreter
(TRITON_INTERPRET=1, set before triton is first imported, as tests/ops/test_triton_kernels.py does).
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ssmkit.ops.ssd import ssd, ssd_ref  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def rel_err(actual, expected) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _mamba2_style_views(batch, L, heads, P, G, N, device):
    """x (batch, L, heads, P), B and C (batch, L, G, N) as non-contiguous views of one channel-first
    (batch, channels, L) leaf, exactly as layers/mamba2.py splits its conv output."""
    xbc = torch.randn(batch, heads * P + 2 * G * N, L, device=device, requires_grad=True)
    x, B, C = torch.split(xbc, [heads * P, G * N, G * N], dim=1)
    x = x.transpose(1, 2).reshape(batch, L, heads, P)
    B = B.transpose(1, 2).reshape(batch, L, G, N)
    C = C.transpose(1, 2).reshape(batch, L, G, N)
    assert not (x.is_contiguous() or B.is_contiguous() or C.is_contiguous())
    return xbc, x, B, C


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ssd_on_mamba2_channel_first_views(backend):
    """Regression: the triton backward allocated dx with empty_like(x), which kept the view's strides while
    the kernel writes dx at contiguous offsets, so dx came back scrambled (~95% relative error)."""
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton package is not installed")
    batch, L, heads, P, G, N, Q = 2, 11, 4, 3, 2, 5, 4
    xbc, x, B, C = _mamba2_style_views(batch, L, heads, P, G, N, DEVICE)
    dt = torch.randn(batch, L, heads, device=DEVICE, requires_grad=True)
    A = (-torch.rand(heads, device=DEVICE) - 0.1).requires_grad_()
    D = torch.randn(heads, device=DEVICE, requires_grad=True)
    z = torch.randn(batch, L, heads, P, device=DEVICE, requires_grad=True)
    leaves = [xbc, dt, A, D, z]
    y, final = ssd(x, dt, A, B, C, Q, D=D, z=z, dt_softplus=True, return_final_states=True, backend=backend)
    seeds = [torch.randn_like(y), torch.randn_like(final)]
    g_fast = torch.autograd.grad((y * seeds[0]).sum() + (final * seeds[1]).sum(), leaves)

    ref = [t.detach().double().requires_grad_() for t in leaves]
    x_r, B_r, C_r = torch.split(ref[0], [heads * P, G * N, G * N], dim=1)
    x_r = x_r.transpose(1, 2).reshape(batch, L, heads, P)
    B_r = B_r.transpose(1, 2).reshape(batch, L, G, N)
    C_r = C_r.transpose(1, 2).reshape(batch, L, G, N)
    y_r, final_r = ssd_ref(x_r, ref[1], ref[2], B_r, C_r, Q, D=ref[3], z=ref[4], dt_softplus=True,
                           return_final_states=True)
    g_ref = torch.autograd.grad((y_r * seeds[0].double()).sum() + (final_r * seeds[1].double()).sum(), ref)
    errors = {"y": rel_err(y, y_r), "final": rel_err(final, final_r)}
    errors.update({f"d{n}": rel_err(a, e) for n, a, e in zip(["xBC", "dt", "A", "D", "z"], g_fast, g_ref)})
    bad = {k: v for k, v in errors.items() if not v <= 1e-4}
    assert not bad, f"relative errors above 1e-4: {bad} (all: {errors})"


# --------------------------------------------------------------------------------------------------
# A general check: leaves -> views (a function) -> op; fast backend against the float64 reference
# --------------------------------------------------------------------------------------------------
def _check_views(leaves, make_views, fast, reference, tol=1e-4):
    """``make_views(**leaves) -> kwargs`` builds the (non-contiguous) arguments from the leaves; ``fast`` and
    ``reference`` map kwargs to a tuple of outputs. Compares outputs and the gradients of every leaf."""
    leaves = {k: v.to(DEVICE).requires_grad_() for k, v in leaves.items()}
    outs = fast(**make_views(**leaves))
    seeds = [torch.randn_like(o) for o in outs]
    g_fast = torch.autograd.grad(sum((o * s).sum() for o, s in zip(outs, seeds)), list(leaves.values()))
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    outs_ref = reference(**make_views(**ref_leaves))
    g_ref = torch.autograd.grad(sum((o * s.double()).sum() for o, s in zip(outs_ref, seeds)),
                                list(ref_leaves.values()))
    errors = {f"out{i}": rel_err(a, e) for i, (a, e) in enumerate(zip(outs, outs_ref))}
    for name, a, e in zip(leaves, g_fast, g_ref):
        assert a.shape == leaves[name].shape, f"d{name}: shape {tuple(a.shape)} != {tuple(leaves[name].shape)}"
        errors[f"d{name}"] = rel_err(a, e)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


@pytest.fixture
def cpp_if_required():
    """The C++ backend: skipped when its extension cannot be built, but a failure under SSMKIT_REQUIRE_CPP=1."""
    from ssmkit.ops.selective_scan import cpp as cpp_backend
    if not cpp_backend.is_available():
        reason = f"C++ selective scan extension unavailable: {cpp_backend.build_error()}"
        if os.environ.get("SSMKIT_REQUIRE_CPP") == "1":
            pytest.fail(reason + " (SSMKIT_REQUIRE_CPP=1)")
        pytest.skip(reason)


SCAN_BACKENDS = ["torch", "cpp", "triton"]


def _scan_backend(backend, request):
    if backend == "cpp":
        if DEVICE != "cpu":
            pytest.skip("the C++ backend runs on CPU tensors; this run puts tensors on CUDA")
        request.getfixturevalue("cpp_if_required")
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton package is not installed")


@pytest.mark.parametrize("bc", ["mamba1_slices", "expanded_over_batch", "grouped_transposed"])
@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_selective_scan_on_views(backend, bc, request):
    """u, delta, z transposed from (batch, L, dim); B, C as Mamba-1 makes them (slices of x_proj's output,
    rearranged to (batch, N, L)), expanded over batch (stride 0), or grouped 4-D transposed views."""
    from ssmkit.ops.selective_scan import selective_scan, selective_scan_ref
    _scan_backend(backend, request)
    batch, dim, L, N, G = 2, 4, 9, 3, 2
    leaves = dict(u=torch.randn(batch, L, dim), delta=torch.randn(batch, L, dim) * 0.5,
                  A=-torch.rand(N, dim) - 0.1, D=torch.randn(2, dim), z=torch.randn(batch, L, dim),
                  bias=torch.randn(dim) * 0.2, h0=torch.randn(batch, N, dim))
    if bc == "mamba1_slices":
        leaves["x_dbl"] = torch.randn(batch * L, 1 + 2 * N)
    elif bc == "expanded_over_batch":
        leaves["B"], leaves["C"] = torch.randn(1, N, L), torch.randn(1, N, L)
    else:
        leaves["B"], leaves["C"] = torch.randn(batch, L, N, G), torch.randn(batch, L, N, G)

    def views(u, delta, A, D, z, bias, h0, **bc_leaves):
        if bc == "mamba1_slices":
            x_dbl = bc_leaves["x_dbl"]
            B = x_dbl[:, 1:1 + N].reshape(batch, L, N).transpose(1, 2)
            C = x_dbl[:, 1 + N:].reshape(batch, L, N).transpose(1, 2)
        elif bc == "expanded_over_batch":
            B, C = bc_leaves["B"].expand(batch, N, L), bc_leaves["C"].expand(batch, N, L)
        else:
            B, C = bc_leaves["B"].permute(0, 3, 2, 1), bc_leaves["C"].permute(0, 3, 2, 1)
        return dict(u=u.transpose(1, 2), delta=delta.transpose(1, 2), A=A.t(), B=B, C=C, D=D[1],
                    z=z.transpose(1, 2), delta_bias=bias, initial_state=h0.transpose(1, 2),
                    delta_softplus=True, return_last_state=True)

    _check_views(leaves, views, lambda **kw: selective_scan(**kw, backend=backend),
                 lambda **kw: selective_scan_ref(**kw))
