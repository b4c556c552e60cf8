"""Property tests: random shapes and flags per op, every fast path held to its naive reference.

Hypothesis draws the sizes (awkward ones included: length 1, one channel, chunk sizes that do not divide
the length) and the optional arguments of each op, builds random inputs from a drawn seed, and compares:

* selective scan: the "cpp" and "torch" backends (float64, outputs, final states and every gradient) and
  "triton" under the interpreter (float32, tiny sizes) against ``selective_scan_ref``;
* SSD: "torch" (float64, with gradients) and "triton" (float32, tiny) against ``ssd_ref``, packed sequences
  (``seq_idx``) included;
* causal conv1d: "torch" (with gradients) and "triton" against ``causal_conv1d_ref``;
* the LTI kernels: ``kernel_vandermonde`` (S4D) and ``kernel_dplr`` (S4, Algorithm 1) against
  ``kernel_ref``, the repeated multiplication;
* linear attention: the chunked form against the sequential loop;
* every registered mixer (``sorted(ssmkit.layers.MIXERS)``, built from its ``contract_config``, with each of
  its ``contract_backends``): the parallel ``forward`` against ``step`` token by token.

Two profiles, chosen by the environment variable ``SSMKIT_FUZZ``:

* ``ci`` (default): a few derandomized examples per op, so the file runs in well under a minute;
* ``nightly``: at least 1,000 random examples per op (``SSMKIT_FUZZ=nightly pytest tests/test_fuzz.py``).

A counterexample that hypothesis finds becomes a fixed regression test at the bottom of this file.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssmkit.layers import MIXERS, build_mixer
from ssmkit.ops import causal_conv1d, causal_conv1d_ref, kernel_dplr, kernel_ref, kernel_vandermonde
from ssmkit.ops import selective_scan, selective_scan_ref, ssd, ssd_ref
from ssmkit.ops.dplr import discretize_dplr
from ssmkit.ops.linear_attention import linear_attention_chunked, linear_attention_ref
from ssmkit.ops.mamba import cpp as scan_cpp
from ssmkit.ops._triton import triton_available

from .helpers import assert_close_scaled

PROFILE = os.environ.get("SSMKIT_FUZZ", "ci")
if PROFILE not in ("ci", "nightly"):
    raise ValueError(f"SSMKIT_FUZZ must be 'ci' or 'nightly'; got {PROFILE!r}")

_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
#: examples per op in each profile (the interpreted Triton ops get fewer in CI: each takes seconds)
EXAMPLES = {"ci": {"fast": 12, "triton": 2, "mixer": 4, "cuda": 25},
            "nightly": {"fast": 1000, "triton": 1000, "mixer": 1000, "cuda": 1000}}
FUZZ = settings(max_examples=EXAMPLES[PROFILE]["fast"], derandomize=PROFILE == "ci", **_COMMON)
FUZZ_TRITON = settings(max_examples=EXAMPLES[PROFILE]["triton"], derandomize=PROFILE == "ci", **_COMMON)
FUZZ_MIXER = settings(max_examples=EXAMPLES[PROFILE]["mixer"], derandomize=PROFILE == "ci", **_COMMON)

needs_cpp = pytest.mark.skipif(not scan_cpp.is_available() and os.environ.get("SSMKIT_REQUIRE_CPP") != "1",
                               reason="the C++ scan could not be built here")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
# These draw CPU tensors and run Triton under the interpreter; on a CUDA machine the "cuda" rows at the end of
# this file draw GPU tensors for the compiled kernels instead.
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(),
                                      reason="fuzzes the Triton kernels under the CPU interpreter only")
seeds = st.integers(0, 2**31 - 1)


def _grads(outputs, leaves, seed):
    """Gradients of a random linear functional of ``outputs`` w.r.t. each leaf (None where unused)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
               for o in outputs)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present, allow_unused=True))
    return [next(grads) if t is not None else None for t in leaves]


