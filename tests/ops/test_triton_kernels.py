"""Triton kernels (ops/mamba/triton*.py, ops/mamba2/triton*.py, ops/conv1d/triton.py) against the sequential references, on outputs, final states and every
gradient, in float32 (relative error <= 1e-3) and bfloat16 (<= 2e-2), at awkward sizes.

Without a GPU the kernels run on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before
triton is imported) at small sizes; with one (torch.cuda.is_available()) the same tests run compiled on the
GPU at larger sizes. The relative error is ||fast - ref|| / ||ref||, the reference in float64 computed from
the same (rounded) inputs and the same output gradients.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

ON_GPU = torch.cuda.is_available()
pytest.importorskip("triton", reason="the triton package is not installed")

from ssmkit.ops._triton import load_kernels  # noqa: E402
from ssmkit.ops.conv1d import (causal_conv1d_ref, causal_conv1d_triton, causal_conv1d_update,  # noqa: E402
                               causal_conv1d_update_triton)
from ssmkit.ops.mamba import (selective_scan_ref, selective_scan_triton, selective_state_update_ref,  # noqa: E402
                              selective_state_update_triton)
from ssmkit.ops.mamba2 import ssd_ref, ssd_state_update_ref, ssd_state_update_triton, ssd_triton  # noqa: E402

#: on the CPU, Triton's interpreter runs the kernels in Python (~70 s for this file on 2 cores)
pytestmark = pytest.mark.slow

DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


def rel_err(actual, expected) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_all_close(named_actual, named_expected, tol):
    errors = {name: rel_err(a, e) for (name, a), e in zip(named_actual, named_expected)}
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


def grads(outputs, seeds, inputs):
    loss = sum((o.double() * s.double()).sum() for o, s in zip(outputs, seeds))
    return torch.autograd.grad(loss, inputs)


def leaf(t, dtype):
    return t.to(DEVICE, dtype).requires_grad_()


def as_reference(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


# --------------------------------------------------------------------------------------------------
# Selective scan
# --------------------------------------------------------------------------------------------------
# (batch, dim, groups or None for 3-D B/C, L, N, with D/z/bias/softplus/h0, tile overrides on the interpreter)
SCAN_CASES_CPU = [  # small tiles, so that the interpreter crosses several tiles and state blocks
    dict(batch=2, dim=6, groups=2, L=37, N=5, full=True, cfg=dict(T=16, BLOCK_N=4, BLOCK_D=4)),
    dict(batch=1, dim=5, groups=None, L=19, N=3, full=False, cfg=dict(T=16, BLOCK_N=4, BLOCK_D=4)),
    dict(batch=1, dim=3, groups=None, L=1, N=4, full=True, cfg=dict(T=16, BLOCK_N=4, BLOCK_D=4)),
]
SCAN_CASES_GPU = [
    dict(batch=2, dim=96, groups=2, L=600, N=16, full=True, cfg={}),
    dict(batch=2, dim=64, groups=None, L=777, N=64, full=True, cfg={}),
    dict(batch=3, dim=60, groups=None, L=63, N=7, full=False, cfg={}),
    dict(batch=1, dim=32, groups=4, L=1, N=16, full=True, cfg={}),
]
SCAN_CASES = SCAN_CASES_GPU if ON_GPU else SCAN_CASES_CPU


def _scan_inputs(case, dtype):
    b, d, g, L, N = case["batch"], case["dim"], case["groups"], case["L"], case["N"]
    bc_shape = (b, N, L) if g is None else (b, g, N, L)
    ins = dict(u=torch.randn(b, d, L), delta=torch.randn(b, d, L) * 0.5, A=-torch.rand(d, N) * 2 - 0.1,
               B=torch.randn(bc_shape), C=torch.randn(bc_shape))
    if case["full"]:
        ins.update(D=torch.randn(d), z=torch.randn(b, d, L), delta_bias=torch.randn(d) * 0.5,
                   initial_state=torch.randn(b, d, N))
    return {k: leaf(v, dtype) for k, v in ins.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(len(SCAN_CASES)))
def test_selective_scan_matches_reference(case, dtype):
    case = SCAN_CASES[case]
    ins = _scan_inputs(case, dtype)
    kw = dict(delta_softplus=case["full"], return_last_state=True)
    with load_kernels("ssmkit.ops.mamba.triton").override_config(**case["cfg"]):
        y, last = selective_scan_triton(**ins, **kw)
        seeds = [torch.randn_like(y), torch.randn_like(last)]
        g_fast = grads([y, last], seeds, list(ins.values()))
    ref_ins = dict(zip(ins, as_reference(ins.values())))
    y_ref, last_ref = selective_scan_ref(**ref_ins, **kw)
    g_ref = grads([y_ref, last_ref], seeds, list(ref_ins.values()))
    # the last state comes back in the compute dtype: float32 for half-precision inputs (as mamba_ssm's)
    assert y.dtype == dtype and last.dtype == torch.promote_types(dtype, torch.float32)
    assert_all_close([("y", y), ("last_state", last)] + [(f"d{k}", g) for k, g in zip(ins, g_fast)],
                     [y_ref, last_ref] + list(g_ref), TOL[dtype])


def test_selective_scan_inference_path_matches_training_path():
    """Without autograd the forward skips the checkpoints and gates in the kernel: same numbers."""
    case = SCAN_CASES[0]
    ins = _scan_inputs(case, torch.float32)
    with load_kernels("ssmkit.ops.mamba.triton").override_config(**case["cfg"]):
        y_train = selective_scan_triton(**ins, delta_softplus=True)
        with torch.no_grad():
            y_infer = selective_scan_triton(**ins, delta_softplus=True)
    assert y_train.requires_grad and not y_infer.requires_grad
    assert rel_err(y_infer, y_train) <= 1e-6


# --------------------------------------------------------------------------------------------------
# SSD
# --------------------------------------------------------------------------------------------------
SSD_CASES_CPU = [
    dict(batch=2, L=37, H=4, P=12, G=2, N=10, chunk=20, full=True, seq=True, cfg=dict(BLOCK_M=16, BLOCK_K=16,
                                                                                       BLOCK_PN=64)),
    dict(batch=1, L=23, H=2, P=8, G=1, N=5, chunk=16, full=False, seq=False, cfg=dict(BLOCK_M=16, BLOCK_K=16)),
]
SSD_CASES_GPU = [
    dict(batch=2, L=600, H=8, P=64, G=2, N=64, chunk=256, full=True, seq=True, cfg={}),
    dict(batch=2, L=777, H=4, P=48, G=1, N=128, chunk=100, full=True, seq=False, cfg={}),
    dict(batch=3, L=63, H=6, P=60, G=3, N=17, chunk=32, full=False, seq=False, cfg={}),
    dict(batch=1, L=1, H=4, P=64, G=1, N=64, chunk=256, full=True, seq=False, cfg={}),
]
SSD_CASES = SSD_CASES_GPU if ON_GPU else SSD_CASES_CPU


def _ssd_inputs(case, dtype):
    b, L, H, P, G, N = (case[k] for k in ("batch", "L", "H", "P", "G", "N"))
    ins = dict(x=leaf(torch.randn(b, L, H, P), dtype), dt=leaf(torch.randn(b, L, H) * 0.5, dtype),
               # A, D, dt_bias and the initial state stay float32, as mamba_ssm keeps them under bf16
               A=leaf(-torch.rand(H) * 2 - 0.2, torch.float32),
               B=leaf(torch.randn(b, L, G, N), dtype), C=leaf(torch.randn(b, L, G, N), dtype))
    kw = dict(dt_softplus=True)
    if case["full"]:
        ins.update(D=leaf(torch.randn(H, P), torch.float32), z=leaf(torch.randn(b, L, H, P), dtype),
                   dt_bias=leaf(torch.randn(H) * 0.5, torch.float32),
                   initial_states=leaf(torch.randn(b, H, P, N), torch.float32))
        kw["dt_limit"] = (0.05, 2.0)
    else:
        ins["D"] = leaf(torch.randn(H), torch.float32)
    if case["seq"]:
        seq = torch.zeros(b, L, dtype=torch.long)
        seq[0, L // 4:] = 1
        seq[0, L // 2 + 1:] = 3
        seq[-1, L - 2:] = 7
        kw["seq_idx"] = seq.to(DEVICE)
    return ins, kw


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(len(SSD_CASES)))
def test_ssd_matches_reference(case, dtype):
    case = SSD_CASES[case]
    ins, kw = _ssd_inputs(case, dtype)
    names = list(ins)
    with load_kernels("ssmkit.ops.mamba2.triton").override_config(**case["cfg"]):
        y, final = ssd_triton(chunk_size=case["chunk"], return_final_states=True, **ins, **kw)
        seeds = [torch.randn_like(y), torch.randn_like(final)]
        g_fast = grads([y, final], seeds, list(ins.values()))
    ref_ins = dict(zip(names, as_reference(ins.values())))
    y_ref, final_ref = ssd_ref(chunk_size=case["chunk"], return_final_states=True, **ref_ins, **kw)
    g_ref = grads([y_ref, final_ref], seeds, list(ref_ins.values()))
    assert y.dtype == dtype and final.dtype == torch.float32
    assert_all_close([("y", y), ("final_states", final)] + [(f"d{k}", g) for k, g in zip(names, g_fast)],
                     [y_ref, final_ref] + list(g_ref), TOL[dtype])


def test_ssd_result_does_not_depend_on_chunk_size():
    case = SSD_CASES[0]
    ins, kw = _ssd_inputs(case, torch.float32)
    with torch.no_grad(), load_kernels("ssmkit.ops.mamba2.triton").override_config(**case["cfg"]):
        outs = [ssd_triton(chunk_size=q, **ins, **kw) for q in (case["chunk"], 16)]
    assert rel_err(outs[0], outs[1]) <= 1e-5


# --------------------------------------------------------------------------------------------------
# Causal conv1d
# --------------------------------------------------------------------------------------------------
CONV_CASES = ([dict(batch=2, dim=300, L=1000, width=4), dict(batch=3, dim=60, L=63, width=3)] if ON_GPU else
              [dict(batch=2, dim=20, L=37, width=4), dict(batch=1, dim=7, L=5, width=2)])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("variant", ["silu_state_seq", "plain"])
def test_causal_conv1d_matches_reference(variant, case, dtype, monkeypatch):
    case = CONV_CASES[case]
    if not ON_GPU:  # small blocks so that the interpreter crosses block edges
        monkeypatch.setattr(load_kernels("ssmkit.ops.conv1d.triton"), "_BLOCK_L", 16)
        monkeypatch.setattr(load_kernels("ssmkit.ops.conv1d.triton"), "_BLOCK_D", 16)
    b, d, L, W = case["batch"], case["dim"], case["L"], case["width"]
    x = leaf(torch.randn(b, L, d), dtype).transpose(1, 2)          # a (batch, dim, L) view, as in Mamba
    ins = dict(x=x, weight=leaf(torch.randn(d, 1, W), dtype))
    kw = dict(return_final_state=True)
    if variant == "silu_state_seq":
        ins.update(bias=leaf(torch.randn(d), dtype), initial_state=leaf(torch.randn(b, d, W - 1), dtype))
        seq = torch.zeros(b, L, dtype=torch.long)
        seq[0, 1:] = 1
        seq[0, L // 2:] = 2
        kw.update(activation="silu", seq_idx=seq.to(DEVICE))
    names = list(ins)
    y, final = causal_conv1d_triton(**ins, **kw)
    seeds = [torch.randn_like(y), torch.randn_like(final)]
    g_fast = grads([y, final], seeds, list(ins.values()))
    ref_ins = dict(zip(names, as_reference(ins.values())))
    y_ref, final_ref = causal_conv1d_ref(**ref_ins, **kw)
    g_ref = grads([y_ref, final_ref], seeds, list(ref_ins.values()))
    assert_all_close([("y", y), ("final_state", final)] + [(f"d{k}", g) for k, g in zip(names, g_fast)],
                     [y_ref, final_ref] + list(g_ref), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_causal_conv1d_update_with_batch_indices(dtype):
    dim, W = (300, 4) if ON_GPU else (20, 4)
    x = torch.randn(3, dim, device=DEVICE, dtype=dtype)
    cache = torch.randn(5, dim, W - 1, device=DEVICE, dtype=dtype)
    w = torch.randn(dim, W, device=DEVICE, dtype=dtype)
    bias = torch.randn(dim, device=DEVICE, dtype=dtype)
    idx = torch.tensor([4, 0, 2], device=DEVICE)
    y_ref, s_ref = causal_conv1d_update(x.double(), cache[idx].double(), w.double(), bias.double(), "silu")
    with torch.no_grad():
        y, new = causal_conv1d_update_triton(x, cache, w, bias, "silu", state_batch_indices=idx)
        assert rel_err(y, y_ref) <= TOL[dtype] and rel_err(new[idx], s_ref) <= TOL[dtype]
        assert torch.equal(new[[1, 3]], cache[[1, 3]])                 # untouched rows kept
        in_place = cache.clone()
        y2, out = causal_conv1d_update_triton(x, in_place, w, bias, "silu", state_batch_indices=idx,
                                                 inplace=True)
    assert out is in_place and torch.equal(y2, y) and torch.equal(in_place, new)


# --------------------------------------------------------------------------------------------------
# One-token state updates
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("indexed", [False, True], ids=["plain", "batch_indices"])
def test_selective_state_update_matches_reference(indexed, dtype):
    b, d, N, G = (4, 96, 16, 2) if ON_GPU else (3, 12, 5, 2)
    rows = b + 2 if indexed else b
    state = torch.randn(rows, d, N, device=DEVICE, dtype=dtype)
    args = dict(x=torch.randn(b, d), dt=torch.randn(b, d), A=-torch.rand(d, N) * 2, B=torch.randn(b, G, N),
                C=torch.randn(b, G, N), D=torch.randn(d), z=torch.randn(b, d), dt_bias=torch.randn(d))
    args = {k: v.to(DEVICE, dtype) for k, v in args.items()}
    idx = torch.randperm(rows, device=DEVICE)[:b] if indexed else None
    rows_used = idx if indexed else torch.arange(b, device=DEVICE)
    y_ref, s_ref = selective_state_update_ref(state[rows_used].double(), **{k: v.double() for k, v in args.items()},
                                              dt_softplus=True)
    with torch.no_grad():
        y, new = selective_state_update_triton(state, **args, dt_softplus=True, state_batch_indices=idx)
        work = state.clone()
        y2, out = selective_state_update_triton(work, **args, dt_softplus=True, state_batch_indices=idx,
                                                   inplace=True)
    assert y.dtype == dtype and new.dtype == dtype
    assert rel_err(y, y_ref) <= TOL[dtype] and rel_err(new[rows_used], s_ref) <= TOL[dtype]
    assert out is work and torch.equal(work, new) and torch.equal(y2, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("indexed", [False, True], ids=["plain", "batch_indices"])
def test_ssd_state_update_matches_reference(indexed, dtype):
    b, H, P, N, G = (4, 8, 64, 128, 2) if ON_GPU else (3, 4, 6, 5, 2)
    rows = b + 2 if indexed else b
    state = torch.randn(rows, H, P, N, device=DEVICE, dtype=torch.float32)
    args = dict(x=torch.randn(b, H, P).to(DEVICE, dtype), dt=torch.randn(b, H).to(DEVICE, dtype),
                A=(-torch.rand(H) * 2).to(DEVICE), B=torch.randn(b, G, N).to(DEVICE, dtype),
                C=torch.randn(b, G, N).to(DEVICE, dtype), D=torch.randn(H, P).to(DEVICE),
                z=torch.randn(b, H, P).to(DEVICE, dtype), dt_bias=torch.randn(H).to(DEVICE))
    idx = torch.randperm(rows, device=DEVICE)[:b] if indexed else None
    rows_used = idx if indexed else torch.arange(b, device=DEVICE)
    limit = (0.05, 1.5)
    y_ref, s_ref = ssd_state_update_ref(state[rows_used].double(), **{k: v.double() for k, v in args.items()},
                                        dt_softplus=True, dt_limit=limit)
    with torch.no_grad():
        y, new = ssd_state_update_triton(state, **args, dt_softplus=True, dt_limit=limit,
                                            state_batch_indices=idx)
    assert y.dtype == dtype and new.dtype == torch.float32
    assert rel_err(y, y_ref) <= TOL[dtype] and rel_err(new[rows_used], s_ref) <= TOL[dtype]


# --------------------------------------------------------------------------------------------------
# Errors and the optional dependency
# --------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    u = torch.randn(1, 4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        selective_scan_triton(u.double(), u.double(), torch.randn(4, 3, device=DEVICE, dtype=torch.float64),
                                 torch.randn(1, 3, 8, device=DEVICE, dtype=torch.float64),
                                 torch.randn(1, 3, 8, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_triton(u, u, torch.randn(4, 3, device=DEVICE), torch.randn(1, 3, 7, device=DEVICE),
                                 torch.randn(1, 3, 8, device=DEVICE))
    x = torch.randn(2, 4, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        causal_conv1d_update_triton(x, torch.randn(2, 4, 3, device=DEVICE), torch.randn(4, 4, device=DEVICE))
    with torch.no_grad(), pytest.raises(ValueError, match="state_batch_indices must lie in"):
        causal_conv1d_update_triton(x, torch.randn(2, 4, 3, device=DEVICE), torch.randn(4, 4, device=DEVICE),
                                       state_batch_indices=torch.tensor([0, 2], device=DEVICE))


def test_import_is_lazy_and_cpu_without_interpreter_is_refused():
    code = textwrap.dedent("""
        import os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        import torch, ssmkit
        import ssmkit.ops._triton as tk
        from ssmkit.ops.mamba import selective_scan_triton
        assert "triton" not in sys.modules, "importing ssmkit imported triton"
        assert not tk.triton_available("cpu")
        try:
            selective_scan_triton(torch.randn(1, 2, 3), torch.randn(1, 2, 3), -torch.rand(2, 4),
                                     torch.randn(1, 4, 3), torch.randn(1, 4, 3))
        except RuntimeError as e:
            assert "TRITON_INTERPRET" in str(e), e
        else:
            raise AssertionError("CPU tensors ran without the interpreter")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_backend_argument_dispatches_to_triton_explicitly():
    """backend="triton" reaches the kernels through the public ops, and last_backend() says so."""
    from ssmkit.ops.mamba import last_backend, selective_scan
    from ssmkit.ops.mamba2 import last_backend as ssd_last_backend
    from ssmkit.ops.mamba2 import ssd, ssd_ref

    g = torch.Generator().manual_seed(0)
    on = dict(device=DEVICE)  # CUDA tensors on a GPU machine, CPU tensors under the interpreter elsewhere
    u, delta = torch.randn(1, 4, 9, generator=g).to(**on), torch.rand(1, 4, 9, generator=g).to(**on)
    A = (-torch.rand(4, 3, generator=g) - 0.5).to(**on)
    B, C = torch.randn(1, 3, 9, generator=g).to(**on), torch.randn(1, 3, 9, generator=g).to(**on)
    y = selective_scan(u, delta, A, B, C, backend="triton")
    assert last_backend() == "triton"
    torch.testing.assert_close(y, selective_scan(u, delta, A, B, C, backend="reference"), atol=1e-4, rtol=1e-3)
    x, dt = torch.randn(1, 9, 2, 4, generator=g).to(**on), torch.rand(1, 9, 2, generator=g).to(**on)
    A2, B2, C2 = ((-torch.rand(2, generator=g) - 0.5).to(**on), torch.randn(1, 9, 1, 3, generator=g).to(**on),
                  torch.randn(1, 9, 1, 3, generator=g).to(**on))
    y2 = ssd(x, dt, A2, B2, C2, 4, backend="triton")
    assert ssd_last_backend() == "triton"
    torch.testing.assert_close(y2, ssd_ref(x, dt, A2, B2, C2, 4), atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(ON_GPU, reason="the interpreter's shims exist only on the CPU")
def test_interpreter_runs_the_real_associative_scan_combine():
    """The vectorised shim stands in for ``tl.associative_scan`` in the other interpreter tests; here the
    scan kernels run Triton's own element-by-element path with our real ``linear_combine`` (tiny sizes)."""
    from ssmkit.ops._triton import real_associative_scan

    case = dict(batch=1, dim=2, groups=None, L=5, N=2, full=True, cfg=dict(T=16, BLOCK_N=2, BLOCK_D=2))
    ins = _scan_inputs(case, torch.float32)
    with real_associative_scan(), load_kernels("ssmkit.ops.mamba.triton").override_config(**case["cfg"]):
        out = selective_scan_triton(**ins, delta_softplus=True, return_last_state=True)
    ref = selective_scan_ref(**{k: v.detach().double() for k, v in ins.items()}, delta_softplus=True,
                             return_last_state=True)
    assert_all_close([("y", out[0]), ("last", out[1])], ref, TOL[torch.float32])


def test_interpreter_shims_refuse_an_unknown_triton(monkeypatch):
    """The shims patch private Triton classes: an unknown release gets one clear error, not silent damage."""
    import triton

    from ssmkit.ops._triton import _check_interpreter_version

    monkeypatch.setattr(triton, "__version__", "9.9.0")
    with pytest.raises(RuntimeError, match=r"known to work with triton 3\.6\.x; found triton 9\.9\.0"):
        _check_interpreter_version()
