"""Selective scan backends against the sequential reference: outputs, final states and every gradient.

The C++ backend is compiled on first use (about a minute, cached on disk; see
``ssmkit.ops.mamba.cpp.build_directory()``). If it cannot be built its tests are skipped with the
reason, unless ``SSMKIT_REQUIRE_CPP=1``, which turns that into a failure (CI sets it).
"""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops.mamba import (available_backends, last_backend, selective_scan, selective_scan_ref,
                                       selective_state_update)
from ssmkit.ops.mamba import cpp as cpp_backend
from ssmkit.ops.mamba.chunked import _flush_enabled, selective_scan_chunked

# the subpackage itself (``ssmkit.ops`` may re-export the function under the same name)
scan_pkg = importlib.import_module("ssmkit.ops.mamba")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.fixture(scope="module")
def cpp_ready():
    if not cpp_backend.is_available():
        reason = f"C++ selective scan extension unavailable: {cpp_backend.build_error()}"
        if os.environ.get("SSMKIT_REQUIRE_CPP") == "1":
            pytest.fail(reason + " (SSMKIT_REQUIRE_CPP=1)")
        pytest.skip(reason)
    return True


def cpp_if_built() -> list:
    """``["cpp"]`` when the extension builds, else ``[]``; a failure instead under SSMKIT_REQUIRE_CPP=1 (for
    tests that run several backends in one body, where a fixture's skip would drop the others too)."""
    if cpp_backend.is_available():
        return ["cpp"]
    if os.environ.get("SSMKIT_REQUIRE_CPP") == "1":
        pytest.fail(f"C++ selective scan extension unavailable: {cpp_backend.build_error()} (SSMKIT_REQUIRE_CPP=1)")
    return []


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    if request.param == "cpp":
        request.getfixturevalue("cpp_ready")
    return request.param


