"""Attention mixer: the SDPA parallel pass against an explicit masked loop, forward == step, the KV cache
(continuation, RoPE positions, bounded under a sliding window), grouped-query heads, bad configurations."""

import math

import pytest
import torch

import ssmkit.layers.attention  # noqa: F401  (registers "attention")
from ssmkit.layers import build_mixer
from ssmkit.layers.attention import Attention
from ssmkit.ops.rope import apply_rope_ref

from ..helpers import assert_close_scaled

CONFIGS = {
    "mha": dict(d_model=12, n_heads=3),
    "gqa": dict(d_model=16, n_heads=4, n_kv_heads=2),
    "mqa-window": dict(d_model=16, n_heads=4, n_kv_heads=1, window=5),
    "window1": dict(d_model=8, n_heads=2, window=1),
    "no-rope": dict(d_model=12, n_heads=2, rope=False, bias=True),
    "head_dim": dict(d_model=10, n_heads=2, head_dim=6, rope_base=500.0, window=7),
}


def make(config, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    mixer = Attention(**CONFIGS[config]).to(dtype)
    with torch.no_grad():  # no accident of the init (zero biases) hides a mistake
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mixer


def reference(mixer, x):
    """The definition, one query and one head at a time, over the whole sequence from position 0."""
    batch, length, _ = x.shape
    H, H_kv, d = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim
    q = mixer.q_proj(x).view(batch, length, H, d).transpose(1, 2)
    k = mixer.k_proj(x).view(batch, length, H_kv, d).transpose(1, 2)
    v = mixer.v_proj(x).view(batch, length, H_kv, d).transpose(1, 2)
    if mixer.rope:
        q, k = apply_rope_ref(q, 0, mixer.rope_base), apply_rope_ref(k, 0, mixer.rope_base)
    out = torch.zeros(batch, length, H, d, dtype=x.dtype)
    for i in range(length):
        first = 0 if mixer.window is None else max(0, i - mixer.window + 1)
        for h in range(H):
            g = h // (H // H_kv)
            scores = torch.einsum("bd,bjd->bj", q[:, h, i], k[:, g, first : i + 1]) / math.sqrt(d)
            out[:, i, h] = torch.einsum("bj,bjd->bd", scores.softmax(-1), v[:, g, first : i + 1])
    return mixer.o_proj(out.reshape(batch, length, H * d))


def cache_length(mixer, state):
    return state[mixer.state_key("k")].shape[2]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_matches_explicit_masked_reference(config):
    mixer = make(config)
    x = torch.randn(2, 19, mixer.d_model, dtype=torch.float64)
    with torch.no_grad():
        assert_close_scaled(mixer(x), reference(mixer, x), 1e-12, config)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_continuing_from_the_cache_matches_the_whole_sequence(config):
    mixer = make(config)
    x = torch.randn(2, 23, mixer.d_model, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(mixer, x)
        state, pieces, seen = mixer.init_state(2, dtype=torch.float64), [], 0
        for chunk in x.split([6, 1, 9, 7], dim=1):
            y, state = mixer(chunk, state, return_state=True)
            pieces.append(y)
            seen += chunk.shape[1]
            assert state[mixer.state_key("pos")].tolist() == [seen, seen]
            limit = mixer.cache_limit
            assert cache_length(mixer, state) == (seen if limit is None else min(seen, limit))
    assert_close_scaled(torch.cat(pieces, 1), expected, 1e-12, config)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_step_loop_matches_forward_and_window_cache_stays_bounded(config):
    mixer = make(config)
    x = torch.randn(2, 17, mixer.d_model, dtype=torch.float64)
    with torch.no_grad():
        _, state0 = mixer(torch.randn(2, 4, mixer.d_model, dtype=torch.float64), return_state=True)
        y, state_forward = mixer(x, state0, return_state=True)
        state, ys = state0, []
        for x_t in x.unbind(1):
            y_t, state = mixer.step(x_t, state)
            ys.append(y_t)
            if mixer.window is not None:
                assert cache_length(mixer, state) == min(int(state["attention.pos"][0]), mixer.window - 1)
    assert_close_scaled(torch.stack(ys, 1), y, 1e-12, config)
    for key in state:  # (window 1 keeps an empty cache, so compare with assert_close, not a scaled max)
        torch.testing.assert_close(state[key], state_forward[key], rtol=1e-12, atol=1e-12)
    assert state[mixer.state_key("pos")].tolist() == [21, 21]
    assert cache_length(mixer, state) == (21 if mixer.window is None else mixer.window - 1)


def test_grouped_query_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(1)
    gqa = Attention(24, n_heads=6, n_kv_heads=2, bias=True).double()
    mha = Attention(24, n_heads=6, bias=True).double()
    group, d = 3, gqa.head_dim
    with torch.no_grad():
        for p in gqa.parameters():
            p.add_(0.05 * torch.randn_like(p))
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.o_proj.load_state_dict(gqa.o_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            source, target = getattr(gqa, name), getattr(mha, name)
            # kv head g serves query heads g*group .. g*group + group - 1
            target.weight.copy_(source.weight.view(2, d, 24).repeat_interleave(group, 0).reshape(6 * d, 24))
            target.bias.copy_(source.bias.view(2, d).repeat_interleave(group, 0).reshape(6 * d))
        x = torch.randn(2, 11, 24, dtype=torch.float64)
        assert_close_scaled(gqa(x), mha(x), 1e-12, "gqa vs mha")
        _, state = gqa(x, return_state=True)
    assert state["attention.k"].shape == (2, 2, 11, d)  # the cache holds the kv heads only


def test_cache_position_sets_rope_phase_only_relative_positions_matter():
    """With an empty cache, starting at any position gives the same outputs (RoPE is relative), per row."""
    mixer = make("gqa")
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    state = mixer.init_state(2, dtype=torch.float64)
    state["attention.pos"] = torch.tensor([5, 1000])
    with torch.no_grad():
        y, new_state = mixer(x, state, return_state=True)
        assert_close_scaled(y, mixer(x), 1e-10, "shifted start")
    assert new_state["attention.pos"].tolist() == [14, 1009]
    # but the cached keys are rotated to those positions: a continuation reads them at the right distance
    k0 = mixer(x, return_state=True)[1]["attention.k"]
    assert (new_state["attention.k"] - k0).abs().max() > 1e-3


def test_causal_and_gradient_reaches_cache():
    mixer = make("mqa-window", torch.float32)
    _, state = mixer(torch.randn(1, 8, 16), return_state=True)
    state = {k: (v.detach().requires_grad_() if v.is_floating_point() else v) for k, v in state.items()}
    y = mixer(torch.randn(1, 3, 16), state)
    y[:, 0].sum().backward()  # the first new token reads the 4 cached tokens (window 5)
    assert state["attention.k"].grad.abs().max() > 0 and state["attention.v"].grad.abs().max() > 0


def test_decoding_appends_in_place_and_branching_copies():
    """Without a window, steps grow one buffer in place (no copy of the cache per token); stepping twice from
    the same state gives the same outputs both times and leaves the first branch's state untouched."""
    mixer = make("gqa")
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(mixer, x)
        _, state = mixer(x[:, :5], return_state=True)
        ys, buffers = [], set()
        for t in range(5, 25):
            y_t, state = mixer.step(x[:, t], state)
            ys.append(y_t)
            buffers.add(state["attention.k"].data_ptr())
        assert len(buffers) == 1  # one buffer: the first step allocated room, the rest wrote into it
        assert_close_scaled(torch.stack(ys, 1), expected[:, 5:25], 1e-12, "in-place steps")
        # branching: two different next tokens from the same state, then the first branch continues
        a_out, a_state = mixer.step(x[:, 25], state)
        keys_a = a_state["attention.k"].clone()
        b_out, b_state = mixer.step(x[:, 26], state)
        assert b_state["attention.k"].data_ptr() != a_state["attention.k"].data_ptr()
        torch.testing.assert_close(a_state["attention.k"], keys_a, rtol=0, atol=0)
        assert_close_scaled(a_out, expected[:, 25], 1e-12, "branch a")
        a2_out, _ = mixer.step(x[:, 26], a_state)
        assert_close_scaled(a2_out, expected[:, 26], 1e-12, "branch a continued")
        y_b, _ = mixer(torch.cat([x[:, :25], x[:, 26:27]], 1))[:, -1:], None
        assert_close_scaled(b_out, y_b[:, 0], 1e-12, "branch b")


def test_gradient_through_a_growing_cache():
    """With gradients recorded the cache is concatenated (never written in place): backward works and
    matches the parallel pass."""
    mixer = make("mha")
    x = torch.randn(1, 10, 12, dtype=torch.float64, requires_grad=True)
    y_full = mixer(x)
    _, state = mixer(x[:, :6], return_state=True)
    y1, state = mixer(x[:, 6:8], state, return_state=True)
    y2, _ = mixer(x[:, 8:], state, return_state=True)
    grad_pieces = torch.autograd.grad(torch.cat([y1, y2], 1).square().sum(), x)[0]
    grad_full = torch.autograd.grad(y_full[:, 6:].square().sum(), x)[0]
    assert_close_scaled(grad_pieces, grad_full, 1e-12, "grad through the cache")


def test_registered_and_configured():
    mixer = build_mixer("attention", 8, n_heads=2)
    assert isinstance(mixer, Attention) and mixer.head_dim == 4 and mixer.n_kv_heads == 2
    assert set(dict(mixer.named_parameters())) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    assert mixer.state_spec(3) == {"k": ((3, 2, None, 4), "cache"), "v": ((3, 2, None, 4), "cache"),
                                   "pos": ((3,), "index")}
    assert mixer.init_state(3)["attention.k"].shape == (3, 2, 0, 4)
    assert mixer.cache_limit is None and Attention(8, 2, window=6).cache_limit == 5


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads.*d_model=10, n_heads=4"):
        Attention(10, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads must divide n_heads; got n_kv_heads=3, n_heads=4"):
        Attention(16, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim must be even with rope=True.*head_dim=3"):
        Attention(12, n_heads=4)
    Attention(12, n_heads=4, rope=False)  # odd heads are fine without rotation
    with pytest.raises(ValueError, match="window must be >= 1; got 0"):
        Attention(8, n_heads=2, window=0)
    with pytest.raises(ValueError, match="n_heads must be >= 1; got 0"):
        Attention(8, n_heads=0)
    with pytest.raises(TypeError, match="n_kv_heads must be an int; got float"):
        Attention(8, n_heads=2, n_kv_heads=2.0)
    with pytest.raises(ValueError, match="rope_base must be a finite number > 1; got 1"):
        Attention(8, n_heads=2, rope_base=1)
    with pytest.raises(TypeError, match="rope must be a bool; got str"):
        Attention(8, n_heads=2, rope="yes")