def _assert_all_close(got, want, tol, what):
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None and b is None:
            continue
        assert a is not None and b is not None, f"{what}[{i}]: one side has no value"
        assert_close_scaled(a, b, tol, f"{what}[{i}]")


# ------------------------------------------------------------------------------------------------------
# Selective scan
# ------------------------------------------------------------------------------------------------------
@st.composite
def scan_cases(draw, max_dim=6, max_length=40):
    dim = draw(st.integers(1, max_dim))
    groups = draw(st.sampled_from([None] + [g for g in range(1, dim + 1) if dim % g == 0]))
    return dict(batch=draw(st.integers(1, 3)), dim=dim, length=draw(st.integers(1, max_length)),
                d_state=draw(st.integers(1, 5)), groups=groups, D=draw(st.booleans()), z=draw(st.booleans()),
                delta_bias=draw(st.booleans()), initial_state=draw(st.booleans()),
                softplus=draw(st.booleans()), seed=draw(seeds))


def _scan_inputs(case, dtype):
    g = torch.Generator().manual_seed(case["seed"])
    b, d, L, n = case["batch"], case["dim"], case["length"], case["d_state"]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    bc = (b, n, L) if case["groups"] is None else (b, case["groups"], n, L)
    return dict(
        u=randn(b, d, L), delta=randn(b, d, L, scale=0.5) if case["softplus"] else
        (torch.rand(b, d, L, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(),
        A=(-torch.rand(d, n, generator=g, dtype=torch.float64) * 3 - 0.1).to(dtype).requires_grad_(),
        B=randn(*bc), C=randn(*bc), D=randn(d) if case["D"] else None, z=randn(b, d, L) if case["z"] else None,
        # without softplus the step is delta + delta_bias as given: kept positive (a negative step grows the
        # state by exp(|A| |delta|) per token, past float32's range within a few hundred tokens)
        delta_bias=(randn(d, scale=0.3) if case["softplus"] else
                    (torch.rand(d, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_())
        if case["delta_bias"] else None,
        initial_state=randn(b, d, n) if case["initial_state"] else None)


def _run_scan(case, inputs, backend, grads=True):
    y, last = selective_scan(**inputs, delta_softplus=case["softplus"], return_last_state=True, backend=backend)
    leaves = list(inputs.values())
    return [y, last] + (_grads([y, last], leaves, case["seed"] + 1) if grads else [])


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
@FUZZ
@given(case=scan_cases())
def test_selective_scan_backends_match_reference(backend, case):
    inputs = _scan_inputs(case, torch.float64)
    want = _run_scan(case, inputs, "reference")
    got = _run_scan(case, inputs, backend)
    _assert_all_close(got, want, 1e-9, f"selective_scan[{backend}] {case}")


@needs_triton
@interpreter_only
@FUZZ_TRITON
@given(case=scan_cases(max_dim=4, max_length=16))
def test_selective_scan_triton_matches_reference(case):
    inputs = _scan_inputs(case, torch.float32)
    with torch.no_grad():
        want = _run_scan(case, inputs, "reference", grads=False)
        got = _run_scan(case, inputs, "triton", grads=False)
    _assert_all_close(got, want, 1e-4, f"selective_scan[triton] {case}")


# ------------------------------------------------------------------------------------------------------
# SSD (Mamba-2)
# ------------------------------------------------------------------------------------------------------
@st.composite
def ssd_cases(draw, max_length=40):
    heads = draw(st.integers(1, 4))
    length = draw(st.integers(1, max_length))
    packed = draw(st.booleans())
    cuts = sorted(draw(st.lists(st.integers(1, max(1, length - 1)), max_size=3))) if packed and length > 1 else []
    return dict(batch=draw(st.integers(1, 2)), length=length, heads=heads,
                groups=draw(st.sampled_from([g for g in range(1, heads + 1) if heads % g == 0])),
                headdim=draw(st.integers(1, 4)), N=draw(st.integers(1, 5)),
                chunk_size=draw(st.sampled_from([1, 2, 3, 4, 7, 8, 16, 64])),
                D=draw(st.sampled_from([None, "heads", "headdim"])), z=draw(st.booleans()),
                dt_bias=draw(st.booleans()), softplus=draw(st.booleans()), initial=draw(st.booleans()),
                cuts=cuts, seed=draw(seeds))


def _ssd_inputs(case, dtype):
    g = torch.Generator().manual_seed(case["seed"])
    b, L, h, p, gr, n = (case[k] for k in ("batch", "length", "heads", "headdim", "groups", "N"))

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    dt = randn(b, L, h, scale=0.5) if case["softplus"] else torch.rand(b, L, h, generator=g,
                                                                       dtype=torch.float64).to(dtype) * 0.5
    D = {None: None, "heads": randn(h), "headdim": randn(h, p)}[case["D"]]
    return dict(x=randn(b, L, h, p), dt=dt, A=(-torch.rand(h, generator=g, dtype=torch.float64) * 3 - 0.1).to(dtype),
                B=randn(b, L, gr, n), C=randn(b, L, gr, n), D=D, z=randn(b, L, h, p) if case["z"] else None,
                dt_bias=(randn(h, scale=0.5) if case["softplus"] else  # positive steps without softplus
                         torch.rand(h, generator=g, dtype=torch.float64).to(dtype) * 0.5) if case["dt_bias"] else None,
                initial_states=randn(b, h, p, n) if case["initial"] else None)


def _seq_idx(case):
    if not case["cuts"]:
        return None
    ids = torch.zeros(case["length"], dtype=torch.int32)
    for cut in case["cuts"]:
        ids[cut:] += 1
    return ids.expand(case["batch"], -1).contiguous()


def _run_ssd(case, inputs, backend, grads=True):
    leaves = {k: (v.clone().requires_grad_(grads) if v is not None else None) for k, v in inputs.items()}
    y, final = ssd(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], case["chunk_size"],
                   D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=case["softplus"],
                   initial_states=leaves["initial_states"], seq_idx=_seq_idx(case), return_final_states=True,
                   backend=backend)
    return [y, final] + (_grads([y, final], list(leaves.values()), case["seed"] + 1) if grads else [])


@FUZZ
@given(case=ssd_cases())
def test_ssd_torch_matches_reference(case):
    inputs = _ssd_inputs(case, torch.float64)
    _assert_all_close(_run_ssd(case, inputs, "torch"), _run_ssd(case, inputs, "reference"), 1e-9,
                      f"ssd[torch] {case}")


@needs_triton
@interpreter_only
@FUZZ_TRITON
@given(case=ssd_cases(max_length=16))
def test_ssd_triton_matches_reference(case):
    inputs = _ssd_inputs(case, torch.float32)
    with torch.no_grad():
        got = _run_ssd(case, inputs, "triton", grads=False)
        want = _run_ssd(case, inputs, "reference", grads=False)
    _assert_all_close(got, want, 1e-4, f"ssd[triton] {case}")


# ------------------------------------------------------------------------------------------------------
# Causal depthwise convolution
# ------------------------------------------------------------------------------------------------------
@st.composite
def conv_cases(draw, max_length=40):
    length = draw(st.integers(1, max_length))
    packed = draw(st.booleans()) and length > 1
    return dict(batch=draw(st.integers(1, 3)), dim=draw(st.integers(1, 6)), length=length,
                width=draw(st.integers(1, 5)), bias=draw(st.booleans()), initial=draw(st.booleans()),
                activation=draw(st.sampled_from([None, "silu"])), transposed=draw(st.booleans()),
                cuts=sorted(draw(st.lists(st.integers(1, length - 1), max_size=3))) if packed else [],
                seed=draw(seeds))


def _run_conv(case, fn, dtype, grads=True, **kw):
    g = torch.Generator().manual_seed(case["seed"])
    b, d, L, w = case["batch"], case["dim"], case["length"], case["width"]

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grads)

    # the layers pass a transposed view of a (batch, L, dim) tensor: the same values, another layout
    x = randn(b, L, d).transpose(1, 2) if case["transposed"] else randn(b, d, L)
    weight, bias = randn(d, w), randn(d) if case["bias"] else None
    initial = randn(b, d, w - 1) if case["initial"] and w > 1 else None
    y, final = fn(x, weight, bias, initial_state=initial, seq_idx=_seq_idx(case), activation=case["activation"],
                  return_final_state=True, **kw)
    return [y, final] + (_grads([y, final], [x, weight, bias, initial], case["seed"] + 1) if grads else [])


@FUZZ
@given(case=conv_cases())
def test_causal_conv1d_torch_matches_reference(case):
    _assert_all_close(_run_conv(case, causal_conv1d, torch.float64, backend="torch"),
                      _run_conv(case, causal_conv1d_ref, torch.float64), 1e-10, f"conv1d[torch] {case}")


@needs_triton
@interpreter_only
@FUZZ_TRITON
@given(case=conv_cases(max_length=16))
def test_causal_conv1d_triton_matches_reference(case):
    with torch.no_grad():
        got = _run_conv(case, causal_conv1d, torch.float32, grads=False, backend="triton")
        want = _run_conv(case, causal_conv1d_ref, torch.float32, grads=False)
    _assert_all_close(got, want, 1e-5, f"conv1d[triton] {case}")


# ------------------------------------------------------------------------------------------------------
# LTI kernels (S4D Vandermonde, S4 DPLR) against repeated multiplication
# ------------------------------------------------------------------------------------------------------
def _complex(g, *shape):
    return torch.complex(torch.randn(*shape, generator=g, dtype=torch.float64),
                         torch.randn(*shape, generator=g, dtype=torch.float64))


@FUZZ
@given(H=st.integers(1, 4), N2=st.integers(1, 6), L=st.integers(1, 70), block=st.sampled_from([None, 1, 3, 8, 100]),
       outputs=st.sampled_from([(), (2,)]), seed=seeds)
def test_kernel_vandermonde_matches_naive(H, N2, L, block, outputs, seed):
    g = torch.Generator().manual_seed(seed)
    dt = 10 ** (torch.rand(H, 1, generator=g, dtype=torch.float64) * 3 - 3)       # log-uniform in [1e-3, 1]
    A = torch.complex(-torch.rand(H, N2, generator=g, dtype=torch.float64) - 0.05,
                      5 * torch.randn(H, N2, generator=g, dtype=torch.float64))
    dtA, Bbar, C = dt * A, _complex(g, H, N2), _complex(g, *outputs, H, N2)
    K = kernel_vandermonde(dtA, Bbar, C, L, block=block)
    want = 2 * kernel_ref(torch.exp(dtA), Bbar, C, L, diagonal=True).real
    assert_close_scaled(K, want, 1e-10)


@FUZZ
@given(H=st.integers(1, 3), M=st.integers(1, 5), rank=st.integers(1, 2), L=st.integers(1, 60),
       with_Q=st.booleans(), chunk=st.sampled_from([None, 1, 5]), seed=seeds)
def test_kernel_dplr_matches_naive(H, M, rank, L, with_Q, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    Lambda = torch.complex(-torch.rand(H, M, generator=g, dtype=torch.float64) - 0.1,
                           3 * torch.randn(H, M, generator=g, dtype=torch.float64))
    P = 0.3 * _complex(g, rank, H, M)
    Q = 0.3 * _complex(g, rank, H, M) if with_Q else None
    B, C = _complex(g, H, M), _complex(g, H, M)
    dt = 0.01 + 0.2 * torch.rand(H, generator=g, dtype=torch.float64)
    K = kernel_dplr(Lambda, P, B, C, dt, L, Q=Q, chunk=chunk)
    d = discretize_dplr(Lambda, P, B, C, dt, Q=Q)
    want = kernel_ref(d.dA, d.dB, d.C, L)
    assert_close_scaled(K, want.real if want.is_complex() else want, 1e-9)


# ------------------------------------------------------------------------------------------------------
# Linear attention
# ------------------------------------------------------------------------------------------------------
@FUZZ
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), L=st.integers(1, 50), dk=st.integers(1, 5),
       dv=st.integers(1, 5), chunk_size=st.sampled_from([1, 2, 5, 8, 64]), normalize=st.booleans(),
       initial=st.booleans(), seed=seeds)
def test_linear_attention_chunked_matches_loop(batch, heads, L, dk, dv, chunk_size, normalize, initial, seed):
    g = torch.Generator().manual_seed(seed)

    def positive(*shape):  # mapped features phi(q), phi(k) are positive (elu + 1)
        return (torch.rand(*shape, generator=g, dtype=torch.float64) + 0.05).requires_grad_()

    q, k = positive(batch, heads, L, dk), positive(batch, heads, L, dk)
    v = torch.randn(batch, heads, L, dv, generator=g, dtype=torch.float64).requires_grad_()
    state = (torch.randn(batch, heads, dk, dv, generator=g, dtype=torch.float64).requires_grad_(),
             positive(batch, heads, dk)) if initial else None
    leaves = [q, k, v] + (list(state) if state else [])

    def run(fn, **kw):
        y, (S, z) = fn(q, k, v, normalize=normalize, initial_state=state, return_final_state=True, **kw)
        return [y, S, z] + _grads([y, S, z], leaves, seed + 1)

    _assert_all_close(run(linear_attention_chunked, chunk_size=chunk_size), run(linear_attention_ref), 1e-9,
                      "linear_attention")


# ------------------------------------------------------------------------------------------------------
# Every registered mixer: parallel forward == step by step
# ------------------------------------------------------------------------------------------------------
D_MODEL = 8
# the Triton rows step token by token under the interpreter (about 25 s for the CI examples): slow
MIXER_ROWS = [pytest.param(name, backend, id=name if backend is None else f"{name}-{backend}",
                           marks=[pytest.mark.slow] if backend == "triton" else [])
              for name in sorted(MIXERS) for backend in MIXERS[name].contract_backends
              if not MIXERS[name].contract_config.get("bidirectional")]


def _build(name, backend, dtype, seed):
    torch.manual_seed(seed)
    mixer = build_mixer(name, D_MODEL, **MIXERS[name].contract_config).to(dtype)
    with torch.no_grad():  # away from any special initial values (zeros, ones)
        for p in mixer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    mixer.backend = backend
    return mixer


@pytest.mark.parametrize("name, backend", MIXER_ROWS)
@FUZZ_MIXER
@given(batch=st.integers(1, 3), length=st.integers(1, 24), prefix=st.integers(0, 5), seed=seeds)
def test_mixer_step_matches_forward(name, backend, batch, length, prefix, seed):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("fuzzes the Triton kernels under the CPU interpreter only")
    if backend == "cpp" and not scan_cpp.is_available() and os.environ.get("SSMKIT_REQUIRE_CPP") != "1":
        pytest.skip("the C++ scan could not be built here")
    dtype = torch.float32 if backend == "triton" else torch.float64
    mixer = _build(name, backend, dtype, seed % 1000)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, prefix + length, D_MODEL, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        # a state from a forward over a prefix (when drawn), then forward vs step over the rest
        state = mixer.init_state(batch, dtype=dtype)
        if prefix:
            _, state = mixer(x[:, :prefix], state, return_state=True)
        y, final = mixer(x[:, prefix:], state, return_state=True)
        steps = []
        for t in range(prefix, prefix + length):
            y_t, state = mixer.step(x[:, t], state)
            steps.append(y_t)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert_close_scaled(torch.stack(steps, 1), y, tol)
    for key in final:
        assert_close_scaled(state[key], final[key], tol)


# ------------------------------------------------------------------------------------------------------
# The Triton kernels compiled on a GPU (run where torch.cuda.is_available(); skipped elsewhere)
# ------------------------------------------------------------------------------------------------------
# The rows above hold the Triton kernels to the references under the CPU interpreter, on tiny sizes and
# without gradients. These draw CUDA float32 tensors at sizes that cross the compiled kernels' tiles, in the
# layouts the layers pass (transposed and sliced views), and compare outputs, final states and the gradient
# of every input with the float64 reference computed on the CPU from the same rounded values. The error
# bound is relative to each tensor's largest reference value, at least 0.1 (the inputs are of order one;
# float32 accumulation over a few hundred steps stays near 1e-6 of them; a wrong tile boundary or a missing
# term is of the order of the values).
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                                reason="needs a CUDA GPU and triton: the compiled kernels")
FUZZ_CUDA = settings(max_examples=EXAMPLES[PROFILE]["cuda"], derandomize=PROFILE == "ci", **_COMMON)
CUDA_TOL = 2e-3
GPU = "cuda"  # where the "cuda" rows run the kernels (a module constant, so their logic can be tried elsewhere)


