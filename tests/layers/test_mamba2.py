"""Mamba-2 layer: equal to transformers' Mamba2Mixer on copied weights (parallel and decoding paths, several
groups), mamba_ssm's initialisation, forward == step loop for every output variant, state passing, packed
sequences == separate runs, gradients, bad input, visible backend. (The shared contract suite runs on it too.)"""

import importlib.util
import os

import pytest
import torch

from ssmkit.layers import build_mixer
from ssmkit.layers.mamba2 import Mamba2, RMSNormGated

from ..helpers import assert_close_scaled, skip_unless_cache_has, skip_unless_grouped_mamba2_norm

F64 = torch.float64
D_MODEL = 10


def make(dtype=F64, backend="torch", seed=0, **kwargs):
    torch.manual_seed(seed)
    # d_inner 20 = 4 heads of 5, 2 groups, chunks of 8 so that the test lengths cross chunk boundaries
    config = dict(d_state=7, d_conv=4, expand=2, headdim=5, ngroups=2, chunk_size=8)
    config.update(kwargs)
    layer = Mamba2(D_MODEL, backend=backend, **config).to(dtype)
    with torch.no_grad():  # move away from the special values of the initialisation (D = 1, norm = 1)
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


def hf_pair(ngroups, d_conv=3, bias=False, conv_bias=True):
    """transformers' Mamba2Mixer and ours with its weights (the test uses the ``hub_offline`` fixture)."""
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("mamba_ssm") or importlib.util.find_spec("causal_conv1d"):
        pytest.skip("mamba_ssm / causal_conv1d installed: transformers would not take its torch path")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    skip_unless_grouped_mamba2_norm(ngroups)

    # odd sizes: d_model 10 -> d_inner 30 = 6 heads of 5, N = 7; their chunk (8) differs from ours (16)
    config = transformers.Mamba2Config(hidden_size=10, state_size=7, conv_kernel=d_conv, expand=3, head_dim=5,
                                       num_heads=6, n_groups=ngroups, chunk_size=8, use_bias=bias,
                                       use_conv_bias=conv_bias, num_hidden_layers=1)
    torch.manual_seed(0)
    theirs = Mamba2Mixer(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = Mamba2(10, d_state=7, d_conv=d_conv, expand=3, headdim=5, ngroups=ngroups, chunk_size=16, bias=bias,
                  conv_bias=conv_bias)
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes
    return config, theirs, ours


@pytest.mark.usefixtures("hub_offline")
@pytest.mark.parametrize("ngroups, d_conv, bias", [(1, 4, False), (3, 3, False), (2, 2, True)])
def test_matches_transformers_mixer(ngroups, d_conv, bias):
    _, theirs, ours = hf_pair(ngroups, d_conv, bias=bias, conv_bias=not bias)
    x = torch.randn(2, 37, 10)
    with torch.no_grad():
        expected = theirs(x)
        assert_close_scaled(ours(x), expected, 1e-5, "forward vs transformers")
        ours.backend = "reference"
        assert_close_scaled(ours(x), expected, 1e-5, "reference backend vs transformers")


@pytest.mark.usefixtures("hub_offline")
def test_matches_transformers_decoding():
    config, theirs, ours = hf_pair(ngroups=3)
    from transformers import DynamicCache

    x = torch.randn(2, 13, 10)
    cache = DynamicCache(config=config)
    with torch.no_grad():
        expected = [theirs(x[:, :9], cache_params=cache)]
        expected += [theirs(x[:, t:t + 1], cache_params=cache) for t in range(9, 13)]
        y, state = ours(x[:, :9], return_state=True)
        y_steps, state = run_steps(ours, x[:, 9:], state)
    assert_close_scaled(torch.cat([y, y_steps], 1), torch.cat(expected, 1), 1e-5, "decoding vs transformers")
    skip_unless_cache_has(cache, "get_conv_state", "get_recurrent_state")
    assert_close_scaled(state["mamba2.conv"], cache.get_conv_state(0)[..., 1:], 1e-6, "conv state")
    assert_close_scaled(state["mamba2.ssm"], cache.get_recurrent_state(0), 1e-5, "ssm state")


# --------------------------------------------------------------------------------------------------
# Parameters and initialisation
# --------------------------------------------------------------------------------------------------
def test_parameter_names_shapes_and_initialisation():
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=8, d_conv=4, expand=2, headdim=4, ngroups=2, A_init_range=(2, 5),
                   dt_min=0.01, dt_max=0.05)
    H, conv_dim = 8, 32 + 2 * 2 * 8
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"in_proj.weight": (2 * 32 + 2 * 2 * 8 + H, 16), "conv1d.weight": (conv_dim, 1, 4),
                      "conv1d.bias": (conv_dim,), "dt_bias": (H,), "A_log": (H,), "D": (H,),
                      "norm.weight": (32,), "out_proj.weight": (16, 32)}
    A = torch.exp(layer.A_log)
    assert A.min() >= 2 - 1e-6 and A.max() <= 5 + 1e-6 and A.std() > 0  # U(A_init_range)
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert dt.min() >= 0.01 - 1e-7 and dt.max() <= 0.05 + 1e-7 and dt.std() > 0
    assert torch.equal(layer.D, torch.ones(H)) and torch.equal(layer.norm.weight, torch.ones(32))
    assert layer.norm.group_size == 16  # one RMS per group of d_inner / ngroups channels
    assert Mamba2(16, headdim=4, D_has_hdim=True).D.shape == (32,)
    assert not hasattr(Mamba2(16, headdim=4, rmsnorm=False), "norm")
    assert Mamba2(16, headdim=4, bias=True, conv_bias=False).conv1d.bias is None
    assert isinstance(build_mixer("mamba2", 8, headdim=4), Mamba2)


