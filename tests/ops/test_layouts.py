"""Fast ops on the tensor layouts the layers pass them: transposed, sliced and stride-0 (expanded) views.

Each fast path is compared with the float64 reference on outputs, final states and every gradient. Inputs are
built the way the layers build them (e.g. Mamba-2 splits x, B, C from the (batch, channels, L) conv output,
transposes and reshapes them, so they arrive channel-first strided), and the gradients must come back with
the input's shape whatever layout the kernel writes.

Triton runs compiled on CUDA tensors when a GPU exists, else on the CPU under its interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py before triton is first imported).
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()

from ssmkit.ops.mamba2 import ssd, ssd_ref  # noqa: E402

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
    from ssmkit.ops.mamba import cpp as cpp_backend
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
    from ssmkit.ops.mamba import selective_scan, selective_scan_ref
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


def _triton_or_torch(backend):
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton package is not installed")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_causal_conv1d_on_views(backend):
    """x as the transposed view of a (batch, L, channels) projection slice (what Mamba's in_proj split gives),
    the weight a slice of a wider (dim, 2 * width) tensor, the initial state a transposed view."""
    from ssmkit.ops.conv1d import causal_conv1d, causal_conv1d_ref
    _triton_or_torch(backend)
    batch, L, dim, width = 2, 13, 5, 4
    leaves = dict(xz=torch.randn(batch, L, 2 * dim), w=torch.randn(dim, 2 * width), bias=torch.randn(dim),
                  h0=torch.randn(batch, width - 1, dim))

    def views(xz, w, bias, h0):
        return dict(x=xz[..., :dim].transpose(1, 2), weight=w[:, ::2], bias=bias,
                    initial_state=h0.transpose(1, 2), activation="silu", return_final_state=True)

    _check_views(leaves, views, lambda **kw: causal_conv1d(**kw, backend=backend),
                 lambda **kw: causal_conv1d_ref(**kw))


def _check_step(fast, reference, args, tol=1e-4):
    """One decoding step, inference only: outputs (y, new state) against float64 on the same views."""
    with torch.no_grad():
        outs = fast(*args)
        outs_ref = reference(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])
    errors = {f"out{i}": rel_err(a, e) for i, (a, e) in enumerate(zip(outs, outs_ref))}
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_causal_conv1d_update_on_views(backend):
    """x a slice of a (batch, 2 * dim) projection; the conv state a transposed (batch, dim, width-1) view."""
    from ssmkit.ops.conv1d import causal_conv1d_update
    _triton_or_torch(backend)
    batch, dim, width = 3, 6, 4
    x = torch.randn(batch, 2 * dim, device=DEVICE)[:, dim:]
    state = torch.randn(batch, width - 1, dim, device=DEVICE).transpose(1, 2)
    w = torch.randn(width, dim, device=DEVICE).t()
    bias = torch.randn(dim, device=DEVICE)
    if backend == "triton":
        from ssmkit.ops.conv1d import causal_conv1d_update_triton
        fast = causal_conv1d_update_triton
    else:
        fast = causal_conv1d_update
    _check_step(lambda *a: fast(*a, activation="silu"), lambda *a: causal_conv1d_update(*a, activation="silu"),
                (x, state, w, bias))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_selective_state_update_on_views(backend):
    """B and C expanded over batch (stride 0, as mamba_ssm's decoding step may pass them), x and z slices of
    one projection, the state a transposed view."""
    from ssmkit.ops.mamba import selective_state_update, selective_state_update_ref
    _triton_or_torch(backend)
    batch, dim, N, G = 3, 4, 5, 2
    state = torch.randn(batch, N, dim, device=DEVICE).transpose(1, 2)
    xz = torch.randn(batch, 2 * dim, device=DEVICE)
    x, z = xz[:, :dim], xz[:, dim:]
    dt = torch.randn(dim, batch, device=DEVICE).t()
    A = -torch.rand(dim, N, device=DEVICE) - 0.1
    B = torch.randn(1, G, N, device=DEVICE).expand(batch, G, N)
    C = torch.randn(G, 1, N, device=DEVICE).transpose(0, 1).expand(batch, G, N)
    D, bias = torch.randn(dim, device=DEVICE), torch.randn(dim, device=DEVICE)
    _check_step(lambda *a: selective_state_update(*a, dt_softplus=True, backend=backend),
                lambda *a: selective_state_update_ref(*a, dt_softplus=True),
                (state, x, dt, A, B, C, D, z, bias))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ssd_state_update_on_views(backend):
    """x, B, C split from one channel-first (batch, channels) conv output row, B/C expanded over batch,
    the state a permuted view, A and dt expanded over heads as mamba_ssm's step does."""
    from ssmkit.ops.mamba2 import ssd_state_update, ssd_state_update_ref
    _triton_or_torch(backend)
    batch, heads, P, G, N = 2, 4, 3, 2, 5
    xbc = torch.randn(batch, heads * P + 2 * G * N, device=DEVICE)
    x = xbc[:, :heads * P].view(batch, heads, P)
    B = xbc[:1, heads * P:heads * P + G * N].view(1, G, N).expand(batch, G, N)
    C = xbc[:, heads * P + G * N:].view(batch, G, N)
    state = torch.randn(batch, N, heads, P, device=DEVICE).permute(0, 2, 3, 1)
    dt = torch.randn(batch, 1, device=DEVICE).expand(batch, heads)
    A = torch.full((1,), -0.7, device=DEVICE).expand(heads)
    D, z = torch.randn(heads, device=DEVICE), torch.randn(batch, heads, 2 * P, device=DEVICE)[..., ::2]
    _check_step(lambda *a: ssd_state_update(*a, dt_softplus=True, backend=backend),
                lambda *a: ssd_state_update_ref(*a, dt_softplus=True),
                (state, x, dt, A, B, C, D, z))


def test_linear_attention_chunked_on_views():
    """q, k, v split from one (batch, L, 3 * heads * d) projection and moved to (batch, heads, L, d) by
    views, as an attention layer does; k's features positive (phi(k) of a feature map)."""
    from ssmkit.ops.linear_attention import linear_attention_chunked, linear_attention_ref
    batch, L, heads, dk = 2, 11, 2, 3
    leaves = dict(qkv=torch.randn(batch, L, 3 * heads * dk))

    def views(qkv):
        q, k, v = (t.reshape(batch, L, heads, dk).transpose(1, 2) for t in qkv.split(heads * dk, dim=-1))
        return dict(q=torch.nn.functional.elu(q) + 1, k=torch.nn.functional.elu(k) + 1, v=v,
                    return_final_state=True)

    def flat(out):
        y, state = out
        return (y, *state)

    _check_views(leaves, views, lambda **kw: flat(linear_attention_chunked(**kw, chunk_size=4)),
                 lambda **kw: flat(linear_attention_ref(**kw)))


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_selective_scan_on_the_views_the_mamba_layer_passes(backend, request, monkeypatch):
    """The scan's arguments captured from a Mamba layer's own forward (u and z slices of one in_proj output,
    B and C slices of x_proj's), rebuilt with the same sizes and strides as leaves, then compared with the
    float64 reference on outputs, final state and every gradient."""
    import ssmkit
    from ssmkit.layers import mamba as mamba_module
    from ssmkit.ops.mamba import selective_scan, selective_scan_ref
    _scan_backend(backend, request)
    captured = {}

    def spy(*args, **kwargs):
        captured.update(zip(["u", "delta", "A", "B", "C"], args), **kwargs)
        return selective_scan(*args, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", spy)
    layer = ssmkit.build_mixer("mamba", 12, d_state=5, expand=1.5, backend="torch").to(DEVICE)
    with torch.no_grad():
        layer(torch.randn(2, 70, 12, device=DEVICE))
    tensors = {k: v for k, v in captured.items() if torch.is_tensor(v)}
    # the layer's own values (A negative, Delta a softplus away) in fresh leaves of the same strides
    leaves = {k: torch.empty_strided(v.shape, v.stride(), device=DEVICE).copy_(v) for k, v in tensors.items()}
    options = {k: v for k, v in captured.items() if not torch.is_tensor(v) and k != "return_last_state"}

    def views(**kw):  # the leaves keep the captured strides; the scan receives them as they are
        return dict(kw, **options, return_last_state=True)

    _check_views(leaves, views, lambda **kw: selective_scan(**{**kw, "backend": backend}),
                 lambda **kw: selective_scan_ref(**{k: v for k, v in kw.items() if k != "backend"}))


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_wkv7_on_time_mix_views(backend):
    """RWKV-7's time mix passes r, k, v as (B, L, H, N) views of (B, L, C) projections, a = -kappa_hat and
    b = kappa_hat * alpha computed from them, and the state may be a stride-0 broadcast of one row; here the
    projections are also transposed views of a channel-first leaf. Same results as contiguous copies."""
    from ssmkit.ops.rwkv7 import wkv7

    batch, L, heads, N = 2, 21, 2, 3
    leaf = torch.randn(batch, 4 * heads * N, L, dtype=torch.float64, requires_grad=True)
    state_row = torch.randn(1, heads, N, N, dtype=torch.float64, requires_grad=True)

    def inputs(source, state):
        r, k, v, w = (t.transpose(1, 2).reshape(batch, L, heads, N) for t in source.split(heads * N, dim=1))
        kappa_hat = torch.nn.functional.normalize(k, dim=-1)
        return (r, -torch.exp(-1.0 - torch.nn.functional.softplus(w)), k, v, -kappa_hat, kappa_hat * 0.7), state

    views, state = inputs(leaf, state_row.expand(batch, heads, N, N))
    assert not views[0].is_contiguous() and state.stride(0) == 0
    y, final = wkv7(*views, initial_state=state, return_final_state=True, chunk_size=8, backend=backend)
    seeds = [torch.randn_like(y), torch.randn_like(final)]
    grads = torch.autograd.grad((y * seeds[0]).sum() + (final * seeds[1]).sum(), [leaf, state_row])

    leaf_c, row_c = leaf.detach().clone().requires_grad_(), state_row.detach().clone().requires_grad_()
    copies, state_c = inputs(leaf_c, row_c.expand(batch, heads, N, N))
    y_c, final_c = wkv7(*(t.contiguous() for t in copies), initial_state=state_c.contiguous(),
                        return_final_state=True, backend="reference")
    grads_c = torch.autograd.grad((y_c * seeds[0]).sum() + (final_c * seeds[1]).sum(), [leaf_c, row_c])
    for got, want in zip((y, final) + grads, (y_c, final_c) + grads_c):
        assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_mamba3_ssm_on_block_views(backend):
    """The Mamba-3 block passes x (SISO: one rank) as an unsqueezed view of a slice of the in_proj output, Delta
    and the trapezoid weight as slices of it, and the rotation rates expanded over the heads (stride 0). Same
    results (outputs, final state, gradients) as on contiguous copies."""
    from ssmkit.ops.mamba3 import mamba3_ssm

    batch, L, H, P, N, S = 2, 11, 3, 2, 4, 1
    proj = torch.randn(batch, L, H * P + 3 * H + S, dtype=torch.float64, requires_grad=True)
    qk = torch.randn(2, batch, L, 1, H, N, dtype=torch.float64, requires_grad=True)

    def inputs(proj, qk):
        x, dd_dt, dd_a, trap, angles = torch.split(proj, [H * P, H, H, H, S], dim=-1)
        dt = torch.nn.functional.softplus(dd_dt)
        rates = torch.tanh(angles).unsqueeze(2).expand(batch, L, H, S)
        return (qk[0], qk[1], x.unflatten(-1, (H, P)).unsqueeze(2), -dt * torch.sigmoid(dd_a), dt,
                torch.sigmoid(trap), rates)

    views = inputs(proj, qk)
    assert not views[2].is_contiguous() and views[6].stride(3 - 1) == 0
    y, final = mamba3_ssm(*views, None, None, True, "adjacent", chunk_size=4, backend=backend)
    seeds = [torch.randn_like(y)] + [torch.randn_like(f) for f in final]
    loss = (y * seeds[0]).sum() + sum((f * s).sum() for f, s in zip(final, seeds[1:]))
    grads = torch.autograd.grad(loss, [proj, qk])

    proj_c, qk_c = proj.detach().clone().requires_grad_(), qk.detach().clone().requires_grad_()
    copies = [t.contiguous() for t in inputs(proj_c, qk_c)]
    y_c, final_c = mamba3_ssm(*copies, None, None, True, "adjacent", backend="reference")
    loss_c = (y_c * seeds[0]).sum() + sum((f * s).sum() for f, s in zip(final_c, seeds[1:]))
    grads_c = torch.autograd.grad(loss_c, [proj_c, qk_c])
    for got, want in zip((y, *final, *grads), (y_c, *final_c, *grads_c)):
        assert rel_err(got, want) < 1e-12
