"""Each layer with fast paths, run with each backend, against the same layer on its float64 reference path.

The layer makes its own views (Mamba2 splits x, B, C from the channel-first conv output; Mamba slices B, C
out of x_proj), so a kernel that mishandles a view shows up here even when its op-level tests, fed
contiguous tensors, pass: the Triton SSD once gave Mamba2 dx and in_proj gradients 85% off this way. Outputs,
the final state and the gradient of every parameter and of the input are compared, relative to their norm.
"""

import copy
import os

import pytest
import torch

from ssmkit.layers import build_mixer
from ssmkit.ops.mamba import cpp as scan_cpp
from ssmkit.ops._triton import triton_available

ON_GPU = torch.cuda.is_available()
REQUIRE_CPP = os.environ.get("SSMKIT_REQUIRE_CPP") == "1"

LAYERS = {
    "mamba": dict(d_model=12, d_state=5, d_conv=4, expand=2),
    "mamba2": dict(d_model=12, d_state=6, d_conv=3, expand=2, headdim=4, ngroups=2, chunk_size=8),
    "s5": dict(d_model=12, d_state=8),
    "hawk": dict(d_model=12, lru_width=15, n_heads=3),
    "rwkv7": dict(d_model=12, head_size=4, decay_low_rank_dim=5, a_low_rank_dim=3, gate_low_rank_dim=6,
                  zero_init_output=False, chunk_size=5),
    "mamba3": dict(d_model=12, d_state=8, headdim=4, ngroups=3, is_mimo=True, mimo_rank=2, chunk_size=5),
}
# backend -> the dtypes it runs (the Triton kernels take no float64)
BACKENDS = {"mamba": {"cpp": (torch.float64, torch.float32), "torch": (torch.float64, torch.float32),
                      "triton": (torch.float32,)},
            "mamba2": {"torch": (torch.float64, torch.float32), "triton": (torch.float32,)},
            "s5": {"associative": (torch.float64,), "chunked": (torch.float64,)},
            "hawk": {"associative": (torch.float64, torch.float32), "chunked": (torch.float64, torch.float32)},
            "rwkv7": {"chunked": (torch.float64, torch.float32)},
            "mamba3": {"chunked": (torch.float64, torch.float32)}}
REFERENCE = {"mamba": "reference", "mamba2": "reference", "s5": "reference", "hawk": "reference",
             "rwkv7": "reference", "mamba3": "reference"}
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


def _cases():
    for name, backends in BACKENDS.items():
        for backend, dtypes in backends.items():
            for dtype in dtypes:
                marks = []
                if backend == "triton":
                    marks.append(pytest.mark.skipif(not triton_available(), reason="triton is not installed"))
                    if not ON_GPU:
                        marks.append(pytest.mark.slow)  # Triton's CPU interpreter runs the kernels in Python
                if backend == "cpp":
                    marks.append(pytest.mark.skipif(ON_GPU or (not REQUIRE_CPP and not scan_cpp.is_available()),
                                                    reason="the C++ scan could not be built here"))
                yield pytest.param(name, backend, dtype, id=f"{name}-{backend}-{str(dtype)[6:]}", marks=marks)


def real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def numeric(t):
    """Entries that carry values and gradients (not integer positions)."""
    return t.is_floating_point() or t.is_complex()


def run(layer, x, state, seed_y, seed_state):
    """Outputs, final state, and the gradients of every parameter and of x (and of the initial state)."""
    x = x.clone().requires_grad_()
    state = {k: v.clone().requires_grad_(numeric(v)) for k, v in state.items()}
    y, final = layer(x, state, return_state=True)
    final = {k: real(v) for k, v in final.items() if numeric(v)}
    loss = (y.double() * seed_y).sum() + sum((final[k].double() * seed_state[k]).sum() for k in sorted(final))
    loss.backward()
    grads = {f"d{n}": p.grad for n, p in layer.named_parameters()}
    grads["dx"] = x.grad
    grads.update({f"d{k}": real(v.grad) for k, v in state.items() if numeric(v)})
    return {"y": y, **{f"final {k}": v for k, v in final.items()}, **grads}


@pytest.mark.parametrize("name, backend, dtype", list(_cases()))
def test_layer_gradients_match_the_float64_reference(name, backend, dtype):
    torch.manual_seed(0)
    ref = build_mixer(name, **LAYERS[name]).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.backend = REFERENCE[name]
    device = "cuda" if (backend == "triton" and ON_GPU) else "cpu"
    fast = copy.deepcopy(ref).to(device, dtype)
    fast.backend = backend

    batch, length = 2, 23
    x = torch.randn(batch, length, LAYERS[name]["d_model"], dtype=torch.float64)
    with torch.no_grad():
        state = {k: v.detach() for k, v in ref(torch.randn_like(x[:, :5]), return_state=True)[1].items()}
    seed_y = torch.randn(batch, length, LAYERS[name]["d_model"], dtype=torch.float64)
    seed_state = {k: torch.randn_like(real(v)) for k, v in state.items() if numeric(v)}

    expected = run(ref, x, state, seed_y, seed_state)
    actual = run(fast, x.to(device, dtype), {k: v.to(device) if not v.is_floating_point() else v.to(device, dtype)
                                             for k, v in state.items()},
                 seed_y.to(device), {k: v.to(device) for k, v in seed_state.items()})
    assert fast.last_backend == backend, f"asked for {backend!r}, {fast.last_backend!r} ran"
    errors = {}
    for key, want in expected.items():
        got = actual[key]
        assert got is not None, f"{name}/{backend}: no gradient {key}"
        errors[key] = ((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30)).item()
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"{name} with backend {backend!r} ({dtype}) vs float64 reference: {bad}"
