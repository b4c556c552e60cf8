"""The mixer contract, checked for every registered mixer in float64 and float32, with every backend.

(a) forward == the step-by-step recurrence      (b) forward over chunks passing the state == whole forward
(c) causality                                    (d) batch rows are independent
(e) gradients reach every parameter and the initial state
(f) lengths 1, 63 and 1000                       plus bad input: clear errors naming the argument.
(g) a bfloat16 / float16 model (parameters in half precision, no autocast) matches the same mixer in float64:
    outputs, the step recurrence, final states and every gradient, and its states have the documented dtypes.

Each mixer with fast paths runs the suite once per backend it declares (``Mixer.contract_backends``, run
through ``Mixer.backend``): on the CPU the C++ and torch paths, and Triton under the interpreter at lengths
up to 63 in float32 (the kernels take no float64); on a machine with CUDA the Triton rows run compiled, on
CUDA tensors. The C++ rows fail rather than skip where SSMKIT_REQUIRE_CPP=1 (CI).

A new mixer declares a small ``contract_config`` on its class (register_mixer refuses it otherwise), so no
registered mixer escapes the suite.
"""

import copy
import os

import pytest
import torch

import ssmkit
from ssmkit.layers import MIXERS, build_mixer
from ssmkit.ops.mamba import cpp as scan_cpp
from ssmkit.ops._triton import triton_available

from ..helpers import assert_close_scaled

D_MODEL = 8
# Small but non-trivial configurations (several heads/groups/states), cheap enough to step 1000 times: each
# mixer class declares its own (``contract_config``), so a newly registered mixer joins the suite unasked.
CONTRACT_CONFIGS = {name: cls.contract_config for name, cls in MIXERS.items()}
# forward-vs-step tolerance relative to the output scale: float64 is exact to rounding, float32 accumulates
# rounding differently in the parallel (FFT, chunked) and sequential forms over 1000 steps.
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}
DTYPES = [torch.float64, torch.float32]
NAMES = sorted(MIXERS)

ON_GPU = torch.cuda.is_available()
REQUIRE_CPP = os.environ.get("SSMKIT_REQUIRE_CPP") == "1"


def _row(name, backend):
    marks = []
    if backend == "triton":
        marks.append(pytest.mark.skipif(not triton_available(), reason="triton is not installed"))
        if not ON_GPU:
            marks.append(pytest.mark.slow)  # Triton's CPU interpreter runs the kernels in Python
    if backend == "cpp":
        marks.append(pytest.mark.skipif(not REQUIRE_CPP and not scan_cpp.is_available(),
                                        reason="the C++ scan could not be built here"))
    return pytest.param(name, backend, id=name if backend is None else f"{name}-{backend}", marks=marks)


ROWS = [_row(name, backend) for name in NAMES for backend in MIXERS[name].contract_backends]


def device_of(backend):
    return "cuda" if (backend == "triton" and ON_GPU) else "cpu"


def skip_unsupported(backend, dtype=None, length=None):
    """The Triton kernels take float32/bfloat16/float16 only; the interpreter is slow beyond short sequences."""
    if backend != "triton":
        return
    if dtype == torch.float64:
        pytest.skip("the Triton kernels take no float64 (float32 row covers them)")
    if length is not None and length > 63 and not ON_GPU:
        pytest.skip("Triton's CPU interpreter runs the contract up to length 63")


def make(name, dtype, seed=0, backend=None):
    torch.manual_seed(seed)
    mixer = build_mixer(name, D_MODEL, **MIXERS[name].contract_config).to(dtype)
    # Perturb every parameter a little so no test passes by an accident of the initialisation (zeros, ones).
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    if backend is not None:
        mixer.backend = backend
    return mixer.to(device_of(backend))


def randn(*shape, dtype, backend=None):
    return torch.randn(*shape, dtype=dtype).to(device_of(backend))