def _assert_close_to_max(got, want, tol, what):
    """max |got - want| <= tol * max(max |want|, 0.1) per tensor (got on any device, want float64 on the CPU)."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None and b is None:
            continue
        assert a is not None and b is not None, f"{what}[{i}]: one side has no value"
        a = a.detach().double().cpu()
        assert a.shape == b.shape, f"{what}[{i}]: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{what}[{i}]: non-finite values"
        scale = b.abs().max().item() if b.numel() else 0.0
        err = (a - b).abs().max().item() if b.numel() else 0.0
        # a tensor whose reference is (near) zero, e.g. the gradient of A over one step, is held to tol * 0.1
        assert err <= tol * max(scale, 0.1), f"{what}[{i}]: max error {err:.3g} > {tol:.0e} x max({scale:.3g}, 0.1)"


def _rounded(inputs):
    """float32-rounded copies in float64 (the reference's inputs) of a dict of tensors (None kept)."""
    return {k: (v.detach().float().double() if v is not None else None) for k, v in inputs.items()}


def _in_layout(t, layout):
    """A CUDA float32 leaf holding ``t``'s values and the view of it that the op receives: ``contiguous``,
    ``transposed`` (made in (.., L, C) order and viewed as (.., C, L): the layers' channel-first views) or
    ``sliced`` (the first channels of a wider buffer, as the layers slice a fused projection)."""
    if t is None:
        return None, None
    t = t.float()
    if layout == "transposed" and t.dim() >= 3:
        leaf = t.transpose(-1, -2).contiguous().to(GPU).requires_grad_()
        return leaf, leaf.transpose(-1, -2)
    if layout == "sliced" and t.dim() >= 2:
        wide = torch.cat([t, torch.zeros(*t.shape[:-1], 3)], -1).to(GPU).requires_grad_()
        return wide, wide[..., :t.shape[-1]]
    leaf = t.contiguous().to(GPU).requires_grad_()
    return leaf, leaf


def _cuda_run(fn, inputs, layouts, seed):
    """Run ``fn(**views)`` on CUDA; returns its outputs and the gradients of a random functional of them
    w.r.t. each input, in the input's own shape (a transposed or sliced leaf's gradient viewed back)."""
    leaves, views = {}, {}
    for k, v in inputs.items():
        leaves[k], views[k] = _in_layout(v, layouts.get(k, "contiguous"))
    outputs = fn(**views)
    grads = []
    for (k, v), grad in zip(inputs.items(), _grads(list(outputs), list(leaves.values()), seed)):
        if grad is not None:
            layout = layouts.get(k, "contiguous")
            if layout == "transposed" and v.dim() >= 3:
                grad = grad.transpose(-1, -2)
            elif layout == "sliced" and v.dim() >= 2:
                grad = grad[..., :v.shape[-1]]
        grads.append(grad)
    return list(outputs) + grads


def _cpu_run(fn, inputs, seed):
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    outputs = fn(**leaves)
    return list(outputs) + _grads(list(outputs), list(leaves.values()), seed)


any_layout = st.sampled_from(["contiguous", "transposed", "sliced"])  # a drawn layout of one input


@needs_cuda
@FUZZ_CUDA
@given(case=scan_cases(max_dim=70, max_length=300), u_layout=any_layout, bc_layout=any_layout,
       d_state=st.integers(1, 20))
def test_selective_scan_triton_cuda_matches_reference(case, u_layout, bc_layout, d_state):
    case = dict(case, d_state=d_state)
    inputs = _rounded(_scan_inputs(case, torch.float64))
    kw = dict(delta_softplus=case["softplus"], return_last_state=True)
    layouts = {"u": u_layout, "delta": u_layout, "z": u_layout, "B": bc_layout, "C": bc_layout}
    got = _cuda_run(lambda **v: selective_scan(**v, **kw, backend="triton"), inputs, layouts, case["seed"] + 1)
    want = _cpu_run(lambda **v: selective_scan(**v, **kw, backend="reference"), inputs, case["seed"] + 1)
    _assert_close_to_max(got, want, CUDA_TOL, f"selective_scan[triton, cuda] {case} u:{u_layout} bc:{bc_layout}")


@needs_cuda
@FUZZ_CUDA
@given(case=ssd_cases(max_length=300), x_layout=st.sampled_from(["contiguous", "sliced"]),
       headdim=st.integers(1, 40), N=st.integers(1, 40), chunk_size=st.sampled_from([16, 32, 64, 128, 256]))
def test_ssd_triton_cuda_matches_reference(case, x_layout, headdim, N, chunk_size):
    # the compiled kernels take power-of-two chunks of at least 16 (the layers' chunk_size)
    case = dict(case, headdim=headdim, N=N, chunk_size=chunk_size)
    inputs = _rounded(_ssd_inputs(case, torch.float64))
    seq_idx = _seq_idx(case)

    def run(backend, device):
        def fn(x, dt, A, B, C, D, z, dt_bias, initial_states):
            return ssd(x, dt, A, B, C, case["chunk_size"], D=D, z=z, dt_bias=dt_bias, dt_softplus=case["softplus"],
                       initial_states=initial_states, seq_idx=None if seq_idx is None else seq_idx.to(device),
                       return_final_states=True, backend=backend)
        return fn

    layouts = {"x": x_layout, "B": x_layout, "C": x_layout, "z": x_layout}
    got = _cuda_run(run("triton", GPU), inputs, layouts, case["seed"] + 1)
    want = _cpu_run(run("reference", "cpu"), inputs, case["seed"] + 1)
    _assert_close_to_max(got, want, CUDA_TOL, f"ssd[triton, cuda] {case} x:{x_layout}")


@needs_cuda
@FUZZ_CUDA
@given(case=conv_cases(max_length=300), dim=st.integers(1, 300))
def test_causal_conv1d_triton_cuda_matches_reference(case, dim):
    case = dict(case, dim=dim)
    g = torch.Generator().manual_seed(case["seed"])
    b, L, w = case["batch"], case["length"], case["width"]
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).float().double()  # noqa: E731
    inputs = dict(x=randn(b, dim, L), weight=randn(dim, w), bias=randn(dim) if case["bias"] else None,
                  initial_state=randn(b, dim, w - 1) if case["initial"] and w > 1 else None)
    seq_idx = _seq_idx(case)

    def run(op, device, **kw):
        def fn(x, weight, bias, initial_state):
            return op(x, weight, bias, initial_state=initial_state, activation=case["activation"],
                      seq_idx=None if seq_idx is None else seq_idx.to(device), return_final_state=True, **kw)
        return fn

    layouts = {"x": "transposed" if case["transposed"] else "contiguous"}
    got = _cuda_run(run(causal_conv1d, GPU, backend="triton"), inputs, layouts, case["seed"] + 1)
    want = _cpu_run(run(causal_conv1d_ref, "cpu"), inputs, case["seed"] + 1)
    _assert_close_to_max(got, want, CUDA_TOL, f"conv1d[triton, cuda] {case}")


