"""Mamba layer: equal to transformers' MambaMixer on copied weights (parallel and decoding paths), paper
initialisation, forward == step loop, state passing, packed sequences == separate runs, gradients, bad input,
visible backend. (The shared contract suite in test_contract.py runs on it too.)"""

import math
import os

import pytest
import torch

from ssmkit.layers import build_mixer
from ssmkit.layers.mamba import Mamba

from ..helpers import assert_close_scaled, skip_unless_cache_has

F64 = torch.float64


def make(dtype=F64, backend="torch", seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(d_state=5, d_conv=4, expand=2)
    config.update(kwargs)
    layer = Mamba(12, backend=backend, **config).to(dtype)
    with torch.no_grad():  # move away from the special values of the initialisation (D = 1, integer A)
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def run_steps(layer, x, state):
    ys = []
    for x_t in x.unbind(1):
        y_t, state = layer.step(x_t, state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


def assert_states_close(a, b, tol, what):
    assert set(a) == set(b)
    for key in a:
        if b[key].numel() == 0:  # the conv state of a width-1 convolution
            assert a[key].shape == b[key].shape, f"{what} {key}"
            continue
        assert_close_scaled(a[key], b[key], tol, f"{what} {key}")


# --------------------------------------------------------------------------------------------------
# Against transformers (torch path)
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def hub_offline(monkeypatch):
    """transformers never touches the network nor fetches hub kernels, for this test only (monkeypatch
    restores the environment afterwards); a value the user set is kept."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("USE_HUB_KERNELS", "0")):
        if key not in os.environ:
            monkeypatch.setenv(key, value)


def transformers_mamba():
    """transformers' modules, on their pure-PyTorch path (the test uses the ``hub_offline`` fixture)."""
    transformers = pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("mamba_ssm") or importlib.util.find_spec("causal_conv1d"):
        pytest.skip("mamba_ssm / causal_conv1d installed: transformers would not take its torch path")
    from transformers.models.mamba.modeling_mamba import MambaMixer

    return transformers, MambaMixer


HF_CASES = {
    # odd widths; dt_rank "auto" = ceil(11 / 16) = 1
    "odd": dict(d_model=11, d_state=5, d_conv=3, expand=2, dt_rank="auto", conv_bias=True, bias=False),
    "biases_rank3": dict(d_model=10, d_state=7, d_conv=4, expand=3, dt_rank=3, conv_bias=False, bias=True),
}


def hf_pair(case):
    transformers, MambaMixer = transformers_mamba()
    c = HF_CASES[case]
    config = transformers.MambaConfig(hidden_size=c["d_model"], state_size=c["d_state"], conv_kernel=c["d_conv"],
                                      expand=c["expand"], time_step_rank=c["dt_rank"],
                                      use_conv_bias=c["conv_bias"], use_bias=c["bias"], num_hidden_layers=1,
                                      use_mambapy=False, use_associative_scan=False)
    torch.manual_seed(0)
    theirs = MambaMixer(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = Mamba(**c, backend="torch")
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes
    return config, theirs, ours


@pytest.mark.slow  # imports transformers (~8 s)
@pytest.mark.usefixtures("hub_offline")
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_matches_transformers_mixer(case):
    _, theirs, ours = hf_pair(case)
    x = torch.randn(2, 37, HF_CASES[case]["d_model"])
    with torch.no_grad():
        expected = theirs(x)
        for backend in ("torch", "reference", "auto"):
            ours.backend = backend
            assert_close_scaled(ours(x), expected, 1e-5, f"{backend} backend vs transformers")


@pytest.mark.usefixtures("hub_offline")
def test_matches_transformers_decoding():
    """Prefill then token-by-token decoding with transformers' cache == our forward(return_state) + step;
    their conv cache keeps d_conv columns, ours the d_conv - 1 that are read again."""
    config, theirs, ours = hf_pair("odd")
    from transformers import DynamicCache

    x = torch.randn(2, 12, config.hidden_size)
    cache = DynamicCache(config=config)
    with torch.no_grad():
        expected = [theirs(x[:, :8], cache_params=cache)]
        expected += [theirs(x[:, t:t + 1], cache_params=cache) for t in range(8, 12)]
        y, state = ours(x[:, :8], return_state=True)
        y_steps, state = run_steps(ours, x[:, 8:], state)
    assert_close_scaled(torch.cat([y, y_steps], 1), torch.cat(expected, 1), 1e-5, "decoding vs transformers")
    skip_unless_cache_has(cache, "get_conv_state", "get_recurrent_state")
    assert_close_scaled(state["mamba.conv"], cache.get_conv_state(0)[..., 1:], 1e-6, "conv state")
    assert_close_scaled(state["mamba.ssm"], cache.get_recurrent_state(0), 1e-5, "ssm state")


# --------------------------------------------------------------------------------------------------
# Parameters and initialisation
# --------------------------------------------------------------------------------------------------
def test_parameter_names_shapes_and_paper_initialisation():
    torch.manual_seed(0)
    layer = Mamba(40, d_state=16, d_conv=4, expand=2, dt_min=0.002, dt_max=0.05, dt_init_floor=0.003)
    d_inner, dt_rank = 80, math.ceil(40 / 16)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"in_proj.weight": (160, 40), "conv1d.weight": (80, 1, 4), "conv1d.bias": (80,),
                      "x_proj.weight": (dt_rank + 32, 80), "dt_proj.weight": (80, dt_rank),
                      "dt_proj.bias": (80,), "A_log": (80, 16), "D": (80,), "out_proj.weight": (40, 80)}
    assert torch.allclose(layer.A_log, torch.log(torch.arange(1.0, 17.0)).expand(80, 16))  # S4D-Real
    assert torch.equal(layer.D, torch.ones(80))
    dt = torch.nn.functional.softplus(layer.dt_proj.bias)
    assert dt.min() >= 0.003 - 1e-7 and dt.max() <= 0.05 + 1e-7  # floored log-uniform in [dt_min, dt_max]
    assert dt.max() / dt.min() > 3  # spread out, not constant
    bound = dt_rank ** -0.5
    assert layer.dt_proj.weight.abs().max() <= bound and layer.dt_proj.weight.abs().max() > bound / 2
    constant = Mamba(40, dt_init="constant", dt_scale=2.0)
    assert torch.allclose(constant.dt_proj.weight, torch.full((80, dt_rank), 2.0 * bound))
    assert Mamba(40, bias=True, conv_bias=False).conv1d.bias is None
    assert Mamba(40, bias=True).in_proj.bias.shape == (160,)
    assert Mamba(40, dt_rank=5).dt_proj.weight.shape == (80, 5)
    assert isinstance(build_mixer("mamba", 8), Mamba)


# --------------------------------------------------------------------------------------------------
# Parallel == recurrent, state passing, gradients
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("d_conv", [1, 4])
def test_forward_equals_step_loop(backend, d_conv):
    layer = make(backend=backend, d_conv=d_conv)
    x = torch.randn(2, 23, 12, dtype=F64)
    with torch.no_grad():
        _, state0 = layer(torch.randn(2, 3, 12, dtype=F64), return_state=True)
        y, state = layer(x, state0, return_state=True)
        y_steps, state_steps = run_steps(layer, x, state0)
    assert_close_scaled(y, y_steps, 1e-12, "outputs")
    assert_states_close(state, state_steps, 1e-12, "final state")
    assert state["mamba.conv"].shape == (2, 24, d_conv - 1) and state["mamba.ssm"].shape == (2, 24, 5)


def test_chunked_forward_equals_whole():
    layer = make()
    x = torch.randn(2, 30, 12, dtype=F64)
    with torch.no_grad():
        y_whole, state_whole = layer(x, return_state=True)
        state, pieces = None, []
        for piece in x.split([2, 1, 13, 14], dim=1):  # pieces shorter than d_conv - 1 too
            y, state = layer(piece, state, return_state=True)
            pieces.append(y)
    assert_close_scaled(torch.cat(pieces, 1), y_whole, 1e-12, "outputs")
    assert_states_close(state, state_whole, 1e-12, "final state")


def test_gradients_reach_every_parameter_and_match_reference():
    x = torch.randn(2, 19, 12, dtype=F64)
    results = {}
    for backend in ("torch", "reference"):
        layer = make(backend=backend)
        state0 = {k: v.requires_grad_() for k, v in layer.init_state(2).items()}
        with torch.no_grad():
            for v in state0.values():
                v.normal_()
        y, state = layer(x, state0, return_state=True)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y)).sum() + state["mamba.ssm"].sum()
        loss.backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().max() > 0, f"{backend}: no gradient for {name}"
        results[backend] = {**{n: p.grad for n, p in layer.named_parameters()},
                            **{k: v.grad for k, v in state0.items()}}
    for name, g in results["torch"].items():
        assert_close_scaled(g, results["reference"][name], 1e-10, f"grad {name}")


