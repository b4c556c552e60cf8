"""S4 layer specifics (the shared contract suite covers the rest): forward == recurrence in float64 with
gradients, one source for kernel and recurrence, the LegS initialisation, rate, bidirectional, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers import build_mixer
from ssmkit.layers.s4 import S4
from ssmkit.ops.dplr import dplr_real_system, kernel_dplr
from ssmkit.ops.fftconv import direct_conv_ref
from ssmkit.ops.hippo_operators import conjugate_half, hippo, nplr_legs
from ssmkit.ops.lti_kernels import kernel_ref

from ..helpers import assert_close_scaled


def _make(dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = S4(6, **{"d_state": 8, **kwargs}).to(dtype)
    with torch.no_grad():  # move off the shared initialisation so channels differ
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def _steps(layer, x, state):
    ys = []
    for x_t in x.unbind(1):
        y_t, state = layer.step(x_t, state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


def test_registered_and_state_spec():
    layer = build_mixer("s4", 6, d_state=8)
    assert isinstance(layer, S4)
    state = layer.init_state(3)
    assert set(state) == {"s4.h"}
    assert state["s4.h"].shape == (3, 6, 8) and state["s4.h"].dtype == torch.float32


@pytest.mark.parametrize("rank", [1, 2])
def test_forward_equals_recurrence_float64(rank):
    layer = _make(rank=rank)
    x = torch.randn(2, 63, 6, dtype=torch.float64)
    h0 = {"s4.h": torch.randn(2, 6, 8, dtype=torch.float64)}
    y, state = layer(x, h0, return_state=True)
    y_steps, state_steps = _steps(layer, x, h0)
    assert_close_scaled(y, y_steps, 1e-12, "outputs")
    assert_close_scaled(state["s4.h"], state_steps["s4.h"], 1e-12, "final state")


def test_gradients_equal_recurrence_gradients():
    # the whole backward of the parallel pass (custom Cauchy backward, Woodbury, FFTs, final state) against
    # autograd through the plain recurrence
    layer = _make(rank=2)
    x = torch.randn(2, 20, 6, dtype=torch.float64)
    h0 = torch.randn(2, 6, 8, dtype=torch.float64)
    wy, wh = torch.randn(2, 20, 6, dtype=torch.float64), torch.randn(2, 6, 8, dtype=torch.float64)
    params = [p for _, p in layer.named_parameters()]

    def grads(run):
        xx, hh = x.clone().requires_grad_(), h0.clone().requires_grad_()
        y, state = run(xx, {"s4.h": hh})
        loss = (y * wy).sum() + (state["s4.h"] * wh).sum()
        return torch.autograd.grad(loss, params + [xx, hh])

    fast = grads(lambda xx, st: layer(xx, st, return_state=True))
    slow = grads(lambda xx, st: _steps(layer, xx, st))
    names = [n for n, _ in layer.named_parameters()] + ["x", "h0"]
    for name, a, b in zip(names, fast, slow):
        assert_close_scaled(a, b, 1e-9, name)


def test_kernel_and_recurrence_come_from_one_source():
    layer = _make()
    layer.rate = 0.7
    K = layer.kernel(40)
    d = layer.discrete_parameters()
    assert_close_scaled(K, kernel_ref(d.dA, d.dB, d.C, 40), 1e-11, "kernel vs powering")
    p = layer.ssm_parameters()
    torch.testing.assert_close(p.dt, torch.exp(layer.log_dt) * 0.7)
    assert (p.Lambda.real < 0).all()


def test_initialisation_is_hippo_legs_and_stable():
    torch.manual_seed(0)
    layer = S4(4, d_state=16, dt_min=0.01, dt_max=0.1).double()
    p = layer.ssm_parameters()
    # every channel starts from the same LegS system (to float32 rounding of the stored parameters)
    legs = conjugate_half(nplr_legs(16))
    for got, want in ((p.Lambda, legs.Lambda), (p.P[0], legs.P[0]), (p.B, legs.B)):
        torch.testing.assert_close(got, want.expand(4, -1), atol=1e-5, rtol=1e-6)
    # back in the HiPPO basis (W = [2 Re V, -2 Im V], W^T W = 2 I) it is A = hippo("legs"). (Its eigenvalues
    # -(n+1) are no test: LegS is so non-normal that float32 rounding of the parameters moves them by ~1.)
    A = dplr_real_system(p.Lambda, p.P)
    W = torch.cat([2 * legs.V.real, -2 * legs.V.imag], 1)
    A_legs, _ = hippo("legs", 16)
    for h in range(4):
        assert_close_scaled(W @ A[h] @ W.T / 2, A_legs, 1e-5, f"channel {h} in the HiPPO basis")
    dt = p.dt
    assert (dt >= 0.01).all() and (dt <= 0.1).all()
    # the kernel decays: by k = 4000 every channel has forgotten (e^{-0.01 * 4000} ~ 4e-18)
    K = layer.kernel(4000)
    assert torch.isfinite(K).all()
    assert (K[:, -500:].abs().amax(-1) < 1e-8 * K.abs().amax(-1)).all()
    # and the discrete transition is a contraction-like stable map: spectral radius < 1
    assert torch.linalg.eigvals(layer.discrete_parameters().dA).abs().max() < 1


def test_rate_resamples_a_smooth_input():
    # The same continuous signal sampled at step 1 (rate 1) and at step 1/2 (rate 0.5) gives nearly the same
    # outputs at matching times; at rate 1 the dense sampling would be seen as a signal twice as slow.
    # What remains is first order in the sample step: S4's bilinear step feeds u_k alone (not the trapezoid
    # (u_{k-1} + u_k) / 2), a delay of half a sample, which differs between the two samplings (~0.3% here).
    # The signal starts smoothly from zero, so the two samplings also agree on the onset.
    torch.manual_seed(0)
    layer = S4(4, d_state=16, dt_min=0.01, dt_max=0.05).double()

    def signal(s):  # (T,) times -> (1, T, 4)
        onset = 1 - torch.exp(-((s / 30) ** 2))
        waves = [torch.sin(0.02 * s + c) + 0.5 * torch.cos(0.013 * s) for c in range(4)]
        return (onset[:, None] * torch.stack(waves, -1))[None]

    x_coarse = signal(torch.arange(400, dtype=torch.float64))
    x_fine = signal(torch.arange(800, dtype=torch.float64) / 2)
    with torch.no_grad():
        y_coarse = layer(x_coarse)
        layer.rate = 0.5
        y_fine = layer(x_fine)[:, ::2]
        layer.rate = 1.0
        y_fine_wrong = layer(x_fine)[:, ::2]
    err = (y_fine - y_coarse).abs().max().item()
    err_wrong = (y_fine_wrong - y_coarse).abs().max().item()
    scale = y_coarse.abs().max().item()
    assert err < 5e-3 * scale, (err, scale)
    assert err < 0.03 * err_wrong, (err, err_wrong)


def test_rate_validation():
    layer = S4(4, d_state=4)
    layer.rate = 2
    assert layer.rate == 2.0
    for bad in (0, -1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="rate must be a finite number > 0"):
            layer.rate = bad


def test_bidirectional_sees_the_future_and_has_no_recurrence():
    layer = _make(bidirectional=True)
    x = torch.randn(2, 30, 6, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 20:] += 1.0
    with torch.no_grad():
        y, y2 = layer(x), layer(x2)
    assert (y2[:, :20] - y[:, :20]).abs().max() > 1e-3  # earlier outputs depend on later inputs
    # the output is the documented two-sided convolution with the look-back and look-ahead kernels
    K = layer.kernel(30)
    assert K.shape == (2, 6, 30)
    s = direct_conv_ref(x.transpose(1, 2), K, D=layer.D, bidirectional=True).transpose(1, 2)
    assert_close_scaled(y, F.glu(layer.output_linear(F.gelu(s)), dim=-1), 1e-10, "bidirectional output")
    p = layer.ssm_parameters()
    look_back = kernel_dplr(p.Lambda, p.P, p.B, p.C[0], p.dt, 30)
    look_ahead = kernel_dplr(p.Lambda, p.P, p.B, p.C[1], p.dt, 30)
    torch.testing.assert_close(K, torch.stack([look_back, look_ahead]))
    assert (look_back - look_ahead).abs().max() > 1e-3
    state = layer.init_state(2)
    with pytest.raises(ValueError, match="bidirectional S4 has no recurrent form: step"):
        layer.step(x[:, 0], state)
    with pytest.raises(ValueError, match="return_state is not available"):
        layer(x, return_state=True)
    with pytest.raises(ValueError, match="an initial state is not available"):
        layer(x, state)


def test_float32_long_sequence_matches_float64():
    layer = _make(dtype=torch.float64)
    x = torch.randn(1, 3000, 6, dtype=torch.float64)
    h0 = {"s4.h": torch.randn(1, 6, 8, dtype=torch.float64)}
    with torch.no_grad():
        y64, s64 = layer(x, h0, return_state=True)
        layer.float()
        y32, s32 = layer(x.float(), {"s4.h": h0["s4.h"].float()}, return_state=True)
    assert_close_scaled(y32.double(), y64, 1e-4, "float32 outputs")
    assert_close_scaled(s32["s4.h"].double(), s64["s4.h"], 1e-4, "float32 final state")


def test_constructor_errors():
    with pytest.raises(ValueError, match="d_state must be even"):
        S4(4, d_state=7)
    with pytest.raises(ValueError, match="d_state must be >= 2; got 0"):
        S4(4, d_state=0)
    with pytest.raises(ValueError, match="rank must be >= 1; got 0"):
        S4(4, rank=0)
    with pytest.raises(TypeError, match="rank must be an int"):
        S4(4, rank=1.5)
    with pytest.raises(ValueError, match="0 < dt_min < dt_max; got dt_min=0.1, dt_max=0.01"):
        S4(4, dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match="dt_min"):
        S4(4, dt_min=0.0)
    with pytest.raises(TypeError, match="bidirectional must be a bool"):
        S4(4, bidirectional=1)
    with pytest.raises(ValueError, match="rate must be a finite number > 0; got 0"):
        S4(4, rate=0)
    with pytest.raises(ValueError, match="d_model must be >= 1"):
        S4(0)
    assert math.isclose(S4(4, d_state=4, rate=0.25).rate, 0.25)


def test_decoding_cache_follows_parameter_changes():
    """Without autograd the step matrices are cached; any in-place change of a parameter must rebuild them."""
    from ssmkit.layers.s4 import S4

    torch.manual_seed(0)
    layer = S4(4, d_state=8).double()
    state = layer.init_state(1)
    x_t = torch.randn(1, 4, dtype=torch.float64)
    with torch.no_grad():
        first, _ = layer.step(x_t, state)
        again, _ = layer.step(x_t, state)
        assert torch.equal(first, again)
        layer.log_dt.add_(0.5)
        changed, _ = layer.step(x_t, state)
        layer.rate = 2.0
        rated, _ = layer.step(x_t, state)
    assert not torch.allclose(changed, first) and not torch.allclose(rated, changed)
    fresh, _ = layer.step(x_t, state)  # with autograd: rebuilt, and the same numbers
    torch.testing.assert_close(fresh, rated)