def run_steps(mixer, x, state):
    ys = []
    for x_t in x.unbind(1):
        y_t, state = mixer.step(x_t, state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


def assert_states_close(a, b, tol, what):
    assert set(a) == set(b), f"{what}: state keys {sorted(a)} != {sorted(b)}"
    for key in a:
        if not (a[key].is_floating_point() or a[key].is_complex()):
            assert torch.equal(a[key], b[key]), f"{what} {key}: {a[key]} != {b[key]}"
            continue
        assert_close_scaled(torch.view_as_real(a[key]) if a[key].is_complex() else a[key],
                            torch.view_as_real(b[key]) if b[key].is_complex() else b[key], tol, f"{what} {key}")


def prefix_state(mixer, batch, dtype, backend=None):
    """A realistic non-zero state: the state after a short random prefix."""
    prefix = randn(batch, 5, D_MODEL, dtype=dtype, backend=backend)
    _, state = mixer(prefix, return_state=True)
    return {k: v.detach() for k, v in state.items()}


# (g) Half-precision models against float64. The float64 twin holds the very same (rounded) parameters and
# reads the same (rounded) input, so what differs is only the rounding of the activations to the half dtype
# between ops (projections, convolutions, attention, the core's output); the cores and recurrent states are
# float32 (layers/base.py, Precision). Tolerances in units of the dtype's unit roundoff u (bfloat16 2^-8,
# float16 2^-11): outputs, steps and states of these mixers land within about 1.5 u of the output scale, so 4 u;
# gradients chain a few more rounded ops (backward through the projections and the gate) and are compared
# with each gradient's own largest entry, measured up to about 6 u, so 12 u.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
HALF_DTYPES = [torch.bfloat16, torch.float16]
HALF_LENGTH = 40  # crosses Mamba-2's 16-step chunks


def assert_gradient_close(actual, expected, tol, what):
    """max |actual - expected| <= tol * max |expected|: relative to the gradient's own scale."""
    assert actual is not None, f"{what}: no gradient"
    scale = expected.abs().max().item()
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.2g} x scale {scale:.3g}"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("name, backend", ROWS)
def test_half_precision_model_matches_float64(name, backend, dtype):
    from ssmkit.layers.base import state_dtype

    length = HALF_LENGTH
    if backend == "triton" and not ON_GPU:  # Triton's CPU interpreter: ~10 s a row at 20 steps
        if dtype == torch.float16:
            pytest.skip("Triton's CPU interpreter runs the half-precision row in bfloat16 only (a GPU runs both)")
        length = 20
    half = make(name, dtype, backend=backend)
    exact = copy.deepcopy(half).to("cpu", torch.float64)
    exact.backend = "torch" if backend == "triton" else backend  # the kernels take no float64
    device = device_of(backend)
    x64 = torch.randn(2, length, D_MODEL, dtype=torch.float64).to(dtype).double()  # representable in dtype
    u = UNIT_ROUNDOFF[dtype]

    # the training path: no state; outputs and every gradient
    x = x64.to(device, dtype).requires_grad_()
    x_ref = x64.clone().requires_grad_()
    y, y_ref = half(x), exact(x_ref)
    assert backend is None or half.last_backend == backend, f"{name}: asked for {backend!r}, {half.last_backend!r} ran"
    assert y.dtype == dtype, f"{name}: output dtype {y.dtype} in a {dtype} model"
    assert_close_scaled(y.detach().cpu().double(), y_ref.detach(), 4 * u, f"{name} {dtype} outputs")
    weights = torch.randn_like(y_ref)
    (y.double() * weights.to(device)).sum().backward()
    (y_ref * weights).sum().backward()
    assert_gradient_close(x.grad.cpu(), x_ref.grad, 12 * u, f"{name} {dtype} gradient of x")
    for (pname, p), p_ref in zip(half.named_parameters(), exact.parameters()):
        assert p.grad is not None and p.grad.dtype == dtype, f"{name}: gradient of {pname} missing or not {dtype}"
        assert_gradient_close(p.grad.cpu(), p_ref.grad, 12 * u, f"{name} {dtype} gradient of {pname}")

    # continuing from a state: forward and the step recurrence, states in the documented dtypes
    with torch.no_grad():
        state0 = prefix_state(half, 2, dtype, backend)
        kinds = half.state_spec(2)
        for key, value in {**state0, **half.init_state(2)}.items():
            kind = kinds[key.split(".", 1)[1]][1]
            assert value.dtype == state_dtype(dtype, kind), f"{name}: state {key} is {value.dtype}"
        state0_ref = {k: v.cpu().to(torch.float64 if v.is_floating_point() else
                                    torch.complex128 if v.is_complex() else v.dtype) for k, v in state0.items()}
        x = x64.to(device, dtype)
        y, state = half(x, state0, return_state=True)
        y_ref, state_ref = exact(x64, state0_ref, return_state=True)
        y_steps, state_steps = run_steps(half, x, state0)
    assert_close_scaled(y.cpu().double(), y_ref, 4 * u, f"{name} {dtype} outputs after a state")
    assert_close_scaled(y_steps.cpu().double(), y_ref, 4 * u, f"{name} {dtype} step-by-step outputs")
    for states, what in ((state, "forward"), (state_steps, "steps")):
        assert {k: v.dtype for k, v in states.items()} == {k: v.dtype for k, v in state0.items()}, what
        assert_states_close({k: v.cpu().to(state_ref[k].dtype) for k, v in states.items()}, state_ref, 4 * u,
                            f"{name} {dtype} final state ({what})")


