"""Causal linear attention: the chunked parallel form and the recurrent step against the sequential
specification, on outputs, final states and gradients, in float64, on awkward sizes."""

import pytest
import torch

from ssmkit.ops.linear_attention import (feature_map, linear_attention_chunked, linear_attention_ref,
                                         linear_attention_step)


def make_inputs(batch, heads, length, dk, dv, dtype=torch.float64, positive=True, with_state=True):
    q, k = torch.randn(batch, heads, length, dk, dtype=dtype), torch.randn(batch, heads, length, dk, dtype=dtype)
    if positive:  # normalised attention expects non-negative features
        q, k = feature_map(q, "elu"), feature_map(k, "elu")
    v = torch.randn(batch, heads, length, dv, dtype=dtype)
    state = None
    if with_state:
        S = torch.randn(batch, heads, dk, dv, dtype=dtype)
        z = torch.rand(batch, heads, dk, dtype=dtype) * 3 if positive else torch.randn(batch, heads, dk, dtype=dtype)
        state = (S, z)
    return q, k, v, state


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "plain"])
@pytest.mark.parametrize("length", [1, 16, 63, 130])
def test_chunked_matches_reference_outputs_states_and_gradients(length, normalize):
    q, k, v, (S0, z0) = make_inputs(2, 3, length, 5, 7, positive=normalize)
    leaves = [t.requires_grad_() for t in (q, k, v, S0, z0)]
    y, (S, z) = linear_attention_chunked(q, k, v, normalize, chunk_size=16, initial_state=(S0, z0),
                                         return_final_state=True)
    y_ref, (S_ref, z_ref) = linear_attention_ref(q, k, v, normalize, initial_state=(S0, z0), return_final_state=True)
    close(y, y_ref)
    close(S, S_ref)
    close(z, z_ref)
    weights = [torch.randn_like(t) for t in (y, S, z)]

    def grads(outputs):
        loss = sum((o * w).sum() for o, w in zip(outputs, weights))
        return torch.autograd.grad(loss, leaves)

    for name, g, g_ref in zip("q k v S0 z0".split(), grads((y, S, z)), grads((y_ref, S_ref, z_ref))):
        assert g.abs().max() > 0, f"no gradient reaches {name}"
        close(g, g_ref)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_result_does_not_depend_on_chunk_size(chunk_size):
    q, k, v, state = make_inputs(1, 2, 50, 4, 4)
    y_ref, (S_ref, z_ref) = linear_attention_ref(q, k, v, initial_state=state, return_final_state=True)
    y, (S, z) = linear_attention_chunked(q, k, v, chunk_size=chunk_size, initial_state=state, return_final_state=True)
    close(y, y_ref)
    close(S, S_ref)
    close(z, z_ref)


def test_zero_initial_state_is_the_default():
    q, k, v, _ = make_inputs(2, 1, 20, 3, 2, with_state=False)
    zeros = (torch.zeros(2, 1, 3, 2, dtype=torch.float64), torch.zeros(2, 1, 3, dtype=torch.float64))
    close(linear_attention_chunked(q, k, v, chunk_size=8), linear_attention_ref(q, k, v, initial_state=zeros))


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "plain"])
def test_step_loop_matches_reference(normalize):
    q, k, v, state = make_inputs(2, 2, 33, 6, 3, positive=normalize)
    y_ref, (S_ref, z_ref) = linear_attention_ref(q, k, v, normalize, initial_state=state, return_final_state=True)
    ys = []
    for q_t, k_t, v_t in zip(q.unbind(2), k.unbind(2), v.unbind(2)):
        y_t, state = linear_attention_step(q_t, k_t, v_t, state, normalize)
        ys.append(y_t)
    close(torch.stack(ys, 2), y_ref)
    close(state[0], S_ref)
    close(state[1], z_ref)


