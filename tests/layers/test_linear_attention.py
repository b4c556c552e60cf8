"""LinearAttention mixer: every feature map with and without normalisation against the sequential
specification, forward == step, continuation from a state, bad configurations."""

import pytest
import torch

import ssmkit.layers.linear_attention  # noqa: F401  (registers "linear_attention")
from ssmkit.layers import build_mixer
from ssmkit.layers.linear_attention import LinearAttention
from ssmkit.ops.linear_attention import feature_map, linear_attention_ref

from ..helpers import assert_close_scaled

SETTINGS = [(phi, normalize) for phi in ("elu", "relu", "identity") for normalize in (True, False)]
IDS = [f"{phi}-{'norm' if normalize else 'plain'}" for phi, normalize in SETTINGS]


def make(phi, normalize, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    mixer = LinearAttention(12, n_heads=3, feature_map=phi, normalize=normalize, chunk_size=8, **kwargs).to(dtype)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mixer


def reference(mixer, x, state):
    """The layer written out with the sequential specification of the op."""
    batch, length, _ = x.shape

    def heads(t):
        return t.view(batch, length, mixer.n_heads, mixer.head_dim).transpose(1, 2)

    q = feature_map(heads(mixer.q_proj(x)), mixer.feature_map)
    k = feature_map(heads(mixer.k_proj(x)), mixer.feature_map)
    y, (S, z) = linear_attention_ref(q, k, heads(mixer.v_proj(x)), mixer.normalize, mixer.eps,
                                     (state["linear_attention.S"], state["linear_attention.z"]), True)
    return mixer.o_proj(y.transpose(1, 2).reshape(batch, length, -1)), S, z


@pytest.mark.parametrize("phi, normalize", SETTINGS, ids=IDS)
def test_forward_step_and_chunks_match_the_specification(phi, normalize):
    mixer = make(phi, normalize)
    x = torch.randn(2, 37, 12, dtype=torch.float64)
    with torch.no_grad():
        _, state0 = mixer(torch.randn(2, 5, 12, dtype=torch.float64), return_state=True)
        y_ref, S_ref, z_ref = reference(mixer, x, state0)
        y, state = mixer(x, state0, return_state=True)
        state_steps, ys = state0, []
        for x_t in x.unbind(1):
            y_t, state_steps = mixer.step(x_t, state_steps)
            ys.append(y_t)
        state_chunks, pieces = state0, []
        for chunk in x.split([9, 1, 20, 7], dim=1):
            y_c, state_chunks = mixer(chunk, state_chunks, return_state=True)
            pieces.append(y_c)
    for what, out, st in (("forward", y, state), ("steps", torch.stack(ys, 1), state_steps),
                          ("chunks", torch.cat(pieces, 1), state_chunks)):
        assert_close_scaled(out, y_ref, 1e-10, f"{phi} {what} outputs")
        assert_close_scaled(st["linear_attention.S"], S_ref, 1e-10, f"{phi} {what} S")
        assert_close_scaled(st["linear_attention.z"], z_ref, 1e-10, f"{phi} {what} z")


def test_normalisation_changes_the_output_and_feature_maps_differ():
    x = torch.randn(1, 10, 12)
    with torch.no_grad():
        outs = {(phi, n): make(phi, n, torch.float32)(x) for phi, n in SETTINGS}
    keys = list(outs)
    for i, a in enumerate(keys):
        assert torch.isfinite(outs[a]).all(), a
        for b in keys[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-4, f"{a} and {b} give the same output"


def test_float32_state_and_output_dtype():
    mixer = make("elu", True, torch.float32)
    y, state = mixer(torch.randn(2, 70, 12), return_state=True)
    assert y.dtype == torch.float32 and state["linear_attention.S"].dtype == torch.float32
    assert state["linear_attention.S"].shape == (2, 3, 4, 4) and state["linear_attention.z"].shape == (2, 3, 4)


def test_registered_and_configured():
    mixer = build_mixer("linear_attention", 8, n_heads=2)
    assert isinstance(mixer, LinearAttention) and mixer.head_dim == 4
    assert (mixer.feature_map, mixer.normalize, mixer.chunk_size) == ("elu", True, 64)
    assert set(dict(mixer.named_parameters())) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    assert mixer.state_spec(3) == {"S": ((3, 2, 4, 4), "real"), "z": ((3, 2, 4), "real")}


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads; got d_model=10, n_heads=4"):
        LinearAttention(10, n_heads=4)
    with pytest.raises(ValueError, match=r"feature_map must be one of \['elu', 'identity', 'relu'\]; got 'softmax'"):
        LinearAttention(8, n_heads=2, feature_map="softmax")
    with pytest.raises(ValueError, match="chunk_size must be >= 1; got 0"):
        LinearAttention(8, n_heads=2, chunk_size=0)
    with pytest.raises(TypeError, match="normalize must be a bool; got str"):
        LinearAttention(8, n_heads=2, normalize="yes")
    with pytest.raises(ValueError, match="eps must be a number >= 0; got -0.1"):
        LinearAttention(8, n_heads=2, eps=-0.1)
    with pytest.raises(ValueError, match="n_heads must be >= 1; got 0"):
        LinearAttention(8, n_heads=0)
