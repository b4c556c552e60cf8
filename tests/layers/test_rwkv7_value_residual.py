"""RWKV-7's value residual (v <- v + (v_first - v) sigmoid(v0 + x^v A_v B_v), the authors' layers >= 1): the
layer against the formula, the model's cross-layer path (forward, chunked with a carried state, step), the
parameters and their gradients."""

import pytest
import torch

from ssmkit import ModelConfig, SSMModel
from ssmkit.layers.rwkv7 import RWKV7

from ..helpers import assert_close_scaled

KWARGS = {"rwkv7": {"head_size": 8, "zero_init_output": False},
          "rwkv7_channel_mix": {"zero_init_output": False}}


def _model(seed: int = 0) -> SSMModel:
    """Three RWKV-7 layers (time mix R, channel mix K each), float64, the value residual's A_v moved off zero
    so that its gate depends on the input."""
    torch.manual_seed(seed)
    config = ModelConfig(d_model=16, n_layers=6, vocab_size=11, mixer="RK" * 3, mlp="none", mixer_kwargs=KWARGS)
    model = SSMModel(config).double()
    with torch.no_grad():
        for layer in model.backbone.layers[2::2]:
            layer.mixer.v1.normal_(0, 0.5)
            layer.mixer.v0.normal_(0, 1.0)
    return model


def _time_mixes(model):
    return [layer.mixer for layer in model.backbone.layers[::2]]


def test_only_time_mixes_after_the_first_have_v0_v1_v2_with_the_authors_init():
    torch.manual_seed(0)
    C = 64
    config = ModelConfig(d_model=C, n_layers=6, vocab_size=11, mixer="RK" * 3, mlp="none")
    first, *later = _time_mixes(SSMModel(config))
    assert not first.value_residual
    assert not any(name.startswith(("v0", "v1", "v2")) for name, _ in first.named_parameters())
    for mix in later:
        assert mix.value_residual
        # the authors' D_MV_LORA = max(32, round(1.7 sqrt C / 32) 32) = 32 at C = 64
        assert (tuple(mix.v0.shape), tuple(mix.v1.shape), tuple(mix.v2.shape)) == ((1, 1, C), (C, 32), (32, C))
        assert torch.all(mix.v0 == 1.0) and not mix.v1.any()
        v2 = mix.v2.detach()
        torch.testing.assert_close(v2 @ v2.T, 0.01 * torch.eye(32), rtol=0, atol=1e-5)


def test_the_layer_mixes_v_with_v_first_as_the_formula():
    """A time mix with the residual == the same layer without it whose value projection returns the mixed v."""
    torch.manual_seed(1)
    mix = RWKV7(16, head_size=8, value_residual=True, zero_init_output=False).double()
    with torch.no_grad():
        mix.v1.normal_(0, 0.5)
        mix.v0.normal_(0, 1.0)
    plain = RWKV7(16, head_size=8, zero_init_output=False).double()
    plain.load_state_dict({k: v for k, v in mix.state_dict().items() if k not in ("v0", "v1", "v2")})
    x, v_first = torch.randn(2, 9, 16, dtype=torch.float64), torch.randn(2, 9, 16, dtype=torch.float64)

    class Mixed(torch.nn.Module):
        def forward(self, x_v):
            v = x_v @ mix.value.weight.T
            return v + (v_first - v) * torch.sigmoid(mix.v0 + x_v @ mix.v1 @ mix.v2)

    plain.value = Mixed()
    assert_close_scaled(mix(x, cross_layer={"v_first": v_first}), plain(x, cross_layer={}), 1e-12)
    assert mix(x, cross_layer={"v_first": v_first}).sub(mix(x, cross_layer={"v_first": 0 * v_first})).abs().max() > 1e-3


