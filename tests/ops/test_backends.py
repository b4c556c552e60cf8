"""One resolver for every op: explicit argument > use_backend context > environment > "auto", and what ran
is recorded per call (record_backends), per thread (last_backend) and per layer (Mixer.last_backends)."""

import threading
import warnings

import pytest
import torch

import ssmkit
from ssmkit.ops import record_backends, use_backend
from ssmkit.ops.backends import OPS, last_backend
from ssmkit.ops.conv1d import causal_conv1d
from ssmkit.ops.scan import linear_recurrence
from ssmkit.ops.mamba import selective_scan
from ssmkit.ops.mamba2 import ssd


def scan_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(u=torch.randn(1, 3, 6, generator=g), delta=torch.rand(1, 3, 6, generator=g),
                A=-torch.rand(3, 2, generator=g), B=torch.randn(1, 2, 6, generator=g),
                C=torch.randn(1, 2, 6, generator=g))


def test_every_op_with_backends_is_registered():
    assert {"selective_scan", "selective_state_update", "ssd", "ssd_state_update", "causal_conv1d",
            "causal_conv1d_update", "linear_recurrence", "wkv7", "mamba3_ssm"} <= set(OPS)


def test_precedence_explicit_then_context_then_auto():
    ins = scan_inputs()
    with record_backends() as ran:
        selective_scan(**ins, backend="torch")                      # explicit
        with use_backend("reference"):
            selective_scan(**ins)                                   # context
            selective_scan(**ins, backend="torch")                  # explicit beats the context
            with use_backend(selective_scan="torch"):
                selective_scan(**ins)                               # innermost context wins
            selective_scan(**ins, backend="auto")                   # "auto" defers to the context too
        selective_scan(**ins, backend="reference")
    assert [b for _, b in ran] == ["torch", "reference", "torch", "torch", "reference", "reference"]
    assert last_backend("selective_scan") == "reference"


def test_a_default_applies_only_to_ops_that_have_that_backend():
    ins = scan_inputs()
    x = torch.randn(1, 3, 7)
    with use_backend("cpp"), record_backends() as ran:             # causal_conv1d has no "cpp"
        causal_conv1d(x, torch.randn(3, 4))
        linear_recurrence(torch.rand(5, 2), torch.randn(5, 2), dim=0)
        if "cpp" in ssmkit.ops.mamba.available_backends():
            selective_scan(**ins)
    assert dict(ran)["causal_conv1d"] == "torch"
    assert dict(ran)["linear_recurrence"] == "associative"
    if "selective_scan" in dict(ran):
        assert dict(ran)["selective_scan"] == "cpp"


def test_context_is_restored_even_after_an_error():
    with pytest.raises(RuntimeError):
        with use_backend("reference"):
            raise RuntimeError("boom")
    with record_backends() as ran:
        linear_recurrence(torch.rand(5, 2), torch.randn(5, 2), dim=0)
    assert ran == [("linear_recurrence", "associative")]


def test_choices_do_not_leak_across_threads():
    seen = {}

    def worker():
        with record_backends() as ran:
            linear_recurrence(torch.rand(4), torch.randn(4))
        seen["ran"] = ran

    with use_backend(linear_recurrence="reference"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert seen["ran"] == [("linear_recurrence", "associative")]  # a new thread starts from no context


def test_bad_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"use_backend: unknown op 'selective_scn'.*did you mean 'selective_scan'"):
        with use_backend(selective_scn="cpp"):
            pass
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'torch', 'triton'\] for causal_conv1d"):
        with use_backend(causal_conv1d="cpp"):
            pass
    with pytest.raises(ValueError, match="use_backend: default must be one of"):
        with use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        ssd(torch.randn(1, 4, 1, 2), torch.rand(1, 4, 1), -torch.rand(1), torch.randn(1, 4, 1, 3),
            torch.randn(1, 4, 1, 3), 4, backend="cpp")


def test_layers_record_what_ran_and_scope_their_backend():
    layer = ssmkit.build_mixer("mamba", 8, d_state=4, backend="reference")
    assert layer.last_backend is None and layer.last_backends == {}
    layer(torch.randn(1, 5, 8))
    assert layer.last_backend == "reference"
    assert layer.last_backends["causal_conv1d"] == "torch"      # no "reference" conv: its auto rule
    layer.backend = "auto"
    with use_backend(selective_scan="torch"):                    # the layer defers to the context
        layer(torch.randn(1, 5, 8))
    assert layer.last_backend == "torch"
    state = layer.init_state(1)
    layer.step(torch.randn(1, 8), state)
    assert set(layer.last_backends) == {"causal_conv1d_update", "selective_state_update"}


def test_backends_never_enter_a_model_config(tmp_path):
    with pytest.warns(UserWarning, match=r"ignoring execution setting\(s\) \['mamba.backend'\]"):
        config = ssmkit.ModelConfig(d_model=8, n_layers=1, vocab_size=11, mixer="mamba",
                                    mixer_kwargs={"mamba": {"d_state": 4, "backend": "torch"}})
    assert config.mixer_kwargs == {"mamba": {"d_state": 4}}
    model = ssmkit.from_config(config)
    model.save_pretrained(tmp_path / "m")
    assert "backend" not in (tmp_path / "m" / "config.json").read_text()
    # an older checkpoint whose config carries a backend still loads, the key ignored with a note
    old = (tmp_path / "m" / "config.json").read_text().replace('"d_state": 4', '"backend": "cpp", "d_state": 4')
    (tmp_path / "m" / "config.json").write_text(old)
    with pytest.warns(UserWarning, match="ignoring execution setting"):
        loaded = ssmkit.from_pretrained(tmp_path / "m")
    assert loaded.config.mixer_kwargs == {"mamba": {"d_state": 4}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ssmkit.ModelConfig(d_model=8, n_layers=1, vocab_size=11, mixer="mamba", mixer_kwargs={"d_state": 4})
