"""Interop with the checkpoints users have: transformers' Mamba / Mamba2 and the state-spaces format.

Small random transformers models (odd sizes, several layers, n_groups > 1) are saved to disk, loaded by
ssmkit, and must give the same logits (1e-4, float32) and the same greedy generations; and back again.
"""

import json

import pytest
import torch

from ssmkit.models import ModelConfig, from_config, from_pretrained
from ssmkit.models.interop.transformers_format import save_hf

from ..helpers import skip_unless_grouped_mamba2_norm

transformers = pytest.importorskip("transformers")


def hf_mamba():
    cfg = transformers.MambaConfig(vocab_size=37, hidden_size=20, state_size=5, num_hidden_layers=3, expand=2,
                                   conv_kernel=3, time_step_rank=3, tie_word_embeddings=True, use_mambapy=False)
    torch.manual_seed(0)
    return transformers.MambaForCausalLM(cfg).eval()


def hf_mamba2():
    skip_unless_grouped_mamba2_norm(2)
    cfg = transformers.Mamba2Config(vocab_size=41, hidden_size=24, state_size=6, num_hidden_layers=3, expand=2,
                                    conv_kernel=4, head_dim=8, num_heads=6, n_groups=2, chunk_size=8,
                                    tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises the gated norm to ones and D to ones: make them count
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".D", "dt_bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _check_same(hf, ours, vocab):
    ids = torch.randint(0, vocab, (2, 19))
    with torch.no_grad():
        expected = hf(ids).logits
        actual = ours(ids).logits[..., :vocab]
    err = (actual - expected).abs().max().item()
    assert err <= 1e-4 * max(1.0, expected.abs().max().item()), f"logits differ by {err}"
    hf.generation_config.eos_token_id = None  # compare plain greedy decoding, no early stop on either side
    greedy_hf = hf.generate(ids[:1, :7], max_new_tokens=8, do_sample=False)[:, 7:]
    greedy_ours = ours.generate(ids[:1, :7], max_new_tokens=8).new_tokens
    assert torch.equal(greedy_hf, greedy_ours)


@pytest.mark.parametrize("make", [hf_mamba, hf_mamba2], ids=["mamba", "mamba2"])
@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_transformers_checkpoint_loads(tmp_path, make, serialization):
    hf = make()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=serialization == "safetensors")
    ours = from_pretrained(tmp_path / "hf")
    _check_same(hf, ours, hf.config.vocab_size)


@pytest.mark.parametrize("mixer, kwargs", [
    ("mamba", dict(d_state=5, d_conv=3, dt_rank=3)),
    ("mamba2", dict(d_state=6, headdim=8, ngroups=2, chunk_size=8)),
])
def test_ssmkit_model_converts_to_transformers(tmp_path, mixer, kwargs):
    skip_unless_grouped_mamba2_norm(kwargs.get("ngroups", 1))
    torch.manual_seed(1)
    ours = from_config(ModelConfig(d_model=24, n_layers=2, vocab_size=29, mixer=mixer,
                                   mixer_kwargs={mixer: kwargs}, tie_embeddings=mixer == "mamba")).eval()
    save_hf(ours, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    _check_same(hf, ours, 29)


def test_state_spaces_checkpoint_loads(tmp_path):
    torch.manual_seed(2)
    ours = from_config(ModelConfig(d_model=16, n_layers=2, vocab_size=40, pad_vocab_size_multiple=8,
                                   mixer="mamba", mixer_kwargs={"mamba": dict(d_state=4)})).eval()
    directory = tmp_path / "ss"
    directory.mkdir()
    config = dict(d_model=16, n_layer=2, vocab_size=37, ssm_cfg={"d_state": 4}, rms_norm=True,
                  residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v
               for k, v in ours.state_dict().items()}
    torch.save(tensors, directory / "pytorch_model.bin")
    loaded = from_pretrained(directory)
    assert loaded.config.padded_vocab_size == 40 and loaded.config.vocab_size == 37
    ids = torch.randint(0, 37, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    hf_mamba().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["state_size"] = 7  # claims another architecture than the weights hold
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mis-shaped"):
        from_pretrained(tmp_path / "m")


def test_convert_refuses_models_transformers_cannot_hold(tmp_path):
    model = from_config(ModelConfig(d_model=16, n_layers=2, vocab_size=11, mixer="MA",
                                    mixer_kwargs={"attention": dict(n_heads=2), "mamba": dict(d_state=4)}))
    with pytest.raises(ValueError, match="only pure Mamba or Mamba2"):
        save_hf(model, tmp_path / "x")