def make_inputs(batch=2, dim=60, length=63, d_state=5, groups=2, D=True, z=True, delta_bias=True,
                initial_state=True, dtype=torch.float64, seed=0):
    """Inputs of a realistic scale: Delta around softplus(-1..1), A negative, B/C of group layout or 3-D."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    bc_shape = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    tensors = {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length) * 0.5,
        "A": -torch.rand(dim, d_state, generator=g, dtype=dtype) * 3 - 0.1,
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(dim) if D else None,
        "z": randn(batch, dim, length) if z else None,
        "delta_bias": randn(dim) * 0.3 if delta_bias else None,
        "initial_state": randn(batch, dim, d_state) if initial_state else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in tensors.items()}


def run_with_grads(fn, inputs, softplus=True, seed=1, use_y=True, use_last=True):
    """Outputs and the gradients of a random linear functional of (y, last_state) w.r.t. every input."""
    y, last = fn(**inputs, delta_softplus=softplus, return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    if use_y:
        loss = loss + (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)).sum()
    if use_last:
        loss = loss + (last * torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)).sum()
    names = [k for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad(loss, [inputs[k] for k in names], allow_unused=True)
    return y, last, dict(zip(names, grads))


def fresh(inputs, dtype=None):
    return {k: (v.detach().to(dtype or v.dtype).requires_grad_() if v is not None else None)
            for k, v in inputs.items()}


def backend_fn(name, **options):
    if name == "torch" and options:
        return lambda **kw: selective_scan_chunked(**kw, chunk_size=options["chunk"])
    if name == "cpp" and options:
        return lambda **kw: cpp_backend.selective_scan_cpp(**kw, checkpoint_interval=options["chunk"])
    return lambda **kw: selective_scan(**kw, backend=name)


def assert_matches(fast, ref, rtol, atol_scale):
    y, last, grads = fast
    y_ref, last_ref, grads_ref = ref
    assert set(grads) == set(grads_ref)

    def close(name, a, b):
        if a is None or b is None:  # an input the loss does not depend on: None or zeros
            assert (a is None or not a.any()) and (b is None or not b.any()), f"{name}: {a} vs {b}"
            return
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol_scale * scale, msg=lambda m: f"{name}: {m}")

    close("y", y, y_ref)
    close("last_state", last, last_ref)
    for name in grads_ref:
        close(f"grad {name}", grads[name], grads_ref[name])


CASES = [
    # batch, dim, L, N, groups, D, z, delta_bias, initial_state, softplus
    (2, 60, 63, 5, 2, True, True, True, True, True),
    (1, 60, 200, 16, None, True, False, True, False, True),  # crosses chunk / checkpoint boundaries
    (2, 60, 1, 5, 2, False, True, False, True, False),
    (1, 12, 200, 5, 3, False, False, False, True, False),
    (2, 8, 130, 16, 4, True, True, False, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-d{}-L{}-N{}-g{}".format(*c[:5]))
def test_backend_matches_reference_float64(backend, case):
    batch, dim, length, d_state, groups, D, z, bias, h0, softplus = case
    inputs = make_inputs(batch, dim, length, d_state, groups, D, z, bias, h0)
    ref = run_with_grads(selective_scan_ref, fresh(inputs), softplus)
    fast = run_with_grads(backend_fn(backend), fresh(inputs), softplus)
    assert_matches(fast, ref, rtol=1e-9, atol_scale=1e-10)


@pytest.mark.parametrize("chunk", [1, 7, 64, 500])
def test_chunk_and_checkpoint_sizes(backend, chunk):
    inputs = make_inputs(2, 12, 100, 5, 2)
    ref = run_with_grads(selective_scan_ref, fresh(inputs))
    fast = run_with_grads(backend_fn(backend, chunk=chunk), fresh(inputs))
    assert_matches(fast, ref, rtol=1e-9, atol_scale=1e-10)


@pytest.mark.parametrize("use_y, use_last", [(True, False), (False, True)])
def test_gradient_from_one_output_only(backend, use_y, use_last):
    inputs = make_inputs(2, 12, 70, 5, 2)
    ref = run_with_grads(selective_scan_ref, fresh(inputs), use_y=use_y, use_last=use_last)
    fast = run_with_grads(backend_fn(backend), fresh(inputs), use_y=use_y, use_last=use_last)
    assert_matches(fast, ref, rtol=1e-9, atol_scale=1e-10)


def test_float32_close_to_float64_reference(backend):
    inputs = make_inputs(2, 64, 300, 16, 2)
    ref = run_with_grads(selective_scan_ref, fresh(inputs))
    fast = run_with_grads(backend_fn(backend), fresh(inputs, torch.float32))
    assert fast[0].dtype == torch.float32
    assert_matches(fast, ref, rtol=1e-4, atol_scale=2e-5)


def test_non_contiguous_inputs(backend):
    inputs = make_inputs(2, 12, 40, 5, None)
    # (batch, L, dim) activations transposed to (batch, dim, L), as a Mamba block produces them
    for name in ("u", "delta", "z"):
        inputs[name] = inputs[name].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        assert not inputs[name].is_contiguous()
    ref = run_with_grads(selective_scan_ref, fresh(inputs))
    fast = run_with_grads(backend_fn(backend), inputs)
    assert_matches(fast, ref, rtol=1e-9, atol_scale=1e-10)


def test_cpp_with_two_threads_accumulates_shared_B_C_gradients(cpp_ready):
    """Channels of one group add into the same dB, dC from different threads."""
    inputs = make_inputs(2, 24, 90, 5, 2)
    ref = run_with_grads(selective_scan_ref, fresh(inputs))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = run_with_grads(backend_fn("cpp"), fresh(inputs))
    finally:
        torch.set_num_threads(threads)
    assert_matches(fast, ref, rtol=1e-9, atol_scale=1e-10)


def _saved_elements(output: torch.Tensor) -> int:
    """Total elements of the distinct tensors that the autograd graph behind ``output`` keeps for backward."""
    storages, seen, stack = {}, set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved = list(getattr(node, "saved_tensors", ()) or ())
        saved += [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        for value in saved:
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes() // value.element_size()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def test_memory_for_backward_is_not_proportional_to_L_times_N(backend):
    """The fast paths keep O(batch * dim * L) for the backward, not the (batch, dim, L, N) states."""
    batch, dim, length, d_state = 1, 64, 128, 32
    inputs = make_inputs(batch, dim, length, d_state, None)
    y = selective_scan(**inputs, delta_softplus=True, backend=backend)
    states = batch * dim * length * d_state
    assert _saved_elements(y) < states / 2
    reference = selective_scan_ref(**fresh(inputs), delta_softplus=True)
    assert _saved_elements(reference) >= states  # the reference keeps every state: the count sees them


def test_no_grad_and_return_types(backend):
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(1, 6, 20, 5, None).items()}
    with torch.no_grad():
        y = selective_scan(**inputs, backend=backend)
        y_ref = selective_scan_ref(**inputs)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 6, 20)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 2), groups=st.sampled_from([None, 1, 2, 3]), per_group=st.integers(1, 4),
       length=st.integers(1, 70), d_state=st.integers(1, 9), flags=st.lists(st.booleans(), min_size=5, max_size=5),
       seed=st.integers(0, 2**16))
def test_random_shapes(batch, groups, per_group, length, d_state, flags, seed):
    dim = (groups or 1) * per_group
    inputs = make_inputs(batch, dim, length, d_state, groups, *flags[:4], seed=seed)
    ref = run_with_grads(selective_scan_ref, fresh(inputs), softplus=flags[4])
    names = ["torch"] + cpp_if_built()
    for name in names:
        fast = run_with_grads(backend_fn(name), fresh(inputs), softplus=flags[4])
        assert_matches(fast, ref, rtol=1e-9, atol_scale=1e-10)


# ---- selective_state_update ---------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [None, 2])
def test_state_update_is_one_step_of_the_scan(groups):
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(2, 6, 1, 5, groups).items()}
    y_ref, h_ref = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    state = inputs["initial_state"].clone()
    y, h = selective_state_update(state, inputs["u"][..., 0], inputs["delta"][..., 0], inputs["A"],
                                  inputs["B"][..., 0], inputs["C"][..., 0], inputs["D"], inputs["z"][..., 0],
                                  dt_bias=inputs["delta_bias"], dt_softplus=True)
    torch.testing.assert_close(y, y_ref[..., 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(state, inputs["initial_state"]), "the state argument must not be modified"


def test_state_update_loop_equals_scan_with_gradients():
    inputs = make_inputs(2, 6, 17, 5, 2)
    y_ref, h_ref, grads_ref = run_with_grads(selective_scan_ref, fresh(inputs))

    def stepped(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, return_last_state):
        h, ys = initial_state, []
        for u_t, dt_t, B_t, C_t, z_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1),
                                            z.unbind(-1)):
            y_t, h = selective_state_update(h, u_t, dt_t, A, B_t, C_t, D, z_t, delta_bias, delta_softplus)
            ys.append(y_t)
        return torch.stack(ys, -1), h

    fast = run_with_grads(stepped, fresh(inputs))
    assert_matches(fast, (y_ref, h_ref, grads_ref), rtol=1e-10, atol_scale=1e-12)


# ---- backend selection ----------------------------------------------------------------------------------------

def small_inputs(dtype=torch.float32):
    return {k: (v.detach().to(dtype) if v is not None else None) for k, v in make_inputs(1, 4, 5, 3, None).items()}


@pytest.mark.parametrize("name", ["torch", "reference", "cpp"])
def test_last_backend_names_what_ran(name, request):
    if name == "cpp":
        request.getfixturevalue("cpp_ready")
    selective_scan(**small_inputs(), backend=name)
    assert last_backend() == name
    assert selective_scan.last_backend() == name  # the attribute form, as seen through ssmkit.ops


def test_auto_uses_cpp_on_cpu_when_built(cpp_ready):
    selective_scan(**small_inputs(), backend="auto")
    assert last_backend() == "cpp"
    assert "cpp" in available_backends()
    selective_scan(**small_inputs(torch.bfloat16), backend="auto")  # no C++ kernel for bfloat16
    assert last_backend() == "torch"


def test_environment_variable_sets_default(monkeypatch):
    monkeypatch.setenv("SSMKIT_SCAN_BACKEND", "reference")
    selective_scan(**small_inputs())
    assert last_backend() == "reference"
    monkeypatch.setenv("SSMKIT_SCAN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SSMKIT_SCAN_BACKEND"):
        selective_scan(**small_inputs())


def test_auto_fallback_is_announced(monkeypatch):
    monkeypatch.setattr(cpp_backend, "is_available", lambda: False)
    monkeypatch.setattr(cpp_backend, "build_error", lambda: "compiler missing (simulated)")
    monkeypatch.setattr(scan_pkg, "_warned_auto_fallback", False)
    with pytest.warns(RuntimeWarning, match="could not be built.*simulated"):
        selective_scan(**small_inputs(), backend="auto")
    assert last_backend() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        selective_scan(**small_inputs(), backend="auto")


def test_cpp_backend_raises_when_unbuildable(monkeypatch):
    monkeypatch.setattr(cpp_backend, "_load", lambda: None)
    with pytest.raises(RuntimeError, match="could not be built"):
        selective_scan(**small_inputs(), backend="cpp")


@pytest.mark.parametrize("flush_before", [False, True])
def test_denormal_mode_is_restored(backend, flush_before):
    previous = _flush_enabled()
    torch.set_flush_denormal(flush_before)
    try:
        selective_scan(**small_inputs(), backend=backend)
        assert _flush_enabled() == flush_before
    finally:
        torch.set_flush_denormal(previous)


# ---- bad input ------------------------------------------------------------------------------------------------

BAD_SCAN = [
    ("u", lambda t: t["u"][0], ValueError, r"u must be \(batch, dim, L\)"),
    ("u", lambda t: t["u"][..., :0], ValueError, "L >= 1"),
    ("delta", lambda t: t["delta"][..., :3], ValueError, "delta must be"),
    ("A", lambda t: t["A"][:3], ValueError, r"A must be \(dim=4, N\)"),
    ("A", lambda t: t["A"].to(torch.complex128), TypeError, "A must be real"),
    ("B", lambda t: t["B"][..., :2], ValueError, "B must be"),
    ("B", lambda t: t["B"][:, None].expand(1, 3, 3, 5), ValueError, "B has 3 groups, which must divide dim=4"),
    ("C", lambda t: t["C"][:, :2], ValueError, "C must be"),
    ("D", lambda t: torch.ones(5, dtype=torch.float64), ValueError, r"D must be \(dim=4,\)"),
    ("z", lambda t: t["u"][:, :2], ValueError, "z must be"),
    ("delta_bias", lambda t: torch.ones(4, 1, dtype=torch.float64), ValueError, "delta_bias must be"),
    ("initial_state", lambda t: torch.zeros(1, 4, 2, dtype=torch.float64), ValueError, "initial_state must be"),
    ("B", lambda t: t["B"].float(), TypeError, "B has dtype torch.float32 but u has dtype torch.float64"),
    ("u", lambda t: t["u"].long(), TypeError, "u must be a floating-point tensor"),
    ("delta", lambda t: 1.0, TypeError, "delta must be a torch.Tensor"),
]


@pytest.mark.parametrize("name, make_bad, error, message", BAD_SCAN,
                         ids=[f"{bad[0]}-{i}" for i, bad in enumerate(BAD_SCAN)])
@pytest.mark.parametrize("which", ["torch", "reference", "cpp", "auto"])
def test_bad_scan_input_names_the_argument(name, make_bad, error, message, which):
    tensors = {k: (v.detach() if v is not None else None) for k, v in make_inputs(1, 4, 5, 3, None).items()}
    tensors[name] = make_bad(tensors)
    with pytest.raises(error, match=message):
        selective_scan(**tensors, backend=which)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(**small_inputs(), backend="cuda")


def test_cpp_rejects_unsupported_dtype(cpp_ready):
    with pytest.raises(TypeError, match="float32 and float64"):
        selective_scan(**small_inputs(torch.bfloat16), backend="cpp")


BAD_STEP = [
    ("x", lambda t: t["x"][0], ValueError, r"x must be \(batch, dim\)"),
    ("state", lambda t: t["state"][..., :2], ValueError, "state must be"),
    ("dt", lambda t: t["dt"][:, :2], ValueError, "dt must be"),
    ("B", lambda t: torch.zeros(1, 3, 3, dtype=torch.float64), ValueError, "B has 3 groups"),
    ("C", lambda t: torch.zeros(1, 7, dtype=torch.float64), ValueError, "C must be"),
    ("dt_bias", lambda t: torch.zeros(3, dtype=torch.float64), ValueError, "dt_bias must be"),
    ("A", lambda t: t["A"].float(), TypeError, "A has dtype"),
]


@pytest.mark.parametrize("name, make_bad, error, message", BAD_STEP, ids=[b[0] for b in BAD_STEP])
def test_bad_state_update_input_names_the_argument(name, make_bad, error, message):
    t = {k: (v.detach() if v is not None else None) for k, v in make_inputs(1, 4, 1, 3, None).items()}
    args = {"state": t["initial_state"], "x": t["u"][..., 0], "dt": t["delta"][..., 0], "A": t["A"],
            "B": t["B"][..., 0], "C": t["C"][..., 0], "D": t["D"], "z": t["z"][..., 0], "dt_bias": t["delta_bias"]}
    args[name] = make_bad(args)
    with pytest.raises(error, match=message):
        selective_state_update(**args)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_float32_parameters_beside_half_activations(backend):
    """As mamba_ssm: bf16 u/delta/B/C/z with float32 A, D, delta_bias; y in bf16, each gradient in its
    argument's dtype, the result within bf16 rounding of the float64 reference."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = "cuda" if (backend == "triton" and torch.cuda.is_available()) else "cpu"
    g = torch.Generator().manual_seed(3)
    b, d, L, N = 2, 4, 9, 3
    half = [torch.randn(b, d, L, generator=g), torch.rand(b, d, L, generator=g), torch.randn(b, N, L, generator=g),
            torch.randn(b, N, L, generator=g), torch.randn(b, d, L, generator=g)]
    u, delta, B, C, z = (t.to(device, torch.bfloat16).requires_grad_() for t in half)
    A, D, bias = (t.to(device).requires_grad_() for t in (-torch.rand(d, N, generator=g),
                                                           torch.randn(d, generator=g), torch.randn(d, generator=g)))
    y = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert [t.grad.dtype for t in (u, A, D, bias)] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    ref = selective_scan_ref(*(t.detach().double() for t in (u, delta, A, B, C, D, z, bias)), delta_softplus=True)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_half_inputs_keep_a_float32_state(backend):
    """bf16 activations with a float32 initial state (a half-precision model's recurrent state): every
    backend returns the last state in float32, equal to the float32 computation on the same (rounded)
    inputs, and the gradient of the initial state in float32."""
    if backend == "cpp" and not cpp_backend.is_available():
        pytest.skip("the C++ scan could not be built here")
    torch.manual_seed(0)
    b, d, L, N = 2, 6, 9, 3
    u, delta, z = (torch.randn(b, d, L).to(torch.bfloat16) for _ in range(3))
    B, C = (torch.randn(b, N, L).to(torch.bfloat16) for _ in range(2))
    A = -torch.rand(d, N) - 0.5
    h0 = torch.randn(b, d, N, requires_grad=True)
    y, last = selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, return_last_state=True,
                             initial_state=h0, backend=backend)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    want_y, want_last = selective_scan_ref(u.float(), delta.float(), A, B.float(), C.float(), z=z.float(),
                                           delta_softplus=True, return_last_state=True, initial_state=h0)
    torch.testing.assert_close(last, want_last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), want_y, atol=1e-2, rtol=1e-2)
    (g,) = torch.autograd.grad(last.sum(), h0)
    assert g.dtype == torch.float32


