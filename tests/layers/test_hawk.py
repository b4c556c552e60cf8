"""Hawk / Griffin recurrent block: equal to transformers' RecurrentGemmaRecurrentBlock on copied weights
(parallel and decoding), packing == separate runs, RecurrentGemma's initialisation, and the RG-LRU's
normalisation property (its state keeps the input's scale)."""

import math

import pytest
import torch

import ssmkit
from ssmkit import ModelConfig, SSMModel
from ssmkit.layers.hawk import Hawk
from ssmkit.ops.rglru import rglru

from ..helpers import assert_close_scaled

torch.set_flush_denormal(True)


def transformers_block(d_model, lru_width, n_heads):
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRecurrentBlock
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no RecurrentGemma")
    config = transformers.RecurrentGemmaConfig(hidden_size=d_model, lru_width=lru_width,
                                               num_attention_heads=n_heads, conv1d_width=4, num_hidden_layers=2,
                                               vocab_size=10, intermediate_size=2 * d_model)
    return RecurrentGemmaRecurrentBlock(config, 0)


def pair(d_model=16, lru_width=None, n_heads=4, seed=0):
    """Our block with every parameter perturbed (non-zero biases), and transformers' with the same weights."""
    torch.manual_seed(seed)
    ours = Hawk(d_model, lru_width=lru_width, n_heads=n_heads)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    theirs = transformers_block(d_model, ours.lru_width, n_heads)
    theirs.load_state_dict(ours.state_dict())  # strict: the parameter names and shapes are theirs
    return ours, theirs


def positions(batch, start, length):
    return (torch.arange(length) + start)[None].expand(batch, -1)


@pytest.mark.parametrize("lru_width", [None, 24])
@pytest.mark.parametrize("backend", ["chunked", "associative", "reference"])
def test_matches_transformers_forward(backend, lru_width):
    """From a document start (transformers: position 0, where a_t = 0) over 50 tokens. transformers runs
    the recurrence in float32 whatever the input's dtype, so the comparison is at float32 rounding."""
    ours, theirs = pair(lru_width=lru_width)
    ours.backend = backend
    x = torch.randn(3, 50, 16)
    with torch.no_grad():
        expected, _ = theirs(x, positions(3, 0, 50), None, use_cache=False)
        got = ours(x)
    assert ours.last_backend == backend
    assert_close_scaled(got, expected, 1e-5, f"{backend} vs transformers")


def test_matches_transformers_decoding():
    """Prefill 9 tokens, then decode 7 one at a time, with transformers' own cache; states compared too."""
    ours, theirs = pair()
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        expected = [theirs(x[:, :9], positions(2, 0, 9), None, use_cache=True)[0]]
        theirs_h_after_prefill = theirs.rg_lru.recurrent_states.clone()
        for t in range(9, 16):
            expected.append(theirs(x[:, t:t + 1], positions(2, t, 1), None, use_cache=True)[0])
        y, state = ours(x[:, :9], return_state=True)
        assert_close_scaled(state["hawk.h"], theirs_h_after_prefill, 1e-5, "h after prefill")
        steps = []
        for t in range(9, 16):
            y_t, state = ours.step(x[:, t], state)
            steps.append(y_t[:, None])
    assert_close_scaled(torch.cat([y] + steps, 1), torch.cat(expected, 1), 1e-5, "decoding vs transformers")
    assert_close_scaled(state["hawk.h"], theirs.rg_lru.recurrent_states, 1e-5, "final h")
    assert_close_scaled(state["hawk.conv"], theirs.conv1d_state, 1e-6, "final conv window")
    assert state["hawk.pos"].tolist() == [16, 16]


