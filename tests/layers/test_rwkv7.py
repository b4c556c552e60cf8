"""RWKV-7 time mix and channel mix: the authors' parameter names, shapes and initialisation; the layer against
the equations of the paper (Peng et al. 2025, Sec. 4) written out token by token with dense per-head matrices;
an RWKV-7 model (time mix and channel mix alternating) decoding token by token == its parallel forward."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit import ModelConfig, SSMModel
from ssmkit.layers.rwkv7 import RWKV7
from ssmkit.layers.rwkv7_channel_mix import RWKV7ChannelMix

from ..helpers import assert_close_scaled


def test_parameter_names_and_shapes_are_the_authors():
    """BlinkDL/RWKV-LM RWKV-v7 ``RWKV_Tmix_x070`` / ``RWKV_CMix_x070`` at C = 64, head size 16, and the
    authors' suggested low-rank widths (32 for decay and alpha, 128 for the gate at this width)."""
    C, H, N = 64, 4, 16
    shapes = {name: tuple(p.shape) for name, p in RWKV7(C, head_size=N).named_parameters()}
    expected = {**{name: (1, 1, C) for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k",
                                                "k_a")},
                "w1": (C, 32), "w2": (32, C), "a1": (C, 32), "a2": (32, C), "g1": (C, 128), "g2": (128, C),
                "r_k": (H, N), "receptance.weight": (C, C), "key.weight": (C, C), "value.weight": (C, C),
                "output.weight": (C, C), "ln_x.weight": (C,), "ln_x.bias": (C,)}
    assert shapes == expected
    assert {n: tuple(p.shape) for n, p in RWKV7ChannelMix(C).named_parameters()} == {
        "x_k": (1, 1, C), "key.weight": (4 * C, C), "value.weight": (C, 4 * C)}
    assert RWKV7(C, head_size=N).ln_x.eps == 64e-5


def test_initialisation_is_the_authors():
    C, N, n_layers, layer_id = 64, 16, 4, 1
    layer = RWKV7(C, head_size=N, layer_id=layer_id, n_layers=n_layers)
    i = torch.arange(C, dtype=torch.float64)
    ratio_0_to_1, ratio_1_to_0 = layer_id / (n_layers - 1), 1 - layer_id / n_layers
    torch.testing.assert_close(layer.x_r.detach().double().flatten(), 1 - (i / C) ** (0.2 * ratio_1_to_0),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.x_w.detach().double().flatten(), 1 - (i / C) ** (0.9 * ratio_1_to_0),
                               rtol=1e-6, atol=1e-7)
    zigzag = ((i % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()
    w0 = -6 + 6 * (i / (C - 1)) ** (1 + ratio_0_to_1 ** 0.3) + 0.5 + 2.5 * zigzag
    torch.testing.assert_close(layer.w0.detach().double().flatten(), w0, rtol=1e-6, atol=1e-6)
    linear = i / (C - 1) - 0.5
    torch.testing.assert_close(layer.a0.detach().double().flatten(), -0.19 + 0.3 * zigzag + 0.4 * linear,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.k_k.detach().double().flatten(), 0.71 - 0.1 * linear, rtol=1e-6, atol=1e-6)
    assert torch.all(layer.k_a == 1.02) and torch.all(layer.r_k == -0.04)
    for first, second in (("w1", "w2"), ("a1", "a2"), ("g1", "g2")):
        assert not layer.get_parameter(first).any(), first
        w = layer.get_parameter(second).detach()      # (rank, C): orthogonal, gain 0.1 * sqrt(rank / C) if tall
        if w.shape[0] <= w.shape[1]:
            torch.testing.assert_close(w @ w.T, 0.01 * torch.eye(w.shape[0]), rtol=0, atol=1e-5)
        else:
            ratio = w.shape[0] / w.shape[1]
            torch.testing.assert_close(w.T @ w, 0.01 * ratio * torch.eye(w.shape[1]), rtol=0, atol=1e-5)
    assert not layer.output.weight.any()
    bound = 1 / math.sqrt(C)
    for name, scale in (("receptance", 0.5), ("key", 0.05), ("value", 0.5)):
        weight = layer.get_submodule(name).weight
        assert weight.abs().max() <= scale * bound and weight.abs().max() > 0.9 * scale * bound, name
    channel_mix = RWKV7ChannelMix(C, layer_id=layer_id, n_layers=n_layers)
    torch.testing.assert_close(channel_mix.x_k.detach().double().flatten(), 1 - (i / C) ** (ratio_1_to_0 ** 4),
                               rtol=1e-6, atol=1e-7)
    assert not channel_mix.value.weight.any()
    assert channel_mix.key.weight.abs().max() <= 0.5 * bound


def papers_time_mix(layer, x):
    """The time mix of Sec. 4 (equations in layers/rwkv7.py) for one sequence x (L, C), token by token, with the
    state of each head a dense (N, N) matrix updated by S (diag(w) - kappa_hat^T (alpha kappa_hat)) + v^T k~."""
    H, N = layer.n_heads, layer.head_size
    p = {name: t.detach().squeeze() if t.dim() == 3 else t.detach() for name, t in layer.named_parameters()}
    S = torch.zeros(H, N, N, dtype=x.dtype)
    previous = torch.zeros_like(x[0])
    outputs = []
    for x_t in x:
        lerp = {s: x_t + (previous - x_t) * p[f"x_{s}"] for s in "rwkvag"}
        previous = x_t
        r = p["receptance.weight"] @ lerp["r"]
        k = p["key.weight"] @ lerp["k"]
        v = p["value.weight"] @ lerp["v"]
        d = p["w0"] + torch.tanh(lerp["w"] @ p["w1"]) @ p["w2"]
        w = torch.exp(-torch.exp(-0.5 - F.softplus(-d)))                          # decay in (exp(-e^-0.5), 1)
        alpha = torch.sigmoid(p["a0"] + lerp["a"] @ p["a1"] @ p["a2"])
        g = torch.sigmoid(lerp["g"] @ p["g1"]) @ p["g2"]
        kappa = (k * p["k_k"]).view(H, N)
        kappa_hat = kappa / kappa.norm(dim=-1, keepdim=True)
        k_tilde = (k * (1 + (alpha - 1) * p["k_a"])).view(H, N)
        r, v, w, alpha = r.view(H, N), v.view(H, N), w.view(H, N), alpha.view(H, N)
        y = []
        for h in range(H):
            transition = torch.diag(w[h]) - torch.outer(kappa_hat[h], alpha[h] * kappa_hat[h])
            S[h] = S[h] @ transition + torch.outer(v[h], k_tilde[h])
            wkv = S[h] @ r[h]
            normed = (wkv - wkv.mean()) / torch.sqrt(wkv.var(unbiased=False) + 64e-5)
            normed = normed * p["ln_x.weight"].view(H, N)[h] + p["ln_x.bias"].view(H, N)[h]
            y.append(normed + (r[h] * k_tilde[h] * p["r_k"][h]).sum() * v[h])
        outputs.append(p["output.weight"] @ (torch.cat(y) * g))
    return torch.stack(outputs)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_time_mix_is_the_papers_equations(backend):
    torch.manual_seed(0)
    layer = RWKV7(12, head_size=4, decay_low_rank_dim=5, a_low_rank_dim=3, gate_low_rank_dim=6, backend=backend,
                  chunk_size=4).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))         # every weight non-zero and off its initial pattern
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    y = layer(x)
    assert layer.last_backend == backend
    for row in range(2):
        assert_close_scaled(y[row], papers_time_mix(layer, x[row]), 1e-10, f"row {row}")


