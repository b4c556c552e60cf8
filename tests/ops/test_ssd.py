"""Mamba-2 SSD: the chunked algorithm against the sequential specification.

Outputs, final states and every gradient (including through initial_states and in through the final
states) are compared in float64 on awkward sizes; packed sequences must equal separate runs; the one-token
update must reproduce the scan.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops.mamba2 import last_backend, ssd, ssd_ref, ssd_state_update, ssd_state_update_ref
from ssmkit.ops.mamba2.chunked import ssd_chunked

F64 = dict(dtype=torch.float64)
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def make_inputs(batch=2, length=63, heads=6, headdim=5, groups=2, N=7, D_shape="heads", seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    kw = dict(dtype=dtype, generator=g)
    D = torch.randn(heads, **kw) if D_shape == "heads" else torch.randn(heads, headdim, **kw)
    return dict(
        x=torch.randn(batch, length, heads, headdim, **kw),
        dt=torch.randn(batch, length, heads, **kw),            # raw: softplus(dt + dt_bias) is applied
        A=-torch.rand(heads, **kw) * 3 - 0.1,
        B=torch.randn(batch, length, groups, N, **kw),
        C=torch.randn(batch, length, groups, N, **kw),
        D=D,
        z=torch.randn(batch, length, heads, headdim, **kw),
        dt_bias=torch.randn(heads, **kw) * 0.5,
        initial_states=torch.randn(batch, heads, headdim, N, **kw),
    )


def run_with_grads(fn, inputs, chunk_size, seq_idx=None, seed=1, **options):
    """Run fn on leaf copies of inputs, backprop random cotangents of y and of the final states."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, final = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size,
                  D=leaves.get("D"), z=leaves.get("z"), dt_bias=leaves.get("dt_bias"), dt_softplus=True,
                  initial_states=leaves.get("initial_states"), seq_idx=seq_idx, return_final_states=True,
                  **options)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, dtype=y.dtype, generator=g)
    gfinal = torch.randn(final.shape, dtype=final.dtype, generator=g)
    ((y * gy).sum() + (final * gfinal).sum()).backward()
    return y.detach(), final.detach(), {k: v.grad for k, v in leaves.items()}