def test_the_model_passes_the_first_layers_value_and_it_changes_the_output():
    """The logits depend on what reaches the later time mixes as v_first: the model's forward equals a loop
    over its blocks handing layer 0's v on, and differs from one handing zeros."""
    model = _model()
    tokens = torch.randint(0, 11, (2, 13))
    logits = model(tokens).logits

    def by_hand(v_first_override):
        h = model._embed(tokens)
        cross = {}
        for i, layer in enumerate(model.backbone.layers):
            if v_first_override is not None and i == 2:
                cross["v_first"] = v_first_override(cross["v_first"])
            h, _, _ = layer(h, cross_layer=cross)
        return model._head(h)

    assert_close_scaled(by_hand(None), logits, 1e-12, "the model's forward against its blocks")
    assert (by_hand(torch.zeros_like) - logits).abs().max() > 1e-3


def test_step_parallel_and_chunked_with_a_carried_state_agree():
    model = _model(2)
    tokens = torch.randint(0, 11, (2, 21))
    logits = model(tokens).logits
    out = model(tokens[:, :8], return_state=True)
    rest = model(tokens[:, 8:], state=out.state, return_state=True)
    assert_close_scaled(torch.cat([out.logits, rest.logits], 1), logits, 1e-10, "chunked")
    state, stepped = out.state, [out.logits]
    for t in range(8, tokens.shape[1]):                        # generation from the prefix's carried state
        step_logits, state = model.step(tokens[:, t], state)
        stepped.append(step_logits[:, None])
    assert_close_scaled(torch.cat(stepped, 1), logits, 1e-10, "prefill then step")
    for mix in _time_mixes(model):
        mix.backend = "reference"
    assert_close_scaled(model(tokens).logits, logits, 1e-10, "reference core")


def test_gradients_reach_v0_v1_v2_of_the_later_layers():
    model = _model(3)
    tokens = torch.randint(0, 11, (2, 10))
    model(tokens, labels=tokens).loss.backward()
    for mix in _time_mixes(model)[1:]:
        for name in ("v0", "v1", "v2"):
            grad = mix.get_parameter(name).grad
            assert grad is not None and grad.abs().max() > 1e-8, name


def test_a_later_time_mix_without_v_first_is_refused():
    mix = RWKV7(8, head_size=4, value_residual=True)
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="needs the first time mix's value"):
        mix(x)
    with pytest.raises(ValueError, match="needs the first time mix's value"):
        mix.step(x[:, 0], mix.init_state(1))
    with pytest.raises(ValueError, match=r"cross_layer\['v_first'\] must have the shape"):
        mix(x, cross_layer={"v_first": torch.zeros(1, 2, 8)})
    with pytest.raises(ValueError, match="value_low_rank_dim is for value_residual=True"):
        RWKV7(8, head_size=4, value_low_rank_dim=4)
    with pytest.raises(TypeError, match="value_residual must be a bool"):
        RWKV7(8, head_size=4, value_residual=1)


def test_the_in_place_decoder_passes_v_first():
    """The in-place step of CUDA-graph decoding (recording off here) equals the model's own step."""
    from ssmkit.models.decoding import CUDAGraphDecoder

    model = _model(4).float()
    tokens = torch.randint(0, 11, (2, 6))
    decoder = CUDAGraphDecoder(model, capture=False)
    state, state_inplace = model.init_state(2), model.init_state(2)
    for t in range(tokens.shape[1]):
        want, state = model.step(tokens[:, t], state)
        got, state_inplace = decoder.step(tokens[:, t], state_inplace)
        torch.testing.assert_close(got[:, :11], want[:, :11], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_exported_recurrence_passes_v_first(tmp_path):
    """The exported step and chunk prefill (pt2) generate the eager model's greedy tokens (about 15 s)."""
    from ssmkit.deploy.export import ExportedRecurrence, export_recurrence

    model = _model(5).float().eval()
    export_recurrence(model, tmp_path, format="pt2", prefill_chunk=8)
    runner = ExportedRecurrence(tmp_path)
    assert runner.prompt_mode == "prefill+step"
    prompt = torch.randint(0, 11, (1, 11))
    tokens, _ = runner.generate(prompt, 12)
    assert torch.equal(tokens, model.generate(prompt, 12).new_tokens)