def test_first_token_of_a_document_is_a_reset():
    """A fresh state starts a document (a_0 = 0, the first input unnormalised); a continued state does not,
    so the same tokens after a prefix give different outputs than from scratch."""
    torch.manual_seed(1)
    layer = Hawk(8, n_heads=2).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    fresh = layer(x)
    stepped, state = [], layer.init_state(1)
    for t in range(6):
        y_t, state = layer.step(x[:, t], state)
        stepped.append(y_t)
    assert_close_scaled(torch.stack(stepped, 1), fresh, 1e-12, "init_state steps == forward without state")
    zero_history = {k: (v + 1 if k == "hawk.pos" else v) for k, v in layer.init_state(1).items()}
    continued = layer(x, zero_history)  # zero h but not a document start: the first input is normalised
    assert (continued[:, 0] - fresh[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["chunked", "associative"])
def test_packed_sequences_equal_separate_runs_with_gradients(backend):
    torch.manual_seed(2)
    layer = Hawk(8, lru_width=12, n_heads=3, backend=backend).double()
    lengths = [5, 1, 9, 4]
    x = torch.randn(1, sum(lengths), 8, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    packed, state = layer(x, return_state=True, cu_seqlens=cu)
    alone = [layer(piece, return_state=True) for piece in x.split(lengths, dim=1)]
    assert_close_scaled(packed, torch.cat([y for y, _ in alone], 1), 1e-12, "packed vs separate")
    for key in state:
        assert torch.allclose(state[key], alone[-1][1][key]), key
    g = torch.randn_like(packed)
    grads_packed = torch.autograd.grad((packed * g).sum(), [x] + list(layer.parameters()))
    separate = torch.cat([y for y, _ in alone], 1)
    grads_alone = torch.autograd.grad((separate * g).sum(), [x] + list(layer.parameters()))
    for a, b in zip(grads_packed, grads_alone):
        assert_close_scaled(a, b, 1e-12, "gradient")


def test_packed_rows_with_an_initial_state_continue_the_first_sequence():
    torch.manual_seed(3)
    layer = Hawk(8, n_heads=2).double()
    prefix = torch.randn(2, 4, 8, dtype=torch.float64)
    _, state = layer(prefix, return_state=True)
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 3 + [1] * 7, [0] * 10])
    y = layer(x, state, seq_idx=seq_idx)
    row0 = torch.cat([layer(x[:1, :3], {k: v[:1] for k, v in state.items()}), layer(x[:1, 3:])], 1)
    row1 = layer(x[1:], {k: v[1:] for k, v in state.items()})
    assert_close_scaled(y, torch.cat([row0, row1]), 1e-12, "packed rows")


def test_parameter_shapes_and_recurrentgemma_initialisation():
    torch.manual_seed(4)
    layer = Hawk(256, lru_width=512, n_heads=8)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"linear_y.weight": (512, 256), "linear_y.bias": (512,), "linear_x.weight": (512, 256),
                      "linear_x.bias": (512,), "linear_out.weight": (256, 512), "linear_out.bias": (256,),
                      "conv_1d.weight": (512, 1, 4), "conv_1d.bias": (512,),
                      "rg_lru.recurrent_param": (512,), "rg_lru.input_gate_weight": (8, 64, 64),
                      "rg_lru.input_gate_bias": (8, 64), "rg_lru.recurrent_gate_weight": (8, 64, 64),
                      "rg_lru.recurrent_gate_bias": (8, 64)}
    a = torch.sigmoid(-layer.rg_lru.recurrent_param.detach())  # a = sigmoid(Lambda)
    assert 0.9 - 1e-6 <= a.min() and a.max() <= 0.999 + 1e-6
    assert abs((a ** 2).mean().item() - (0.81 + 0.998) / 2) < 0.02  # a^2 uniform on [0.9^2, 0.999^2]
    for name, std in (("linear_x.weight", 1 / 16), ("linear_y.weight", 1 / 16), ("conv_1d.weight", 0.05),
                      ("rg_lru.input_gate_weight", math.sqrt(0.01 / 64)),
                      ("rg_lru.recurrent_gate_weight", math.sqrt(0.01 / 64))):
        assert abs(layer.get_parameter(name).std().item() / std - 1) < 0.05, name
    for name in ("linear_x.bias", "linear_y.bias", "linear_out.bias", "conv_1d.bias", "rg_lru.input_gate_bias",
                 "rg_lru.recurrent_gate_bias"):
        assert not layer.get_parameter(name).any(), name
    # in a model of n layers, depth scaling brings linear_out to RecurrentGemma's N(0, (2 / n) / W)
    model = SSMModel(ModelConfig(d_model=128, n_layers=3, vocab_size=10, mixer="hawk",
                                 mixer_kwargs={"lru_width": 256, "n_heads": 4}))
    weight = model.backbone.layers[0].mixer.linear_out.weight
    assert abs(weight.std().item() / math.sqrt(2 / 3 / 256) - 1) < 0.05