def _channel_last_views(leaves, rank, d_state):
    """Channel-last arguments, as a Mamba block keeping (batch, L, channels) memory passes them: u and z are
    column slices of one (batch, L, 2 dim) in_proj output, delta is (batch, L, dim) memory, B and C are column
    slices of x_proj's (batch, L, rank + 2N) output; all seen as (batch, channels, L) views."""
    dim = leaves["xz"].shape[-1] // 2
    x_dbl = leaves["x_dbl"]
    return dict(u=leaves["xz"][..., :dim].transpose(1, 2), z=leaves["xz"][..., dim:].transpose(1, 2),
                delta=leaves["delta"].transpose(1, 2), A=leaves["A"],
                B=x_dbl[..., rank:rank + d_state].transpose(1, 2),
                C=x_dbl[..., rank + d_state:].transpose(1, 2), D=leaves["D"], delta_bias=leaves["delta_bias"],
                initial_state=leaves["initial_state"])


@pytest.mark.parametrize("grad_layout", ["like_y", "contiguous", "transposed", "expanded"])
@pytest.mark.parametrize("batch, dim, length, d_state", [(2, 12, 70, 5), (1, 9, 130, 16), (3, 20, 1, 3)])
def test_channel_last_rows_match_reference_float64(backend, grad_layout, batch, dim, length, d_state):
    """Channel-last rows (strided, read in place by the C++ kernel), on sizes that are not multiples
    of the SIMD width or of the checkpoint interval (64), with the gradient of y arriving in every layout
    autograd may hand over (an out_proj on channel-last y gives a channel-last one; y.sum() a stride-0 one)."""
    rank = 3
    g = torch.Generator().manual_seed(7)
    leaves = {"xz": torch.randn(batch, length, 2 * dim, generator=g, dtype=torch.float64),
              "delta": torch.randn(batch, length, dim, generator=g, dtype=torch.float64) * 0.5,
              "A": -torch.rand(dim, d_state, generator=g, dtype=torch.float64) * 3 - 0.1,
              "x_dbl": torch.randn(batch, length, rank + 2 * d_state, generator=g, dtype=torch.float64),
              "D": torch.randn(dim, generator=g, dtype=torch.float64),
              "delta_bias": torch.randn(dim, generator=g, dtype=torch.float64) * 0.3,
              "initial_state": torch.randn(batch, dim, d_state, generator=g, dtype=torch.float64)}
    grad_y = torch.randn(batch, dim, length, generator=g, dtype=torch.float64)
    if grad_layout == "transposed":
        grad_y = grad_y.transpose(1, 2).contiguous().transpose(1, 2)
    elif grad_layout == "expanded":
        grad_y = grad_y[:, :1, :1].expand(batch, dim, length)
    grad_last = torch.randn(batch, dim, d_state, generator=g, dtype=torch.float64)

    def run(fn):
        inputs = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        y, last = fn(**_channel_last_views(inputs, rank, d_state), delta_softplus=True, return_last_state=True)
        seed = grad_y if grad_layout != "like_y" else torch.empty_like(y).copy_(grad_y)
        grads = torch.autograd.grad((y, last), list(inputs.values()), (seed, grad_last))
        return y, last, dict(zip(inputs, grads))

    y, last, grads = run(backend_fn(backend))
    y_ref, last_ref, grads_ref = run(selective_scan_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-9, atol=1e-10)
    for name in leaves:
        assert grads[name].shape == leaves[name].shape
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_cpp_output_and_gradients_keep_the_channel_last_layout(cpp_ready):
    """Reading strided rows: y comes back channel-last for a channel-last u (so an out_proj reads it
    without a transposing copy), and each gradient in its input's layout."""
    batch, dim, length = 2, 16, 40
    u = torch.randn(batch, length, dim).transpose(1, 2).requires_grad_()
    delta = torch.randn(batch, length, dim).transpose(1, 2).requires_grad_()
    z = torch.randn(batch, dim, length).requires_grad_()  # channel-first: its gradient stays channel-first
    A, B, C = -torch.rand(dim, 4) - 0.1, torch.randn(batch, 4, length), torch.randn(batch, 4, length)
    y = selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, backend="cpp")
    assert y.transpose(1, 2).is_contiguous()
    grad_u, grad_delta, grad_z = torch.autograd.grad(y, (u, delta, z), torch.randn(batch, length, dim).transpose(1, 2))
    assert grad_u.transpose(1, 2).is_contiguous() and grad_delta.transpose(1, 2).is_contiguous()
    assert grad_z.is_contiguous()
