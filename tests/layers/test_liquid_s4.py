"""The Liquid-S4 layer (layers/liquid_s4.py): forward == step by step for both kernels in float64 (the
contract suite runs the "kb" configuration), and its argument checks. The core is tested in
tests/ops/test_liquid_s4.py."""

import pytest
import torch

from ssmkit.layers import LiquidS4

from ..helpers import assert_close_scaled


@pytest.mark.parametrize("kernel", ["kb", "polyb"])
def test_layer_forward_equals_steps(kernel):
    torch.manual_seed(0)
    layer = LiquidS4(6, d_state=8, liquid_degree=3, liquid_kernel=kernel).double()
    x = torch.randn(2, 30, 6, dtype=torch.float64)
    state = layer.init_state(2)
    y, final = layer(x, state, return_state=True)
    ys = []
    for t in range(30):
        y_t, state = layer.step(x[:, t], state)
        ys.append(y_t)
    assert_close_scaled(torch.stack(ys, 1), y, 1e-10, "steps")
    for key in final:
        a, b = final[key], state[key]
        assert_close_scaled(torch.view_as_real(a) if a.is_complex() else a,
                            torch.view_as_real(b) if b.is_complex() else b, 1e-10, key)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="liquid_degree must be >= 2"):
        LiquidS4(4, liquid_degree=1)
    with pytest.raises(ValueError, match="liquid_kernel must be one of"):
        LiquidS4(4, liquid_kernel="pb")