def test_normalized_output_is_a_weighted_average_of_values():
    """With eps = 0 and positive features the weights phi(q).phi(k_s) / sum sum to one: constant v in, same v out."""
    q, k, _, _ = make_inputs(1, 2, 25, 4, 3, with_state=False)
    v = torch.full((1, 2, 25, 3), 2.5, dtype=torch.float64)
    close(linear_attention_chunked(q, k, v, eps=0.0, chunk_size=8), v)
    # the first output is v_1 itself (only one key so far), and the softmax-free weights are causal
    q2, k2, v2, _ = make_inputs(1, 1, 10, 4, 3, with_state=False)
    y = linear_attention_chunked(q2, k2, v2, eps=0.0, chunk_size=4)
    close(y[:, :, 0], v2[:, :, 0])
    v3 = v2.clone()
    v3[:, :, 6:] += 1.0
    y3 = linear_attention_chunked(q2, k2, v3, eps=0.0, chunk_size=4)
    close(y3[:, :, :6], y[:, :, :6])
    assert (y3[:, :, 6:] - y[:, :, 6:]).abs().min() > 1e-3


def test_float32_accumulates_within_rounding_and_keeps_dtype():
    q, k, v, state = make_inputs(1, 2, 300, 8, 8)
    y64 = linear_attention_ref(q, k, v, initial_state=state)
    y32, (S32, _) = linear_attention_chunked(q.float(), k.float(), v.float(), chunk_size=32,
                                             initial_state=tuple(s.float() for s in state), return_final_state=True)
    assert y32.dtype == torch.float32 and S32.dtype == torch.float32
    assert (y32.double() - y64).abs().max() < 1e-5
    y16 = linear_attention_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), chunk_size=32)
    assert y16.dtype == torch.bfloat16


def test_feature_maps():
    x = torch.tensor([-2.0, 0.0, 3.0])
    close(feature_map(x, "elu"), torch.tensor([torch.exp(torch.tensor(-2.0)).item(), 1.0, 4.0]), 1e-6)
    close(feature_map(x, "relu"), torch.tensor([0.0, 0.0, 3.0]))
    assert feature_map(x, "identity") is x
    with pytest.raises(ValueError, match=r"feature_map must be one of \['elu', 'identity', 'relu'\]; got 'tanh'"):
        feature_map(x, "tanh")


def test_bad_input_is_refused():
    q, k, v, state = make_inputs(2, 3, 10, 4, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q must be \(batch, heads, L, dk\); got \(3, 10, 4\)"):
        linear_attention_chunked(q[0], k[0], v[0])
    with pytest.raises(ValueError, match=r"k must be q's shape \(2, 3, 10, 4\); got \(2, 3, 10, 5\)"):
        linear_attention_chunked(q, torch.randn(2, 3, 10, 5), v)
    with pytest.raises(ValueError, match=r"v must be \(batch=2, heads=3, L=10, dv\); got \(2, 3, 9, 5\)"):
        linear_attention_ref(q, k, v[:, :, :9])
    with pytest.raises(TypeError, match="v must have q's dtype"):
        linear_attention_chunked(q, k, v.double())
    with pytest.raises(ValueError, match=r"S must be \(batch=2, heads=3, dk=4, dv=5\); got \(2, 3, 5, 4\)"):
        linear_attention_chunked(q, k, v, initial_state=(state[0].transpose(-1, -2), state[1]))
    with pytest.raises(TypeError, match=r"initial_state must be a pair \(S, z\)"):
        linear_attention_chunked(q, k, v, initial_state=state[0])
    with pytest.raises(ValueError, match="chunk_size must be >= 1; got 0"):
        linear_attention_chunked(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="eps must be a number >= 0; got -1"):
        linear_attention_chunked(q, k, v, eps=-1)
    with pytest.raises(ValueError, match=r"z must be \(batch=2, heads=3, dk=4\); got \(2, 3, 5\)"):
        linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], (state[0], torch.zeros(2, 3, 5)))
    with pytest.raises(ValueError, match="L >= 1"):
        linear_attention_ref(q[:, :, :0], k[:, :, :0], v[:, :, :0])
