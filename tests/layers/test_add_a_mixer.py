"""Adding a mixer is one file: a mixer defined only here, registered with ``@register_mixer``, is picked up
by the contract suite, the optimiser groups, model configs (its pattern letter, from_config, the depth-scaled
init) and compare, and a mixer with missing metadata is refused at registration.

The steps proved here are the ones CONTRIBUTING.md ("Add a mixer") lists.
"""

import json

import pytest
import torch
from torch import nn

from ssmkit import ModelConfig, from_config
from ssmkit.layers import MIXERS, Mixer, pattern_letters, register_mixer
from ssmkit.layers.registry import unregister_mixer
from ssmkit.train.optim import SSM_PARAMETER_NAMES, classify_parameters

from . import test_contract as contract


class ToyDiagonalSSM(Mixer):
    """h_t = a * h_{t-1} + W_in x_t, y_t = W_out h_t with a = exp(-exp(A_log)) per channel: the smallest
    recurrent mixer, computed by the same loop in both forms. x (B, L, D) -> y (B, L, D)."""

    pattern_letter = "T"
    contract_config = dict(scale=1.0)
    ssm_parameter_names = ("A_log",)
    depth_scaled = ("out_proj.weight",)

    def __init__(self, d_model: int, scale: float = 1.0):
        super().__init__(d_model)
        self.in_proj = nn.Linear(d_model, d_model)
        self.A_log = nn.Parameter(torch.full((d_model,), -1.0))
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        with torch.no_grad():
            self.out_proj.weight.fill_(scale)  # a known value, so the depth scaling shows exactly

    def state_spec(self, batch_size):
        return {"h": ((batch_size, self.d_model), False)}

    def _recur(self, u_t, h):
        return torch.exp(-torch.exp(self.A_log)) * h + u_t

    def _forward(self, x, state, return_state):
        u = self.in_proj(x)  # (B, L, D)
        h = state[self.state_key("h")] if state is not None else x.new_zeros(x.shape[0], self.d_model)
        hs = []
        for u_t in u.unbind(1):
            h = self._recur(u_t, h)
            hs.append(h)
        y = self.out_proj(torch.stack(hs, 1))
        return y, ({self.state_key("h"): h} if return_state else None)

    def _step(self, x_t, state):
        h = self._recur(self.in_proj(x_t), state[self.state_key("h")])
        return self.out_proj(h), {self.state_key("h"): h}


@pytest.fixture
def toy():
    """Register the toy mixer for one test only, so no other test sees it."""
    assert "toy" not in MIXERS
    register_mixer("toy")(ToyDiagonalSSM)
    yield "toy"
    unregister_mixer("toy")


def test_contract_suite_runs_on_a_new_mixer(toy):
    """The contract suite builds each mixer from its own contract_config, so it needs no line for a new one."""
    for backend in ToyDiagonalSSM.contract_backends:
        for dtype in contract.DTYPES:
            for length in (1, 63):
                contract.test_forward_equals_recurrence(toy, backend, length, dtype)
            contract.test_chunked_forward_equals_whole(toy, backend, [7, 7, 6], dtype)
            contract.test_causality(toy, backend, dtype)
            contract.test_batch_rows_independent(toy, backend, dtype)
            contract.test_gradients_reach_parameters_and_initial_state(toy, backend, dtype)
    contract.test_bad_input_is_refused_with_clear_errors(toy)


def test_optimiser_groups_read_the_new_mixers_ssm_parameters(toy):
    assert SSM_PARAMETER_NAMES[toy] == ("A_log",)
    model = from_config(ModelConfig(d_model=8, n_layers=2, vocab_size=11, mixer=toy))
    roles = classify_parameters(model)
    assert {n for n, r in roles.items() if r == "ssm"} == {f"backbone.layers.{i}.mixer.A_log" for i in range(2)}
    assert roles["backbone.layers.0.mixer.in_proj.weight"] == "decay"


def test_configs_take_the_new_mixers_letter_and_scale_its_projection(toy, tmp_path):
    assert pattern_letters()["T"] == toy
    config = ModelConfig(d_model=8, n_layers=3, vocab_size=11, mixer="TMT", mixer_kwargs={"mamba": {"d_state": 4}})
    assert config.layer_mixers() == ["toy", "mamba", "toy"]
    model = from_config(config)
    assert isinstance(model.backbone.layers[0].mixer, ToyDiagonalSSM)
    # depth_scaled: the out_proj the mixer filled with ones is divided by sqrt(2 n_layers) at model init
    torch.testing.assert_close(model.backbone.layers[2].mixer.out_proj.weight,
                               torch.full((8, 8), 1 / (2 * 3) ** 0.5))
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["mixer"] == "TMT"


def test_compare_takes_the_new_mixer_by_name(toy, tmp_path):
    from ssmkit.compare import run_compare

    rows = run_compare(models=[toy], budget=0.5, length=8, out=str(tmp_path / "cmp"), eval_lengths=[16],
                       context=32, batch_size=4)
    assert [r["model"] for r in rows] == [toy]


def _mixer_class(**attrs):
    base = dict(pattern_letter="Q", contract_config={})
    base.update(attrs)
    return type("Incomplete", (Mixer,), base)


@pytest.mark.parametrize("attrs, error, match", [
    (dict(pattern_letter=None), TypeError, "pattern_letter"),
    (dict(pattern_letter="QQ"), TypeError, "pattern_letter"),
    (dict(pattern_letter="M"), ValueError, "already used by 'mamba'"),
    (dict(contract_config=None), TypeError, "contract_config"),
    (dict(ssm_parameter_names="A_log"), TypeError, "ssm_parameter_names"),
    (dict(depth_scaled=["out_proj.weight"]), TypeError, "depth_scaled"),
    (dict(constant_state=None), TypeError, "constant_state"),
], ids=["no-letter", "long-letter", "taken-letter", "no-contract-config", "ssm-not-tuple", "scaled-not-tuple",
        "state-not-bool"])
def test_missing_metadata_is_refused_at_registration(attrs, error, match):
    with pytest.raises(error, match=match):
        register_mixer("incomplete")(_mixer_class(**attrs))
    assert "incomplete" not in MIXERS


def test_every_mixer_module_registers_on_import():
    """layers/__init__.py keeps no import list: every module's mixer is registered and exported by name."""
    import ssmkit
    import ssmkit.layers as layers

    for name, cls in MIXERS.items():
        assert getattr(layers, cls.__name__) is cls and getattr(ssmkit, cls.__name__) is cls
        assert cls.__module__ == f"ssmkit.layers.{name}", "one file per mixer, named after it"
