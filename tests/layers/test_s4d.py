"""S4D-specific tests (the shared contract suite covers forward == step, chunking, causality, ... for all
mixers): initialisations, parameterisation, the sampling ``rate``, bidirectional mode, constructor errors."""

import math

import pytest
import torch

from ssmkit.layers import get_mixer
from ssmkit.layers.s4d import S4D
from ssmkit.ops.hippo_operators import s4d_init
from ssmkit.ops.lti_kernels import diagonal_ssm_ref

from ..helpers import assert_close_scaled


def run_steps(mixer, x, state):
    ys = []
    for x_t in x.unbind(1):
        y_t, state = mixer.step(x_t, state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


def test_registered_under_s4d():
    assert get_mixer("s4d") is S4D


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
@pytest.mark.parametrize("init", ["lin", "inv", "real", "legs"])
def test_every_init_runs_and_forward_equals_step(init, discretization):
    H, N = 6, 10
    mixer = S4D(H, d_state=N, init=init, discretization=discretization).double()
    A = torch.complex(-torch.exp(mixer.A_log_re), mixer.A_im).detach()
    assert torch.allclose(A, s4d_init(init, N).expand(H, N // 2), atol=1e-6), "A is not the requested init"
    x = torch.randn(2, 21, H, dtype=torch.float64)
    state = mixer.init_state(2)
    state["s4d.h"] = torch.randn_like(state["s4d.h"])
    with torch.no_grad():
        y, new_state = mixer(x, state, return_state=True)
        y_steps, state_steps = run_steps(mixer, x, state)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert_close_scaled(y, y_steps, 1e-10, "forward vs step")
    assert_close_scaled(torch.view_as_real(new_state["s4d.h"]), torch.view_as_real(state_steps["s4d.h"]), 1e-10,
                        "final state")


def test_parameters_shapes_and_initial_values():
    H, N, dt_min, dt_max = 64, 64, 1e-3, 1e-1
    mixer = S4D(H, d_state=N, dt_min=dt_min, dt_max=dt_max)
    shapes = {name: tuple(p.shape) for name, p in mixer.named_parameters()}
    assert shapes == {"log_dt": (H,), "A_log_re": (H, N // 2), "A_im": (H, N // 2), "B": (H, N // 2, 2),
                      "C": (H, N // 2, 2), "D": (H,), "output_linear.weight": (2 * H, H),
                      "output_linear.bias": (2 * H,)}
    dt = mixer.log_dt.exp()
    assert dt.min() >= dt_min and dt.max() <= dt_max
    assert dt.log().std() > 0.5 * (math.log(dt_max) - math.log(dt_min)) / math.sqrt(12)  # spread, not constant
    assert torch.equal(torch.view_as_complex(mixer.B.detach()), torch.ones(H, N // 2, dtype=torch.complex64))
    C = mixer.C.detach()
    for part in (C[..., 0], C[..., 1]):  # variance 0.5 per part, 2048 samples each
        assert abs(part.var().item() - 0.5) < 0.06
    assert mixer.init_state(3)["s4d.h"].shape == (3, H, N // 2)
    assert mixer.init_state(3)["s4d.h"].dtype == torch.complex64


def test_layer_matches_the_recurrence_spec_plus_output_map():
    """Pre-activation outputs are the diagonal SSM of ops.lti_kernels' reference, from discrete_parameters."""
    mixer = S4D(5, d_state=6, init="lin").double()
    x = torch.randn(2, 30, 5, dtype=torch.float64)
    p = mixer.discrete_parameters()
    s, _ = diagonal_ssm_ref(p.Abar, p.Bbar, p.C, x.transpose(1, 2), mixer.D)
    with torch.no_grad():
        expected = torch.nn.functional.glu(mixer.output_linear(torch.nn.functional.gelu(s.transpose(1, 2))), -1)
        assert_close_scaled(mixer(x), expected, 1e-11, "layer vs reference")


# ------------------------------------------------------------------------------------------------------
# rate: dt_eff = exp(log_dt) * rate
# ------------------------------------------------------------------------------------------------------
def test_zoh_rate_two_squares_abar_and_takes_two_steps_at_once():
    mixer = S4D(4, d_state=8, init="lin").double()
    p1 = mixer.discrete_parameters()
    mixer.rate = 2.0
    p2 = mixer.discrete_parameters()
    assert torch.allclose(p2.Abar, p1.Abar**2, atol=1e-14, rtol=1e-12)
    # ZOH is exact for a held input: one step at rate 2 == two steps at rate 1 with the same input
    x_t, state = torch.randn(3, 4, dtype=torch.float64), mixer.init_state(3)
    state["s4d.h"] = torch.randn_like(state["s4d.h"])
    with torch.no_grad():
        y_double, s_double = mixer.step(x_t, state)
        mixer.rate = 1.0
        _, s_half = mixer.step(x_t, state)
        y_two, s_two = mixer.step(x_t, s_half)
    assert torch.allclose(s_double["s4d.h"], s_two["s4d.h"], atol=1e-12)
    assert torch.allclose(y_double, y_two, atol=1e-12)


@pytest.mark.parametrize("init", ["legs", "lin"])
def test_rate_half_on_twice_denser_samples_gives_the_same_outputs(init):
    """A smooth signal sampled twice as densely, run at rate 0.5, matches the coarse run at shared times."""
    H, L = 8, 200
    mixer = S4D(H, d_state=16, init=init).double()

    def signal(times):  # (L,) -> (1, L, H); periods of 40 and 97 coarse steps
        phase = torch.arange(H, dtype=torch.float64)
        return (torch.sin(2 * math.pi * times[:, None] / 40 + phase) * torch.cos(2 * math.pi * times[:, None] / 97))[None]

    coarse = signal(torch.arange(L, dtype=torch.float64))
    dense = signal(torch.arange(2 * L, dtype=torch.float64) / 2)
    with torch.no_grad():
        y_coarse = mixer(coarse)
        mixer.rate = 0.5
        y_dense = mixer(dense)[:, ::2]  # dense sample 2k is at the time of coarse sample k
        mixer.rate = 1.0
        y_wrong = mixer(dense)[:, ::2]  # the same dense input without telling the layer

    def rel_err(y):
        return ((y - y_coarse).norm() / y_coarse.norm()).item()

    # measured: about 0.02 at rate 0.5 against 0.6 when the rate is left at 1
    assert rel_err(y_dense) < 0.04
    assert rel_err(y_dense) < 0.1 * rel_err(y_wrong)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "2", True])
def test_rate_must_be_positive_number(bad):
    with pytest.raises(ValueError, match="rate must be a finite number > 0"):
        S4D(4, d_state=4, rate=bad)
    mixer = S4D(4, d_state=4, rate=3)
    assert mixer.rate == 3.0
    with pytest.raises(ValueError, match="rate must be a finite number > 0"):
        mixer.rate = bad
    assert mixer.rate == 3.0


# ------------------------------------------------------------------------------------------------------
# bidirectional
# ------------------------------------------------------------------------------------------------------
def test_bidirectional_sees_the_future_and_has_no_recurrence():
    mixer = S4D(4, d_state=8, bidirectional=True).double()
    assert tuple(mixer.C_backward.shape) == (4, 4, 2)
    x = torch.randn(2, 30, 4, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        y, y2 = mixer(x), mixer(x2)
    assert (y2[:, 0] - y[:, 0]).abs().max() > 1e-6, "the first output ignores the last input"
    assert (y2[:, -1] - y[:, -1]).abs().max() > 1e-3
    # the causal layer does not see the future (to rounding)
    causal = S4D(4, d_state=8).double()
    with torch.no_grad():
        assert (causal(x2)[:, :-1] - causal(x)[:, :-1]).abs().max() < 1e-12
    state = mixer.init_state(2)
    with pytest.raises(ValueError, match="bidirectional S4D has no recurrent form"):
        mixer.step(x[:, 0], state)
    with pytest.raises(ValueError, match="bidirectional S4D has no recurrent form"):
        mixer(x, return_state=True)
    with pytest.raises(ValueError, match="bidirectional S4D has no recurrent form"):
        mixer(x, state)


def test_bidirectional_backward_kernel_gets_gradients():
    mixer = S4D(3, d_state=4, bidirectional=True)
    mixer(torch.randn(2, 12, 3)).square().sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


# ------------------------------------------------------------------------------------------------------
# constructor errors
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(d_state=7), ValueError, "d_state must be even"),
    (dict(d_state=0), ValueError, "d_state must be >= 2; got 0"),
    (dict(d_state=4.0), TypeError, "d_state must be an int"),
    (dict(init="hippo"), ValueError, r"init must be one of \['inv', 'legs', 'lin', 'real'\]; got 'hippo'"),
    (dict(discretization="euler"), ValueError, r"discretization must be one of \['bilinear', 'zoh'\]"),
    (dict(dt_min=0.1, dt_max=0.01), ValueError, "0 < dt_min < dt_max; got dt_min=0.1, dt_max=0.01"),
    (dict(dt_min=0.0), ValueError, "0 < dt_min < dt_max"),
    (dict(dt_min=0.1, dt_max=0.1), ValueError, "0 < dt_min < dt_max"),
    (dict(bidirectional="yes"), TypeError, "bidirectional must be a bool"),
    (dict(d_model=0), ValueError, "d_model must be >= 1"),
])
def test_constructor_errors(kwargs, error, message):
    kwargs = {"d_model": 4, **kwargs}
    with pytest.raises(error, match=message):
        S4D(**kwargs)