def assert_all_close(got, want, atol=1e-10, rtol=1e-9):
    y1, f1, g1 = got
    y2, f2, g2 = want
    torch.testing.assert_close(y1, y2, atol=atol, rtol=rtol, msg=lambda m: "y: " + m)
    torch.testing.assert_close(f1, f2, atol=atol, rtol=rtol, msg=lambda m: "final states: " + m)
    assert set(g1) == set(g2)
    for name in g1:
        assert g1[name] is not None and g2[name] is not None, name
        assert g1[name].abs().sum() > 0, f"gradient of {name} is zero: the test would not catch a bug"
        torch.testing.assert_close(g1[name], g2[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")


def random_seq_idx(batch, length, sequences=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randint(0, sequences, (batch, length), generator=g), dim=1).values


# ------------------------------------------------------------------------------------------------
# chunked == reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 63, 130])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("groups,D_shape", [(2, "heads"), (3, "heads_headdim")])
def test_chunked_matches_reference(length, chunk_size, groups, D_shape):
    inputs = make_inputs(length=length, groups=groups, D_shape=D_shape, seed=length + chunk_size)
    assert_all_close(run_with_grads(ssd_chunked, inputs, chunk_size), run_with_grads(ssd_ref, inputs, chunk_size))


@pytest.mark.parametrize("length,chunk_size", [(63, 16), (130, 64), (40, 7)])
def test_chunked_matches_reference_with_seq_idx(length, chunk_size):
    inputs = make_inputs(length=length, groups=3, seed=7)
    seq_idx = random_seq_idx(2, length, sequences=5, seed=length)
    seq_idx[1] = 0                                   # a row holding one sequence next to a packed one
    assert_all_close(run_with_grads(ssd_chunked, inputs, chunk_size, seq_idx),
                     run_with_grads(ssd_ref, inputs, chunk_size, seq_idx))


def test_optional_inputs_absent():
    inputs = make_inputs(length=50)
    kept = {k: inputs[k] for k in ("x", "dt", "A", "B", "C")}
    assert_all_close(run_with_grads(ssd_chunked, kept, 16), run_with_grads(ssd_ref, kept, 16))


def test_result_does_not_depend_on_chunk_size():
    inputs = make_inputs(length=37)
    want = ssd_ref(**inputs, chunk_size=None, dt_softplus=True, return_final_states=True)
    for chunk_size in (1, 5, 36, 37, 38, 1000):
        got = ssd(**inputs, chunk_size=chunk_size, dt_softplus=True, return_final_states=True)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 2), length=st.integers(1, 40), groups=st.integers(1, 3), ratio=st.integers(1, 3),
       headdim=st.integers(1, 4), N=st.integers(1, 5), chunk_size=st.integers(1, 20), packed=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_shapes(batch, length, groups, ratio, headdim, N, chunk_size, packed, seed):
    inputs = make_inputs(batch=batch, length=length, heads=groups * ratio, headdim=headdim, groups=groups, N=N,
                         D_shape="heads" if seed % 2 else "heads_headdim", seed=seed)
    seq_idx = random_seq_idx(batch, length, 3, seed) if packed else None
    assert_all_close(run_with_grads(ssd_chunked, inputs, chunk_size, seq_idx),
                     run_with_grads(ssd_ref, inputs, chunk_size, seq_idx))


# ------------------------------------------------------------------------------------------------
# packed sequences
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [ssd_chunked, ssd_ref], ids=["chunked", "reference"])
def test_packed_equals_each_sequence_alone(fn):
    lengths = [5, 17, 1, 30]                          # boundaries inside chunks and on a chunk edge (16)
    total = sum(lengths)
    inputs = make_inputs(batch=1, length=total, seed=3)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    y, final = fn(**inputs, chunk_size=16, dt_softplus=True, seq_idx=seq_idx, return_final_states=True)
    start = 0
    for i, n in enumerate(lengths):
        part = {k: (v[:, start:start + n] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
        if i > 0:                                     # the initial state belongs to the first sequence only
            part["initial_states"] = None
        y_alone, final_alone = ssd_ref(**part, dt_softplus=True, return_final_states=True)
        torch.testing.assert_close(y[:, start:start + n], y_alone, atol=1e-10, rtol=1e-9)
        start += n
    torch.testing.assert_close(final, final_alone, atol=1e-10, rtol=1e-9)


def test_seq_idx_with_constant_id_changes_nothing():
    inputs = make_inputs(length=45)
    seq_idx = torch.full((2, 45), 3)
    want = ssd(**inputs, chunk_size=16, dt_softplus=True, return_final_states=True)
    got = ssd(**inputs, chunk_size=16, dt_softplus=True, seq_idx=seq_idx, return_final_states=True)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# dt preprocessing, dtypes, stability, memory
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [ssd_chunked, ssd_ref], ids=["chunked", "reference"])
def test_dt_limit_clamps_after_softplus(fn):
    inputs = make_inputs(length=33)
    limit = (0.3, 0.9)
    dt_eff = torch.nn.functional.softplus(inputs["dt"] + inputs["dt_bias"]).clamp(*limit)
    assert (dt_eff == limit[0]).any() and (dt_eff == limit[1]).any(), "both bounds must be hit"
    got = fn(**inputs, chunk_size=8, dt_softplus=True, dt_limit=limit, return_final_states=True)
    plain = dict(inputs, dt=dt_eff, dt_bias=None)
    want = ssd_ref(**plain, return_final_states=True)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    unclamped = fn(**inputs, chunk_size=8, dt_softplus=True)
    assert not torch.allclose(unclamped, got[0])


def test_dtypes_follow_x():
    inputs = make_inputs(length=20, dtype=torch.float32)
    y, final = ssd(**inputs, chunk_size=8, dt_softplus=True, return_final_states=True)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    want = ssd_ref(**{k: v.double() for k, v in inputs.items()}, dt_softplus=True, return_final_states=True)
    torch.testing.assert_close(y.double(), want[0], atol=1e-4, rtol=1e-4)
    bf16 = {k: (v.bfloat16() if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
    y16, final16 = ssd(**bf16, chunk_size=8, dt_softplus=True, return_final_states=True)
    assert y16.dtype == torch.bfloat16 and final16.dtype == torch.float32


def test_strong_decay_is_finite():
    """Large dt*A would overflow exp() of the unmasked upper triangle; results and gradients stay finite."""
    inputs = make_inputs(length=70, dtype=torch.float32)
    inputs["A"] = torch.full_like(inputs["A"], -60.0)
    inputs["dt"] = inputs["dt"].abs() * 20
    got = run_with_grads(ssd_chunked, inputs, 64)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert all(torch.isfinite(g).all() for g in got[2].values())
    want = run_with_grads(ssd_ref, {k: v.double() for k, v in inputs.items()}, 64)
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-3, rtol=1e-3)


def test_no_full_state_tensor_saved():
    """Autograd keeps nothing of size (batch, L, heads, headdim, N) for the backward."""
    batch, length, heads, headdim, N = 1, 256, 2, 4, 8
    inputs = make_inputs(batch=batch, length=length, heads=heads, headdim=headdim, groups=1, N=N)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    largest = []

    def pack(t):
        largest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ssd_chunked(**leaves, chunk_size=64, dt_softplus=True)
    assert max(largest) < batch * length * heads * headdim * N / 4


# ------------------------------------------------------------------------------------------------
# one-token update
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D_shape", ["heads", "heads_headdim"])
def test_state_update_loop_equals_scan(D_shape):
    inputs = make_inputs(length=21, groups=3, D_shape=D_shape)
    limit = (0.05, 2.0)
    y, final = ssd(**inputs, chunk_size=8, dt_softplus=True, dt_limit=limit, return_final_states=True)
    state = inputs["initial_states"].clone()
    state_ref = state.clone()
    for t in range(21):
        token = {k: inputs[k][:, t] for k in ("x", "dt", "B", "C", "z")}
        before = state.clone()
        y_t, state_next = ssd_state_update(state, **token, A=inputs["A"], D=inputs["D"], dt_bias=inputs["dt_bias"],
                                           dt_softplus=True, dt_limit=limit)
        assert torch.equal(state, before), "the input state must not be modified"
        y_ref, state_ref = ssd_state_update_ref(state_ref, **token, A=inputs["A"], D=inputs["D"],
                                                dt_bias=inputs["dt_bias"], dt_softplus=True, dt_limit=limit)
        torch.testing.assert_close(y_t, y[:, t], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(y_ref, y_t, atol=1e-12, rtol=1e-12)
        state = state_next
    torch.testing.assert_close(state, final, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(state_ref, final, atol=1e-10, rtol=1e-9)


def test_state_update_gradients_match_reference():
    inputs = make_inputs(length=1, groups=2)
    token = {k: inputs[k][:, 0] for k in ("x", "dt", "B", "C", "z")}
    args = dict(token, state=inputs["initial_states"], A=inputs["A"], D=inputs["D"], dt_bias=inputs["dt_bias"])
    grads = []
    for fn in (ssd_state_update, ssd_state_update_ref):
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
        y, s = fn(**leaves, dt_softplus=True)
        (y.sum() + (s * s).sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in args:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# backends and bad input
# ------------------------------------------------------------------------------------------------
def test_backends_are_explicit():
    inputs = make_inputs(length=10)
    y_torch = ssd(**inputs, chunk_size=4, backend="torch")
    assert last_backend() == "torch"
    y_ref = ssd(**inputs, chunk_size=4, backend="reference")
    assert last_backend() == "reference"
    ssd(**inputs, chunk_size=4)
    assert last_backend() == "torch"
    torch.testing.assert_close(y_torch, y_ref, atol=1e-10, rtol=1e-9)
    with pytest.raises(ValueError, match="backend"):
        ssd(**inputs, chunk_size=4, backend="cuda")


def _bad(**changes):
    return changes


BAD_INPUTS = [
    (_bad(x=torch.zeros(2, 10, 6)), ValueError, r"x must be \(batch, L, heads, headdim\)"),
    (_bad(x=torch.zeros(2, 10, 6, 5, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    (_bad(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (_bad(dt=torch.zeros(2, 10, 5, **F64)), ValueError, r"dt must be .*got \(2, 10, 5\)"),
    (_bad(dt=torch.zeros(2, 10, 6)), TypeError, "dt must have the dtype of x"),
    (_bad(A=torch.zeros(6, 1, **F64)), ValueError, r"A must be \(heads=6,\)"),
    (_bad(A=torch.zeros(6, device="meta", **F64)), ValueError, "A is on meta but x is on cpu"),
    (_bad(B=torch.zeros(2, 10, 4, 7, **F64), C=torch.zeros(2, 10, 4, 7, **F64)), ValueError,
     "groups must divide heads=6"),
    (_bad(B=torch.zeros(2, 9, 2, 7, **F64)), ValueError, "B must be"),
    (_bad(C=torch.zeros(2, 10, 2, 6, **F64)), ValueError, r"C must be .*N=7"),
    (_bad(D=torch.zeros(5, **F64)), ValueError, r"D must be \(heads=6,\) or \(heads=6, headdim=5\)"),
    (_bad(z=torch.zeros(2, 10, 6, 4, **F64)), ValueError, "z must be"),
    (_bad(dt_bias=torch.zeros(5, **F64)), ValueError, "dt_bias must be"),
    (_bad(initial_states=torch.zeros(2, 6, 5, 6, **F64)), ValueError,
     r"initial_states must be \(batch=2, heads=6, headdim=5, N=7\)"),
    (_bad(seq_idx=torch.tensor([[0] * 5 + [1] * 5, [0] * 4 + [2, 1] + [2] * 4])), ValueError,
     "seq_idx must be non-decreasing.*row 1"),
    (_bad(seq_idx=torch.zeros(2, 10)), TypeError, "seq_idx must be an integer tensor"),
    (_bad(seq_idx=torch.zeros(2, 9, dtype=torch.long)), ValueError, r"seq_idx must be \(batch=2, L=10\)"),
    (_bad(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (_bad(chunk_size=4.0), TypeError, "chunk_size must be an int"),
    (_bad(dt_limit=(1.0, 0.5)), ValueError, "dt_limit must be"),
    (_bad(dt_limit=3.0), TypeError, "dt_limit must be a pair"),
    (_bad(x=torch.zeros(2, 0, 6, 5, **F64), dt=torch.zeros(2, 0, 6, **F64), B=torch.zeros(2, 0, 2, 7, **F64),
          C=torch.zeros(2, 0, 2, 7, **F64), z=None), ValueError, "L >= 1"),
]


@pytest.mark.parametrize("fn", [ssd, ssd_ref], ids=["ssd", "ssd_ref"])
@pytest.mark.parametrize("changes,error,match", BAD_INPUTS,
                         ids=[f"{m.split()[0]}-{i}" for i, (_, _, m) in enumerate(BAD_INPUTS)])
def test_bad_inputs_name_the_argument(fn, changes, error, match):
    args = dict(make_inputs(length=10, groups=2), chunk_size=4)
    args.update(changes)
    with pytest.raises(error, match=match):
        fn(**args)


def test_state_update_bad_inputs():
    inputs = make_inputs(length=1, groups=2)
    args = dict(state=inputs["initial_states"], x=inputs["x"][:, 0], dt=inputs["dt"][:, 0], A=inputs["A"],
                B=inputs["B"][:, 0], C=inputs["C"][:, 0])
    for fn in (ssd_state_update, ssd_state_update_ref):
        with pytest.raises(ValueError, match="state must be"):
            fn(**dict(args, state=args["state"][..., :3].unsqueeze(0)))
        with pytest.raises(ValueError, match=r"B must be \(batch=2, groups, N=7\)"):
            fn(**dict(args, B=args["B"][..., :3]))
        with pytest.raises(ValueError, match="groups must divide heads=6"):
            fn(**dict(args, B=torch.zeros(2, 4, 7, **F64), C=torch.zeros(2, 4, 7, **F64)))
        with pytest.raises(ValueError, match=r"dt must be \(batch=2, heads=6\)"):
            fn(**dict(args, dt=args["dt"][:, :5]))
        with pytest.raises(TypeError, match="C must have the dtype of x"):
            fn(**dict(args, C=args["C"].float()))


def test_non_contiguous_inputs():
    """Inputs sliced out of a fused projection (as in the Mamba-2 layer) are not contiguous."""
    inputs = make_inputs(length=24, groups=2)
    fused = torch.cat([inputs["B"], inputs["C"]], dim=-1)
    x_strided = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)
    sliced = dict(inputs, B=fused[..., :7], C=fused[..., 7:], x=x_strided)
    assert not sliced["B"].is_contiguous() and not sliced["x"].is_contiguous()
    got = ssd(**sliced, chunk_size=8, dt_softplus=True, return_final_states=True)
    want = ssd_ref(**inputs, dt_softplus=True, return_final_states=True)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    token = {k: sliced[k][:, 0] for k in ("x", "dt", "B", "C", "z")}
    state = inputs["initial_states"].transpose(2, 3).contiguous().transpose(2, 3)
    got = ssd_state_update(state, **token, A=inputs["A"], D=inputs["D"], dt_bias=inputs["dt_bias"], dt_softplus=True)
    want = ssd_state_update_ref(state, **token, A=inputs["A"], D=inputs["D"], dt_bias=inputs["dt_bias"],
                                dt_softplus=True)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