def test_gated_rmsnorm_formula():
    norm = RMSNormGated(6, eps=1e-5, group_size=3).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x, z = torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)
    gated = x * torch.nn.functional.silu(z)
    groups = gated.view(4, 2, 3)
    expected = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).view(4, 6) * norm.weight
    assert_close_scaled(norm(x, z), expected, 1e-14, "gate then norm")
    norm.norm_before_gate = True
    groups = x.view(4, 2, 3)
    expected = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).view(4, 6) * norm.weight
    assert_close_scaled(norm(x, z), expected * torch.nn.functional.silu(z), 1e-14, "norm then gate")


# --------------------------------------------------------------------------------------------------
# Parallel == recurrent, state passing, gradients
# --------------------------------------------------------------------------------------------------
VARIANTS = {
    "default": {},
    "one_group_hdim_D": dict(ngroups=1, D_has_hdim=True),
    "no_norm": dict(rmsnorm=False),
    "norm_before_gate": dict(norm_before_gate=True),
    "dt_limit": dict(dt_limit=(0.02, 0.08)),
    "width1_reference": dict(d_conv=1, backend="reference"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_equals_step_loop(variant):
    layer = make(**VARIANTS[variant])
    x = torch.randn(2, 21, D_MODEL, dtype=F64)
    with torch.no_grad():
        _, state0 = layer(torch.randn(2, 3, D_MODEL, dtype=F64), return_state=True)
        y, state = layer(x, state0, return_state=True)
        y_steps, state_steps = run_steps(layer, x, state0)
    assert_close_scaled(y, y_steps, 1e-12, "outputs")
    if layer.d_conv > 1:
        assert_states_close(state, state_steps, 1e-12, "final state")
    else:
        assert state["mamba2.conv"].shape == state_steps["mamba2.conv"].shape == (2, 48, 0)
        assert_close_scaled(state["mamba2.ssm"], state_steps["mamba2.ssm"], 1e-12, "final ssm state")
    assert state["mamba2.ssm"].shape == (2, 4, 5, 7)


def test_chunk_size_does_not_change_results():
    x = torch.randn(2, 30, D_MODEL, dtype=F64)
    with torch.no_grad():
        y8 = make(chunk_size=8)(x)
        y64 = make(chunk_size=64)(x)
    assert_close_scaled(y8, y64, 1e-12, "chunk 8 vs 64")


def test_chunked_forward_equals_whole():
    layer = make()
    x = torch.randn(2, 30, D_MODEL, dtype=F64)
    with torch.no_grad():
        y_whole, state_whole = layer(x, return_state=True)
        state, pieces = None, []
        for piece in x.split([2, 1, 17, 10], dim=1):
            y, state = layer(piece, state, return_state=True)
            pieces.append(y)
    assert_close_scaled(torch.cat(pieces, 1), y_whole, 1e-12, "outputs")
    assert_states_close(state, state_whole, 1e-12, "final state")


def test_gradients_reach_every_parameter_and_match_reference():
    x = torch.randn(2, 19, D_MODEL, dtype=F64)
    results = {}
    for backend in ("torch", "reference"):
        layer = make(backend=backend, D_has_hdim=True)
        state0 = {k: v.normal_().requires_grad_() for k, v in layer.init_state(2).items()}
        y, state = layer(x, state0, return_state=True)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y)).sum() + state["mamba2.ssm"].sum()
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
def test_packed_cu_seqlens_equals_separate_runs_with_gradients():
    layer = make()
    lengths = [5, 1, 11, 3]  # one sequence longer than a chunk, boundaries inside chunks
    x = torch.randn(1, sum(lengths), D_MODEL, dtype=F64, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 17, 20])
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
    layer = make()
    x = torch.randn(2, 14, D_MODEL, dtype=F64)
    seq_idx = torch.tensor([[0] * 4 + [1] * 10, [2] * 14])
    with torch.no_grad():
        _, state0 = layer(torch.randn(2, 3, D_MODEL, dtype=F64), return_state=True)
        y, state = layer(x, state0, return_state=True, seq_idx=seq_idx)
        row0_a = layer(x[:1, :4], {k: v[:1] for k, v in state0.items()})
        row0_b, state_b = layer(x[:1, 4:], return_state=True)
        row1, state_1 = layer(x[1:], {k: v[1:] for k, v in state0.items()}, return_state=True)
    assert_close_scaled(y[:1], torch.cat([row0_a, row0_b], 1), 1e-12, "row 0")
    assert_close_scaled(y[1:], row1, 1e-12, "row 1")
    for key in state:
        assert_close_scaled(state[key], torch.cat([state_b[key], state_1[key]]), 1e-12, f"final {key}")


