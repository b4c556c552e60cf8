"""Recomputation in the Mamba and Mamba-2 layers (``recompute``, an execution choice): the backward runs the
layer's core again instead of keeping its activations. Gradients must be identical to storing them (float64),
with and without carried states; less must be kept for the backward; and the choice never enters a saved
model configuration."""

import json
import warnings

import pytest
import torch

import ssmkit
from ssmkit.models import ModelConfig, SSMModel, set_recompute

CASES = [("mamba", "torch", dict(d_state=5, expand=1.5)), ("mamba", "cpp", dict(d_state=5, expand=1.5)),
         ("mamba2", "torch", dict(d_state=6, headdim=4, expand=2, ngroups=2, chunk_size=16))]


def _skip_without_cpp(backend):
    if backend == "cpp":
        from ssmkit.ops.mamba import cpp
        if not cpp.is_available():
            pytest.skip(f"C++ selective scan unavailable: {cpp.build_error()}")


def _gradients(layer, x, state, recompute):
    layer.recompute = recompute
    layer.zero_grad(set_to_none=True)
    leaves = [x.detach().clone().requires_grad_()]
    if state is not None:
        state = {k: v.detach().clone().requires_grad_() for k, v in state.items()}
        leaves += list(state.values())
    y, new_state = layer(leaves[0], state, return_state=True)
    g = torch.Generator().manual_seed(3)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum() for s in new_state.values())
    loss.backward()
    grads = {f"input{i}": t.grad for i, t in enumerate(leaves)}
    grads.update({n: p.grad.clone() for n, p in layer.named_parameters()})
    return y.detach(), grads


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("kind, backend, kwargs", CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_recompute_gives_identical_gradients_float64(kind, backend, kwargs, with_state):
    _skip_without_cpp(backend)
    torch.manual_seed(0)
    layer = ssmkit.build_mixer(kind, 12 if kind == "mamba" else 8, backend=backend, **kwargs).double()
    x = torch.randn(2, 37, layer.d_model, dtype=torch.float64)
    state = None
    if with_state:
        with torch.no_grad():
            _, state = layer(torch.randn(2, 5, layer.d_model, dtype=torch.float64), return_state=True)
    y_stored, stored = _gradients(layer, x, state, recompute=False)
    y_again, again = _gradients(layer, x, state, recompute=True)
    assert torch.equal(y_stored, y_again)
    assert stored.keys() == again.keys()
    for name in stored:
        assert stored[name] is not None, name
        torch.testing.assert_close(again[name], stored[name], rtol=1e-13, atol=1e-14, msg=lambda m: f"{name}: {m}")


def _saved_bytes(layer, x):
    """Bytes of the distinct tensors autograd keeps for the backward of one forward."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.requires_grad_())
    return sum(seen.values())


@pytest.mark.parametrize("kind, backend, kwargs", CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_recompute_keeps_less_for_the_backward(kind, backend, kwargs):
    _skip_without_cpp(backend)
    layer = ssmkit.build_mixer(kind, 16, backend=backend, **kwargs)
    x = torch.randn(1, 256, 16)
    stored = _saved_bytes(layer, x.clone())
    layer.recompute = True
    kept = _saved_bytes(layer, x.clone())
    assert kept < 0.6 * stored, (kept, stored)


def test_recompute_is_not_part_of_a_saved_config(tmp_path):
    config = ModelConfig(d_model=16, n_layers=2, vocab_size=11, mixer="MD",
                         mixer_kwargs={"mamba": dict(d_state=4), "mamba2": dict(d_state=4, headdim=4)})
    model = SSMModel(config)
    names = set_recompute(model)
    assert names == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    assert all(layer.mixer.recompute for layer in model.backbone.layers)
    assert "recompute" not in json.dumps(model.config.to_dict())
    model.save_pretrained(tmp_path / "ckpt")
    assert "recompute" not in (tmp_path / "ckpt" / "config.json").read_text()
    loaded = SSMModel.from_pretrained(tmp_path / "ckpt")
    assert not any(layer.mixer.recompute for layer in loaded.backbone.layers)
    # given as a mixer keyword, it is dropped with a warning, as backends are
    with pytest.warns(UserWarning, match="recompute"):
        cfg = ModelConfig(d_model=16, n_layers=1, vocab_size=11, mixer="mamba", mixer_kwargs=dict(recompute=True))
    assert "recompute" not in cfg.mixer_kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set_recompute(model, False) and not model.backbone.layers[0].mixer.recompute


def test_recompute_argument_is_checked():
    with pytest.raises(TypeError, match="recompute must be True or False; got 'yes'"):
        ssmkit.build_mixer("mamba", 8, recompute="yes")
    assert ssmkit.build_mixer("mamba2", 8, headdim=4, d_state=4, recompute=True).recompute