def test_channel_mix_is_the_papers_equation():
    torch.manual_seed(1)
    layer = RWKV7ChannelMix(6, hidden_dim=10, zero_init_output=False).double()
    x = torch.randn(1, 7, 6, dtype=torch.float64)
    previous = torch.cat([torch.zeros(1, 1, 6, dtype=torch.float64), x[:, :-1]], 1)
    k = torch.relu((x + (previous - x) * layer.x_k) @ layer.key.weight.T) ** 2
    assert_close_scaled(layer(x), k @ layer.value.weight.T, 1e-12)


def test_an_rwkv7_model_decodes_token_by_token_as_its_forward():
    """Time mix and channel mix alternating ("RK" per RWKV-7 layer, no separate MLP): the model's parallel
    forward equals its step-by-step decoding, and the chunked core equals the reference loop."""
    torch.manual_seed(0)
    config = ModelConfig(d_model=16, n_layers=4, vocab_size=11, mixer="RKRK", mlp="none",
                         mixer_kwargs={"rwkv7": {"head_size": 8, "zero_init_output": False},
                                       "rwkv7_channel_mix": {"zero_init_output": False}})
    model = SSMModel(config).double()
    tokens = torch.randint(0, 11, (2, 23))
    logits = model(tokens).logits
    state = model.init_state(2)
    stepped = []
    for t in range(tokens.shape[1]):
        out, state = model.step(tokens[:, t], state)
        stepped.append(out)
    assert_close_scaled(torch.stack(stepped, 1), logits, 1e-10, "step-by-step logits")
    for layer in model.backbone.layers[::2]:
        layer.mixer.backend = "reference"
    assert_close_scaled(model(tokens).logits, logits, 1e-10, "reference core")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="head_size must divide d_model; got d_model=12, head_size=5"):
        RWKV7(12, head_size=5)
    with pytest.raises(ValueError, match="layer_id must be < n_layers=2; got 2"):
        RWKV7(8, head_size=4, layer_id=2, n_layers=2)
    with pytest.raises(TypeError, match="zero_init_output must be a bool; got 1"):
        RWKV7ChannelMix(8, zero_init_output=1)
    with pytest.raises(ValueError, match="backend"):
        RWKV7(8, head_size=4, backend="triton")