# --------------------------------------------------------------------------------------------------
# Packed variable-length batches
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_packed_cu_seqlens_equals_separate_runs_with_gradients(backend):
    layer = make(backend=backend)
    lengths = [5, 1, 9, 3]
    x = torch.randn(1, sum(lengths), 12, dtype=F64, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 15, 18])
    y, state = layer(x, cu_seqlens=cu, return_state=True)
    g = torch.randn_like(y)
    (grad_packed,) = torch.autograd.grad((y * g).sum(), x)
    pieces, grads, start = [], [], 0
    for n in lengths:
        xi = x[:, start:start + n].detach().requires_grad_()
        yi, state_i = layer(xi, return_state=True)
        grads.append(torch.autograd.grad((yi * g[:, start:start + n]).sum(), xi)[0])
        pieces.append(yi)
        start += n
    assert_close_scaled(y, torch.cat(pieces, 1), 1e-12, "packed outputs")
    assert_states_close(state, state_i, 1e-12, "final state = state of the last sequence")
    assert_close_scaled(grad_packed, torch.cat(grads, 1), 1e-12, "input gradients")


def test_packed_seq_idx_rows_with_initial_state():
    """Two packed rows; the carried state continues the first sequence of each row only."""
    layer = make()
    x = torch.randn(2, 14, 12, dtype=F64)
    seq_idx = torch.tensor([[0] * 4 + [1] * 10, [2] * 14])
    with torch.no_grad():
        _, state0 = layer(torch.randn(2, 3, 12, dtype=F64), return_state=True)
        y, state = layer(x, state0, return_state=True, seq_idx=seq_idx)
        row0_a = layer(x[:1, :4], {k: v[:1] for k, v in state0.items()})
        row0_b, state_b = layer(x[:1, 4:], return_state=True)
        row1, state_1 = layer(x[1:], {k: v[1:] for k, v in state0.items()}, return_state=True)
    assert_close_scaled(y[:1], torch.cat([row0_a, row0_b], 1), 1e-12, "row 0")
    assert_close_scaled(y[1:], row1, 1e-12, "row 1")
    for key in state:
        assert_close_scaled(state[key], torch.cat([state_b[key], state_1[key]]), 1e-12, f"final {key}")


