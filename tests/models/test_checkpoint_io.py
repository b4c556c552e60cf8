"""Checkpoint files and formats: one clear error for each kind of bad directory, the format table, and the
one place that builds ssmkit's config.json."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssmkit.models import ModelConfig, SSMModel, from_pretrained
from ssmkit.models import io
from ssmkit.models.interop import FORMATS, CheckpointFormat, format_of, register_format, supported_model_types


def tiny(**overrides) -> SSMModel:
    fields = dict(d_model=16, n_layers=2, vocab_size=23, mixer="mamba", mixer_kwargs={"mamba": {"d_state": 4}})
    fields.update(overrides)
    torch.manual_seed(0)
    return SSMModel(ModelConfig(**fields)).eval()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_is_one_error_naming_the_file(tmp_path, damage):
    tiny().save_pretrained(tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    with pytest.raises(ValueError, match=re.escape(str(weights)) + ".*truncated or corrupt") as info:
        from_pretrained(tmp_path / "c")
    assert "SafetensorError" not in type(info.value).__name__


def test_corrupt_shard_is_named(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "s")
    tensors = load_file(str(tmp_path / "s" / "model.safetensors"))
    (tmp_path / "s" / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(tmp_path / "s" / "part-1.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(tmp_path / "s" / "part-2.safetensors"))
    weight_map = {k: "part-1.safetensors" if i < half else "part-2.safetensors" for i, k in enumerate(names)}
    (tmp_path / "s" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = from_pretrained(tmp_path / "s")  # sharded weights load
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    shard = tmp_path / "s" / "part-2.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        from_pretrained(tmp_path / "s")


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match="unrecognised checkpoint") as info:
        from_pretrained(tmp_path / "x")
    for model_type in ("ssmkit", "mamba", "mamba2", "state-spaces"):
        assert repr(model_type) in str(info.value)
    assert set(supported_model_types()) >= {"ssmkit", "mamba", "mamba2", "state-spaces"}


def test_config_that_is_not_json_names_the_file(tmp_path):
    tiny().save_pretrained(tmp_path / "j")
    (tmp_path / "j" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "j" / "config.json")) + " is not valid JSON"):
        from_pretrained(tmp_path / "j")


def test_mismatch_lists_missing_unexpected_and_misshaped_tensors_together(tmp_path):
    tiny().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["backbone.norm_f.weight"]
    tensors["backbone.extra.weight"] = torch.zeros(3)
    tensors["backbone.embeddings.weight"] = torch.zeros(23, 17)
    save_file(tensors, str(path))
    with pytest.raises(ValueError) as info:
        from_pretrained(tmp_path / "m")
    message = str(info.value)
    assert str(tmp_path / "m") in message
    assert "missing (1): backbone.norm_f.weight" in message
    assert "unexpected (1): backbone.extra.weight" in message
    assert "mis-shaped (1): backbone.embeddings.weight: checkpoint (23, 17) vs model (23, 16)" in message


def test_ssmkit_config_dict_is_built_in_one_place(tmp_path):
    """save_pretrained and the trainer both write io.config_to_dict; io.config_from_dict reads it back."""
    model = tiny()
    model.save_pretrained(tmp_path / "d")
    written = json.loads((tmp_path / "d" / "config.json").read_text())
    assert written == json.loads(json.dumps(io.config_to_dict(model.config)))
    assert written["model_type"] == io.SSMKIT_MODEL_TYPE
    assert io.config_from_dict(written) == model.config


def test_a_format_registered_in_the_table_is_read_by_from_pretrained(tmp_path):
    """What CONTRIBUTING.md ("Add a checkpoint format") promises: one registration makes a format loadable."""
    model = tiny()
    renamed = {k.replace("backbone.", "body."): v for k, v in io.unique_state_dict(model).items()}
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy-format", "width": 16}))

    toy = CheckpointFormat(
        name="toy", config_from_raw=lambda raw: ModelConfig(**dict(model.config.to_dict(), d_model=raw["width"])),
        weights_to_ssmkit=lambda w: {k.replace("body.", "backbone."): v for k, v in w.items()})
    register_format(toy, model_types=("toy-format",))
    try:
        assert format_of({"model_type": "toy-format"}) is toy
        loaded = from_pretrained(tmp_path)
        ids = torch.randint(0, 23, (1, 5))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
        with pytest.raises(ValueError, match="registered twice"):
            register_format(CheckpointFormat(name="other", config_from_raw=dict), model_types=("toy-format",))
    finally:
        FORMATS.pop("toy-format")