# --------------------------------------------------------------------------------------------------
# Backends, float32, bad input
# --------------------------------------------------------------------------------------------------
def test_backend_is_visible():
    x = torch.randn(1, 6, D_MODEL)
    for backend, ran in (("torch", "torch"), ("reference", "reference"), ("auto", "torch")):
        layer = make(torch.float32, backend=backend)
        assert layer.last_backend is None
        layer(x)
        assert layer.last_backend == ran
    assert "backend='auto'" in repr(layer)


def test_float32_matches_float64():
    layer = make()
    x = torch.randn(2, 40, D_MODEL, dtype=F64)
    with torch.no_grad():
        y64 = layer(x)
        layer = layer.float()
        y32, state32 = layer(x.float(), return_state=True)
    assert y32.dtype == torch.float32 and all(v.dtype == torch.float32 for v in state32.values())
    assert_close_scaled(y32.double(), y64, 1e-5, "float32")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"d_model \* expand = 10 \* 2 = 20 must be divisible by headdim; "
                                         r"got headdim=8"):
        Mamba2(10, headdim=8)
    with pytest.raises(ValueError, match="ngroups must divide the number of heads nheads = d_inner / headdim = 4; "
                                         "got ngroups=3"):
        Mamba2(10, headdim=5, ngroups=3)
    with pytest.raises(ValueError, match=r"A_init_range must satisfy 0 < low <= high < inf; got \(0, 16\)"):
        Mamba2(10, headdim=5, A_init_range=(0, 16))
    with pytest.raises(ValueError, match=r"dt_limit must satisfy 0 <= min <= max; got \(0.1, 0.01\)"):
        Mamba2(10, headdim=5, dt_limit=(0.1, 0.01))
    with pytest.raises(ValueError, match="chunk_size must be >= 1; got 0"):
        Mamba2(10, headdim=5, chunk_size=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        Mamba2(10, headdim=5, backend="cuda")
    layer = make(torch.float32)
    x = torch.randn(2, 6, D_MODEL)
    with pytest.raises(ValueError, match="seq_idx must be non-decreasing"):
        layer(x, seq_idx=torch.tensor([[0, 0, 1, 1, 0, 0], [0] * 6]))
    with pytest.raises(ValueError, match=r"seq_idx must be \(batch=2, length=6\); got \(6,\)"):
        layer(x, seq_idx=torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="seq_idx must be an integer tensor"):
        layer(x, seq_idx=torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"state\['mamba2.ssm'\] must have shape \(2, 4, 5, 7\)"):
        layer(x, {"mamba2.conv": torch.zeros(2, 48, 3), "mamba2.ssm": torch.zeros(2, 4, 7, 5)})