CUDA_MIXERS = [name for name in sorted(MIXERS) if "triton" in MIXERS[name].contract_backends]


@needs_cuda
@pytest.mark.parametrize("name", CUDA_MIXERS)
@FUZZ_CUDA
@given(batch=st.integers(1, 3), length=st.integers(1, 120), prefix=st.integers(0, 24), d_model=st.integers(8, 48),
       chunk_size=st.sampled_from([16, 32, 64]), seed=seeds)
def test_mixer_triton_cuda_matches_reference(name, batch, length, prefix, d_model, chunk_size, seed):
    """The whole layer, as a model calls it: the compiled Triton path on CUDA (float32) against the same
    weights on the CPU in float64 with the reference ops, for the output after a prefix's state, the final
    state, and the gradients of the input and of every parameter; then step by step on CUDA == forward."""
    torch.manual_seed(seed % 1000)
    config = dict(MIXERS[name].contract_config)
    if name == "mamba2":  # the compiled kernels take power-of-two chunks of at least 16
        config.update(chunk_size=chunk_size)
        d_model = max(8, d_model - d_model % 4)  # heads of headdim 4 in 2 groups
    ref = build_mixer(name, d_model, **config).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
            p.copy_(p.float().double())  # the values float32 holds, so both sides start equal
    ref.backend = "reference"
    fast = build_mixer(name, d_model, **config).float().to(GPU)
    fast.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    fast.backend = "triton"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, prefix + length, d_model, generator=g, dtype=torch.float64).float().double()

    def run(mixer, x, device, dtype):
        x = x.to(device, dtype).requires_grad_()
        state = mixer.init_state(batch, dtype=dtype, device=device)
        if prefix:
            _, state = mixer(x[:, :prefix], state, return_state=True)
        y, final = mixer(x[:, prefix:], state, return_state=True)
        outs = [y] + [final[k] for k in sorted(final)]
        return outs + _grads(outs, [x] + [p for _, p in sorted(mixer.named_parameters())], seed + 1)

    got = run(fast, x, GPU, torch.float32)
    want = [t.detach() if t is not None else None for t in run(ref, x, "cpu", torch.float64)]
    _assert_close_to_max(got, want, CUDA_TOL, f"{name}[triton, cuda] batch={batch} length={length} "
                         f"prefix={prefix} d_model={d_model} seed={seed}")
    assert fast.last_backend == "triton", fast.last_backends
    with torch.no_grad():  # the recurrent step on CUDA against the forward it must equal
        state = fast.init_state(batch, dtype=torch.float32, device=GPU)
        xc = x.float().to(GPU)
        y, final = fast(xc, state, return_state=True)
        steps = []
        for t in range(xc.shape[1]):
            y_t, state = fast.step(xc[:, t], state)
            steps.append(y_t)
    assert_close_scaled(torch.stack(steps, 1), y, 1e-4, f"{name} step vs forward on cuda")
    for key in final:
        assert_close_scaled(state[key], final[key], 1e-4, f"{name} state[{key}] step vs forward on cuda")


# Whole module: subprocesses, exports or many drawn cases (tens of seconds); `make test` and CI run it,
# `make test-fast` does not.
pytestmark = pytest.mark.slow