# --------------------------------------------------------------------------------------------------
# The normalisation sqrt(1 - a_t^2) (Griffin Sec. 2.4, after the LRU of Orvieto et al. 2023)
# --------------------------------------------------------------------------------------------------
def _gates_for_constant_a(a, n_heads=1):
    """RG-LRU parameters whose gates are constant: r_t = 1/2 (so a_t = a_base^4), i_t = 1/2."""
    width = a.numel()
    block = width // n_heads
    zeros_w, zeros_b = torch.zeros(n_heads, block, block, dtype=a.dtype), torch.zeros(n_heads, block, dtype=a.dtype)
    a_base = a ** (1 / 4)  # a_t = a_base^(8 * 1/2)
    recurrent_param = torch.log(1 / a_base - 1)
    return recurrent_param, zeros_w, zeros_b, zeros_w, zeros_b


def test_normalisation_keeps_the_state_variance_equal_to_the_input_variance():
    """For white-noise input u_t = i_t x_t, E[h^2] = E[u^2] at every a (without the factor sqrt(1 - a^2) it
    would be E[u^2] / (1 - a^2): 5.3 at a = 0.9, 50 at a = 0.99)."""
    torch.manual_seed(5)
    a = torch.tensor([0.0, 0.5, 0.9, 0.97, 0.99], dtype=torch.float64)
    x = torch.randn(16, 20_000, 5, dtype=torch.float64)
    h = rglru(x, *_gates_for_constant_a(a))
    u = 0.5 * x
    ratio = h[:, 2000:].square().mean((0, 1)) / u[:, 2000:].square().mean((0, 1))  # after the burn-in
    assert ((ratio - 1).abs() < 0.1).all(), ratio
    unnormalised = 1 / (1 - a[1:] ** 2)
    assert (unnormalised > 1.3).all()


def test_state_is_bounded_by_the_normalisation_over_long_random_inputs():
    """|h_t| <= max_s |i_s x_s| * sqrt((1 + a_max) / (1 - a_max)) with a_max = max_t a_t: by induction, since
    a S + sqrt(1 - a^2) <= S for S = sqrt((1 + a') / (1 - a')) and every a <= a'. Checked on a random layer's
    RG-LRU over 20k random steps (inputs up to 10x the usual scale), and the bound is attained."""
    torch.manual_seed(6)
    layer = Hawk(16, n_heads=4).double()
    with torch.no_grad():
        for p in layer.rg_lru.parameters():
            p.add_(0.5 * torch.randn_like(p))
    params = layer.rg_lru.parameters_in_order()
    x = torch.randn(4, 20_000, 16, dtype=torch.float64) * torch.logspace(-1, 1, 16, dtype=torch.float64)
    with torch.no_grad():
        h = rglru(x, *params)
        blocks = x.reshape(4, 20_000, 4, 4)
        r = torch.sigmoid(torch.einsum("blhi,hij->blhj", blocks, params[3]) + params[4]).reshape(x.shape)
        i = torch.sigmoid(torch.einsum("blhi,hij->blhj", blocks, params[1]) + params[2]).reshape(x.shape)
        a_t = torch.exp(-8 * r * torch.nn.functional.softplus(params[0]))
    a_max = a_t.amax(1)  # per row and channel
    bound = (i * x).abs().amax(1) * torch.sqrt((1 + a_max) / (1 - a_max))
    assert (h.abs().amax(1) <= bound * (1 + 1e-12)).all()
    # tight: a constant input with a constant a drives |h| to the bound, above max |u| itself
    a = torch.tensor([0.9], dtype=torch.float64)
    h_const = rglru(torch.ones(1, 500, 1, dtype=torch.float64), *_gates_for_constant_a(a))
    assert abs(h_const[0, -1, 0].item() / (0.5 * math.sqrt(1.9 / 0.1)) - 1) < 1e-9


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n_heads must divide lru_width; got lru_width=10, n_heads=4"):
        Hawk(10, n_heads=4)
    with pytest.raises(ValueError, match="lru_width must be"):
        Hawk(8, lru_width=0, n_heads=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        Hawk(8, n_heads=2, backend="triton")
    with pytest.raises(ValueError, match="w_init_variance_scale"):
        Hawk(8, n_heads=2, w_init_variance_scale=0)
    assert ssmkit.Hawk is Hawk and ssmkit.get_mixer("hawk") is Hawk