def test_packing_without_boundaries_is_the_plain_forward():
    layer = make()
    x = torch.randn(2, 9, 12, dtype=F64)
    with torch.no_grad():
        assert_close_scaled(layer(x, seq_idx=torch.full((2, 9), 4)), layer(x), 1e-14, "one sequence per row")


# --------------------------------------------------------------------------------------------------
# Backends, float32, bad input
# --------------------------------------------------------------------------------------------------
def test_backend_is_visible():
    x = torch.randn(1, 6, 12)
    for backend in ("torch", "reference"):
        layer = make(torch.float32, backend=backend)
        assert layer.last_backend is None
        layer(x)
        assert layer.last_backend == backend
    layer = make(torch.float32, backend="auto")
    layer(x)
    assert layer.last_backend in ("cpp", "torch")
    assert "backend='auto'" in repr(layer)


def test_float32_matches_float64():
    layer = make()
    x = torch.randn(2, 40, 12, dtype=F64)
    with torch.no_grad():
        y64 = layer(x)
        y32 = layer.float()(x.float())
    assert y32.dtype == torch.float32
    assert_close_scaled(y32.double(), y64, 1e-5, "float32")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dt_init must be one of"):
        Mamba(8, dt_init="normal")
    with pytest.raises(ValueError, match="dt_rank must be a positive int or 'auto'; got 'full'"):
        Mamba(8, dt_rank="full")
    with pytest.raises(ValueError, match="dt_min must be <= dt_max"):
        Mamba(8, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValueError, match="d_state must be >= 1; got 0"):
        Mamba(8, d_state=0)
    with pytest.raises(ValueError, match="expand must be a positive number"):
        Mamba(8, expand=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        Mamba(8, backend="cuda")
    layer = make(torch.float32)
    x = torch.randn(2, 6, 12)
    with pytest.raises(ValueError, match="seq_idx must be non-decreasing"):
        layer(x, seq_idx=torch.tensor([[0, 0, 1, 1, 0, 0], [0] * 6]))
    with pytest.raises(ValueError, match=r"seq_idx must be \(batch=2, length=6\); got \(2, 5\)"):
        layer(x, seq_idx=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens describes sequences packed into a batch of one"):
        layer(x, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"state\['mamba.ssm'\] must have shape \(2, 24, 5\)"):
        layer(x, {"mamba.conv": torch.zeros(2, 24, 3), "mamba.ssm": torch.zeros(2, 24, 4)})


def test_in_proj_time_fastest_layout():
    """The GPU's in_proj product (one 2-D product, time the fastest axis) equals the batched one."""
    from ssmkit.layers import Mamba

    torch.manual_seed(0)
    layer = Mamba(12, d_state=4).double()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    xz = layer._in_proj_time_fastest(x)
    assert xz.shape == (3, 2 * layer.d_inner, 7) and xz.stride(2) == 1
    torch.testing.assert_close(xz, torch.matmul(layer.in_proj.weight, x.transpose(1, 2)))
