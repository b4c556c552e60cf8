"""S5-specific checks (the shared contract suite covers the rest)."""

import math

import pytest
import torch

from ssmkit.layers.s5 import S5, hippo_n_diagonal
from ssmkit.ops.hippo_operators import nplr_legs

torch.set_flush_denormal(True)


def make(seed=0, d_model=6, **kw):
    torch.manual_seed(seed)
    kw.setdefault("d_state", 8)
    return S5(d_model, **kw).double()


def run_steps(mixer, x, state):
    ys = []
    for x_t in x.unbind(1):
        y_t, state = mixer.step(x_t, state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("config", [
    dict(),
    dict(conj_sym=False),
    dict(discretization="bilinear"),
    dict(d_state=12, blocks=3),
    dict(d_state=9, blocks=3, conj_sym=False),  # odd blocks: one real eigenvalue each
    dict(activation="gelu"), dict(activation="half_glu2"), dict(activation="full_glu"), dict(activation="none"),
    dict(clip_eigs=True, rate=0.3),
], ids=str)
def test_forward_equals_step_float64(config):
    mixer = make(**config)
    x = torch.randn(2, 63, 6, dtype=torch.float64)
    h0 = mixer.init_state(2)
    h0["s5.h"] = torch.randn_like(h0["s5.h"])
    with torch.no_grad():
        y, state = mixer(x, h0, return_state=True)
        y_steps, state_steps = run_steps(mixer, x, h0)
    torch.testing.assert_close(y, y_steps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["s5.h"], state_steps["s5.h"], rtol=1e-12, atol=1e-12)


def test_scan_backends_agree():
    mixer = make()
    x = torch.randn(2, 100, 6, dtype=torch.float64)
    outputs = {}
    for backend in ("associative", "chunked", "reference"):
        mixer.backend = backend
        outputs[backend] = mixer(x)
    torch.testing.assert_close(outputs["associative"], outputs["reference"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outputs["chunked"], outputs["reference"], rtol=1e-12, atol=1e-12)


def test_conjugate_symmetry_equals_the_full_system():
    """P/2 modes read out as 2 Re(C~ h) == all P modes (each pair expanded) read out as Re(C~ h)."""
    half = make(activation="half_glu1", d_state=8)
    full = make(activation="half_glu1", d_state=8, conj_sym=False)
    assert (half.n_modes, full.n_modes) == (4, 8)
    with torch.no_grad():
        pair = lambda re, im, sign=1: (torch.cat([re, re], -1), torch.cat([im, sign * im], -1))  # noqa: E731
        full.Lambda_re[:], full.Lambda_im[:] = pair(half.Lambda_re, half.Lambda_im, -1)
        full.log_dt[:] = torch.cat([half.log_dt, half.log_dt])
        B_re, B_im = pair(half.B_re.T, half.B_im.T, -1)
        full.B_re[:], full.B_im[:] = B_re.T, B_im.T
        full.C_re[:], full.C_im[:] = pair(half.C_re, half.C_im, -1)
        full.D[:] = half.D
        full.out_gate.load_state_dict(half.out_gate.state_dict())
    x = torch.randn(3, 40, 6, dtype=torch.float64)
    torch.testing.assert_close(full(x), half(x), rtol=1e-12, atol=1e-12)


def test_initialisation_is_diagonalised_hippo_n():
    mixer = make(d_state=16, blocks=2, conj_sym=False, dt_min=2e-3, dt_max=5e-2)
    Lambda = torch.complex(mixer.Lambda_re, mixer.Lambda_im)
    block = nplr_legs(8).Lambda
    torch.testing.assert_close(Lambda, torch.cat([block, block]).to(Lambda.dtype), rtol=0, atol=1e-6)
    assert torch.allclose(mixer.Lambda_re, torch.full_like(mixer.Lambda_re, -0.5), atol=1e-6)
    # B~ = V^{-1} B for a real B: mapping back with V gives a real matrix (C~ = C V likewise)
    _, V = hippo_n_diagonal(16, 2, conj_sym=False)
    B = V @ torch.complex(mixer.B_re, mixer.B_im).to(V.dtype)
    C = torch.complex(mixer.C_re, mixer.C_im).to(V.dtype) @ V.conj().T
    assert B.imag.abs().max() < 1e-6 and C.imag.abs().max() < 1e-6
    assert B.real.abs().max() > 0.1
    assert mixer.log_dt.min() >= math.log(2e-3) and mixer.log_dt.max() <= math.log(5e-2)
    assert mixer.log_dt.shape == (16,)
    # with conjugate symmetry: half the modes, one of each conjugate pair, still a real B
    half = make(d_state=16, blocks=2)
    assert half.n_modes == 8 and (half.Lambda_im > 0).all()
    assert half.init_state(3)["s5.h"].shape == (3, 8) and half.init_state(3)["s5.h"].is_complex()
    _, V_half = hippo_n_diagonal(16, 2, conj_sym=True)
    B_half = 2 * (V_half @ torch.complex(half.B_re, half.B_im).to(V_half.dtype)).real
    assert B_half.abs().max() > 0.1  # the real B it came from, recovered from one half of the modes


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_discretization_formulas(method):
    mixer = make(discretization=method, rate=0.7)
    Lambda_bar, B_bar = mixer.discretized()
    Lambda = torch.complex(mixer.Lambda_re, mixer.Lambda_im)
    B = torch.complex(mixer.B_re, mixer.B_im)
    step = torch.exp(mixer.log_dt) * 0.7
    if method == "zoh":
        want_A = torch.exp(Lambda * step)
        want_B = ((want_A - 1) / Lambda)[:, None] * B
    else:
        want_A = (1 + step * Lambda / 2) / (1 - step * Lambda / 2)
        want_B = (step / (1 - step * Lambda / 2))[:, None] * B
    torch.testing.assert_close(Lambda_bar, want_A)
    torch.testing.assert_close(B_bar, want_B)


def test_zoh_and_bilinear_both_run_and_agree_for_small_steps():
    x = torch.randn(2, 50, 6, dtype=torch.float64)
    small = {m: make(discretization=m, dt_min=1e-4, dt_max=2e-4, activation="none")(x) for m in ("zoh", "bilinear")}
    large = {m: make(discretization=m, dt_min=0.5, dt_max=1.0, activation="none")(x) for m in ("zoh", "bilinear")}
    for y in list(small.values()) + list(large.values()):
        assert torch.isfinite(y).all()
    scale = small["zoh"].abs().max()
    assert (small["zoh"] - small["bilinear"]).abs().max() < 1e-6 * scale
    assert (large["zoh"] - large["bilinear"]).abs().max() > 1e-2 * large["zoh"].abs().max()


def test_rate_resamples_the_continuous_system():
    """A smooth signal sampled twice as densely, run at rate 0.5, gives the same outputs at the same times."""
    mixer = make(activation="none", dt_min=0.05, dt_max=0.5, d_state=16)
    freqs = torch.tensor([0.004, 0.011, 0.017], dtype=torch.float64)
    phases = torch.rand(6, 3, dtype=torch.float64)

    def signal(times):  # (L,) -> (1, L, 6)
        return torch.sin(2 * math.pi * (times[:, None, None] * freqs + phases)).sum(-1)[None]

    coarse_t = torch.arange(1, 301, dtype=torch.float64)
    dense_t = torch.arange(1, 601, dtype=torch.float64) / 2
    with torch.no_grad():
        y_coarse = mixer(signal(coarse_t))
        mixer.rate = 0.5
        y_dense = mixer(signal(dense_t))[:, 1::2]  # times 1, 2, ..., 300
        mixer.rate = 1.0
        y_wrong = mixer(signal(dense_t))[:, 1::2]  # dense samples at the coarse rate: a time-stretched system
    scale = y_coarse.abs().max()
    err = (y_dense - y_coarse).abs().max() / scale
    err_wrong = (y_wrong - y_coarse).abs().max() / scale
    assert err < 0.01, f"rate=0.5 on dense samples differs from the coarse run by {err:.3g}"
    assert err_wrong > 10 * err


def test_rate_is_validated():
    mixer = make()
    for bad in (0, -1.0, float("inf"), "fast", True):
        with pytest.raises(ValueError, match="rate must be a finite number > 0"):
            mixer.rate = bad
    with pytest.raises(ValueError, match="rate must be a finite number > 0; got 0"):
        S5(4, d_state=4, rate=0)


def test_bidirectional_reads_the_future_and_refuses_state():
    mixer = make(bidirectional=True)
    x = torch.randn(2, 40, 6, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 30] += 1.0
    with torch.no_grad():
        y, y2 = mixer(x), mixer(x2)
    assert (y2[:, :30] - y[:, :30]).abs().max() > 1e-3, "bidirectional output ignores the future"
    with pytest.raises(ValueError, match="bidirectional=True .* step by step"):
        mixer.step(x[:, 0], mixer.init_state(2))
    with pytest.raises(ValueError, match="bidirectional=True .* return_state"):
        mixer(x, return_state=True)
    with pytest.raises(ValueError, match="bidirectional=True .* state"):
        mixer(x, mixer.init_state(2))


def test_bidirectional_is_a_forward_plus_a_time_reversed_causal_ssm():
    bi = make(bidirectional=True, activation="none")
    uni = make(activation="none")
    uni.load_state_dict({k: v for k, v in bi.state_dict().items() if not k.startswith("C_rev")})
    x = torch.randn(2, 33, 6, dtype=torch.float64)
    with torch.no_grad():
        C_rev = (bi.C_rev_re.clone(), bi.C_rev_im.clone())
        bi.C_rev_re.zero_(), bi.C_rev_im.zero_()
        torch.testing.assert_close(bi(x), uni(x), rtol=1e-12, atol=1e-12)
        bi.C_rev_re.copy_(C_rev[0]), bi.C_rev_im.copy_(C_rev[1])
        bi.C_re.zero_(), bi.C_im.zero_()
        uni.C_re.copy_(C_rev[0]), uni.C_im.copy_(C_rev[1])
        torch.testing.assert_close(bi(x), uni(x.flip(1)).flip(1), rtol=1e-12, atol=1e-12)


def test_gradients_reach_every_parameter_including_the_backward_scan():
    mixer = make(bidirectional=True, activation="full_glu")
    x = torch.randn(2, 20, 6, dtype=torch.float64)
    (mixer(x) * torch.randn(2, 20, 6, dtype=torch.float64)).sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"d_state \(P=10\) must be divisible by blocks \(J=4\)"):
        S5(4, d_state=10, blocks=4)
    with pytest.raises(ValueError, match=r"conj_sym=True needs an even block size .* 9 / 3 = 3"):
        S5(4, d_state=9, blocks=3)
    with pytest.raises(ValueError, match=r"conj_sym=True needs an even block size .* 7 / 1 = 7"):
        S5(4, d_state=7)
    with pytest.raises(ValueError, match="discretization must be one of"):
        S5(4, d_state=4, discretization="euler")
    with pytest.raises(ValueError, match="activation must be one of"):
        S5(4, d_state=4, activation="relu")
    with pytest.raises(ValueError, match="0 < dt_min <= dt_max; got dt_min=0.1, dt_max=0.01"):
        S5(4, d_state=4, dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match="0 < dt_min <= dt_max"):
        S5(4, d_state=4, dt_min=0.0)
    with pytest.raises(TypeError, match="d_state must be an int"):
        S5(4, d_state=8.0)
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        S5(4, d_state=8, blocks=0)