def test_every_mixer_is_covered():
    assert set(MIXERS) <= set(CONTRACT_CONFIGS), f"add a contract config for {set(MIXERS) - set(CONTRACT_CONFIGS)}"
    assert {"s4", "s4d", "s5"} <= set(MIXERS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", [1, 63, 1000])
@pytest.mark.parametrize("name, backend", ROWS)
def test_forward_equals_recurrence(name, backend, length, dtype):
    skip_unsupported(backend, dtype, length)
    mixer = make(name, dtype, backend=backend)
    x = randn(2, length, D_MODEL, dtype=dtype, backend=backend)
    state0 = prefix_state(mixer, 2, dtype, backend)
    with torch.no_grad():
        y, state = mixer(x, state0, return_state=True)
        ran = mixer.last_backend
        y_steps, state_steps = run_steps(mixer, x, state0)
    assert backend is None or ran == backend, f"{name}: asked for backend {backend!r}, {ran!r} ran"
    assert y.shape == x.shape and y.dtype == dtype
    assert_close_scaled(y, y_steps, TOL[dtype], f"{name} outputs")
    assert_states_close(state, state_steps, TOL[dtype], f"{name} final state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [[1] * 20, [7, 7, 6], [5, 1, 11, 3]], ids=["ones", "sevens", "uneven"])
@pytest.mark.parametrize("name, backend", ROWS)
def test_chunked_forward_equals_whole(name, backend, splits, dtype):
    skip_unsupported(backend, dtype)
    if backend == "triton" and not ON_GPU and len(splits) > 4:
        pytest.skip("20 one-token forwards cost ~1.6 s each in Triton's CPU interpreter; 'sevens' and 'uneven' "
                    "cover state passing")
    mixer = make(name, dtype, backend=backend)
    x = randn(3, sum(splits), D_MODEL, dtype=dtype, backend=backend)
    state = prefix_state(mixer, 3, dtype, backend)
    with torch.no_grad():
        y_whole, state_whole = mixer(x, state, return_state=True)
        pieces = []
        for chunk in x.split(splits, dim=1):
            y, state = mixer(chunk, state, return_state=True)
            pieces.append(y)
    assert_close_scaled(torch.cat(pieces, 1), y_whole, TOL[dtype], f"{name} chunked outputs")
    assert_states_close(state, state_whole, TOL[dtype], f"{name} chunked final state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, backend", ROWS)
def test_causality(name, backend, dtype):
    skip_unsupported(backend, dtype)
    mixer = make(name, dtype, backend=backend)
    x = randn(2, 40, D_MODEL, dtype=dtype, backend=backend)
    t = 23
    x2 = x.clone()
    x2[:, t:] += torch.randn_like(x2[:, t:])
    with torch.no_grad():
        y, y2 = mixer(x), mixer(x2)
    # FFT convolutions leak rounding noise backwards, so "unchanged" means unchanged to rounding.
    assert_close_scaled(y2[:, :t], y[:, :t], TOL[dtype] / 10, f"{name} outputs before t")
    assert (y2[:, t:] - y[:, t:]).abs().max() > 1e-3, f"{name}: outputs at and after t ignore the input there"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, backend", ROWS)
def test_batch_rows_independent(name, backend, dtype):
    skip_unsupported(backend, dtype)
    mixer = make(name, dtype, backend=backend)
    x = randn(3, 30, D_MODEL, dtype=dtype, backend=backend)
    with torch.no_grad():
        y = mixer(x)
        rows = torch.cat([mixer(x[i : i + 1]) for i in range(3)])
        x2 = x.clone()
        x2[1] = torch.randn_like(x2[1])
        y2 = mixer(x2)
    assert_close_scaled(rows, y, TOL[dtype], f"{name} one row at a time")
    assert torch.equal(y2[0], y[0]) or (y2[0] - y[0]).abs().max() <= TOL[dtype] * 0.1
    assert (y2[1] - y[1]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, backend", ROWS)
def test_gradients_reach_parameters_and_initial_state(name, backend, dtype):
    skip_unsupported(backend, dtype)
    mixer = make(name, dtype, backend=backend)
    x = randn(2, 17, D_MODEL, dtype=dtype, backend=backend).requires_grad_()
    state0 = {k: v.clone().requires_grad_(v.is_floating_point() or v.is_complex())
              for k, v in prefix_state(mixer, 2, dtype, backend).items()}
    y, state = mixer(x, state0, return_state=True)
    loss = (y * torch.randn_like(y)).sum()
    for value in state.values():  # a gradient also flows in through the final state
        if not (value.is_floating_point() or value.is_complex()):
            continue
        loss = loss + (torch.view_as_real(value) if value.is_complex() else value).square().mean()
    loss.backward()
    for pname, p in mixer.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches parameter {pname}"
        assert p.grad.abs().max() > 0, f"{name}: zero gradient for parameter {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
    assert x.grad is not None and x.grad.abs().max() > 0
    for key, value in state0.items():
        if not value.requires_grad:  # integer entries (positions) carry no gradient
            continue
        assert value.grad is not None and value.grad.abs().max() > 0, f"{name}: no gradient reaches state {key}"


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_refused_with_clear_errors(name):
    mixer = make(name, torch.float32)
    good = torch.randn(2, 5, D_MODEL)
    with pytest.raises(ValueError, match=r"x must be \(batch, length, d_model=8\); got \(5, 8\)"):
        mixer(good[0])
    with pytest.raises(ValueError, match=r"d_model=8\); got \(2, 5, 7\)"):
        mixer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="empty sequence"):
        mixer(torch.randn(2, 0, D_MODEL))
    with pytest.raises(TypeError, match="x must be a floating-point tensor; got dtype torch.int64"):
        mixer(torch.ones(2, 5, D_MODEL, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mixer([[0.0] * D_MODEL])
    state = mixer.init_state(2)
    with pytest.raises(ValueError, match="for batch size 3"):
        mixer(torch.randn(3, 5, D_MODEL), state)
    with pytest.raises(ValueError, match=r"x_t must be \(batch, d_model=8\)"):
        mixer.step(good, state)
    with pytest.raises(ValueError, match="state is required"):
        mixer.step(good[:, 0], None)
    other = next(n for n in NAMES if n != name)
    foreign = build_mixer(other, D_MODEL, **MIXERS[other].contract_config).init_state(2)
    with pytest.raises(ValueError, match="another mixer"):
        mixer(good, foreign)
    if not mixer.supports_packing:
        with pytest.raises(ValueError, match="does not take packed sequences"):
            mixer(good, seq_idx=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match=r"to match x \(torch.float32\); got torch.(float64|complex128)"):
        mixer(good, mixer.init_state(2, dtype=torch.float64))


def test_registry_suggests_closest_name():
    with pytest.raises(ValueError, match="did you mean 'mamba2'"):
        ssmkit.get_mixer("mamba22")
