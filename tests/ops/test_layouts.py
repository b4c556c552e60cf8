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
