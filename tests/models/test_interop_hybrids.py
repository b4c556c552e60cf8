"""transformers' hybrid and Mamba-variant checkpoints: falcon_mamba, jamba, bamba, nemotron_h, recurrent_gemma,
zamba2, granitemoehybrid, falcon_h1.

For each type a small random model is made with transformers' own config class (odd sizes, several layers, a
mixture of experts where the type has one, n_groups > 1 where it applies), its norms and skip weights
perturbed so that none is a silent 1, and saved to disk. ssmkit must then read the directory to logits within
1e-4 of transformers' (float32), the same 20 greedy tokens, the same logits when the sequence is read in two
pieces with the state carried between them, and ``ssmkit convert DIR OUT --to hf`` must write a directory
that transformers loads back to the same logits.
"""

import pytest
import torch

from ssmkit.cli import main as cli_main
from ssmkit.models import from_pretrained

transformers = pytest.importorskip("transformers")

VOCAB = 53


def _config_class(name: str):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def _perturb(model):
    """transformers initialises norms and D to ones and Jamba's dt/B/C norms too: make every one count."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", ".D", "dt_bias")):
                p.add_(0.2 * torch.randn_like(p))
    return model


def hf_falcon_mamba():
    cfg = _config_class("FalconMambaConfig")(
        vocab_size=VOCAB, hidden_size=20, state_size=5, num_hidden_layers=3, expand=2, conv_kernel=3,
        time_step_rank=3, mixer_rms_eps=1e-5, tie_word_embeddings=True)
    return transformers.FalconMambaForCausalLM(cfg)


def hf_jamba():  # widths of whole 16-byte rows: transformers runs its experts through torch._grouped_mm
    cfg = _config_class("JambaConfig")(
        vocab_size=VOCAB, hidden_size=20, intermediate_size=28, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, num_experts=3, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=3, attn_layer_offset=1, mamba_d_state=5, mamba_d_conv=3, mamba_dt_rank=3,
        rms_norm_eps=1e-5, tie_word_embeddings=False)
    return transformers.JambaForCausalLM(cfg)


def hf_bamba():
    cfg = _config_class("BambaConfig")(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=26, num_hidden_layers=4, num_attention_heads=3,
        num_key_value_heads=1, attn_layer_indices=[1, 3], mamba_n_heads=6, mamba_n_groups=2, mamba_d_state=5,
        mamba_d_conv=3, mamba_chunk_size=8, rms_norm_eps=1e-5, tie_word_embeddings=False)
    return transformers.BambaForCausalLM(cfg)


def hf_nemotron_h():
    cfg = _config_class("NemotronHConfig")(
        vocab_size=VOCAB, hidden_size=22, intermediate_size=26, layers_block_type=["mamba", "attention", "mlp",
                                                                                      "mamba", "mlp"],
        num_attention_heads=3, num_key_value_heads=1, head_dim=6, mamba_num_heads=4, mamba_head_dim=11,
        n_groups=2, ssm_state_size=5, conv_kernel=3, chunk_size=8, time_step_min=0.01, tie_word_embeddings=False)
    return transformers.NemotronHForCausalLM(cfg)


def hf_nemotron_h_moe():
    """Nemotron-H's expert layers (DeepSeek-V3-style router; widths of whole 16-byte rows, as transformers runs
    experts through torch._grouped_mm): 6 experts in 3 groups of which 2 are searched,
    top 2, a routed scale, a shared expert; router weights and the choice-only score bias set at random (their
    init is zero, which would tie every score), so a bias leaking into the weights shows."""
    cfg = _config_class("NemotronHConfig")(
        vocab_size=VOCAB, hidden_size=20, intermediate_size=12, layers_block_type=["mamba", "moe", "attention", "moe"],
        num_attention_heads=3, num_key_value_heads=1, head_dim=6, mamba_num_heads=4, mamba_head_dim=10,
        n_groups=2, ssm_state_size=5, conv_kernel=3, chunk_size=8, time_step_min=0.01, tie_word_embeddings=False,
        n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=12, moe_shared_expert_intermediate_size=14,
        n_group=3, topk_group=2, routed_scaling_factor=1.7, norm_topk_prob=True)
    model = transformers.NemotronHForCausalLM(cfg)
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__ == "NemotronHTopkRouter":
                module.weight.normal_(0, 0.5)
                module.e_score_correction_bias.normal_(0, 0.3)
    return model


def hf_recurrent_gemma():
    """Griffin's pattern (recurrent, attention, recurrent) over 5 layers, an RG-LRU wider than the model (27 of 24,
    3 blocks of 9), multi-query local attention with a window (5) shorter than the test sequences, tied
    embeddings. transformers initialises every bias at zero and the embeddings small: perturb the biases and
    scale the embeddings so that the biases count and the logits reach the soft cap's bend (cap 7)."""
    cfg = _config_class("RecurrentGemmaConfig")(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=38, num_hidden_layers=5, num_attention_heads=3,
        num_key_value_heads=1, lru_width=27, attention_window_size=5, conv1d_width=3,
        block_types=["recurrent", "attention", "recurrent"], logits_soft_cap=7.0, rms_norm_eps=1e-5)
    model = transformers.RecurrentGemmaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.model.embed_tokens.weight.mul_(6.0)
    return model


def _zamba2_config(**overrides):
    kwargs = dict(vocab_size=VOCAB, hidden_size=20, num_hidden_layers=6,
                  layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"], mamba_d_state=5,
                  mamba_d_conv=3, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=4, chunk_size=8, intermediate_size=26,
                  num_attention_heads=4, num_key_value_heads=4, num_mem_blocks=2, use_shared_attention_adapter=True,
                  adapter_rank=3, use_mem_rope=True, time_step_min=0.01)
    kwargs.update(overrides)
    return _config_class("Zamba2Config")(**kwargs)


def _scale_matrices(model, factor):
    """transformers initialises every matrix at std 0.02, so that the layers barely move the embeddings and
    greedy decoding repeats one token: scale them up so that every block (the shared one too) counts."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    return model


def hf_zamba2():
    """Three uses of two shared weight sets (the first used twice), q/k/v and MLP adapters, rotary attention,
    n_groups = 2, tied embeddings (which is also what makes transformers tie the uses of a weight set)."""
    return _scale_matrices(transformers.Zamba2ForCausalLM(_zamba2_config()), 6.0)


def hf_granitemoehybrid():  # every multiplier away from 1, experts beside the shared MLP
    cfg = _config_class("GraniteMoeHybridConfig")(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=12, shared_intermediate_size=20, num_hidden_layers=4,
        num_attention_heads=3, num_key_value_heads=1, layer_types=["mamba", "attention", "mamba", "mamba"],
        num_local_experts=3, num_experts_per_tok=2, mamba_n_heads=6, mamba_d_head=8, mamba_n_groups=2,
        mamba_d_state=5, mamba_d_conv=3, mamba_chunk_size=8, embedding_multiplier=1.7, residual_multiplier=0.6,
        attention_multiplier=0.3, logits_scaling=2.5, position_embedding_type="rope", rms_norm_eps=1e-5,
        tie_word_embeddings=False)
    return transformers.GraniteMoeHybridForCausalLM(cfg)


def hf_falcon_h1(**overrides):
    """Mamba-2 and attention in parallel in every layer; every multiplier away from 1 (the five in_proj
    sections each their own), a Mamba width (mamba_d_ssm 36) unrelated to hidden_size, n_groups = 2, the gated
    norm on (Falcon-H1's checkpoints run without it: test_falcon_h1_options), matrices scaled up so that
    greedy decoding does not repeat one token."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=22, intermediate_size=26, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=6, mamba_d_ssm=36, mamba_n_heads=6, mamba_d_head=6, mamba_n_groups=2,
                  mamba_d_state=5, mamba_d_conv=3, mamba_chunk_size=8, mamba_rms_norm=True,
                  mamba_norm_before_gate=False, embedding_multiplier=1.3, lm_head_multiplier=0.7,
                  mlp_multipliers=[0.8, 1.2], ssm_multipliers=[1.1, 0.9, 1.3, 0.6, 1.4], ssm_in_multiplier=0.75,
                  ssm_out_multiplier=1.25, attention_in_multiplier=0.9, attention_out_multiplier=1.15,
                  key_multiplier=0.5, rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(overrides)
    return _scale_matrices(transformers.FalconH1ForCausalLM(_config_class("FalconH1Config")(**kwargs)), 4.0)


MAKERS = {"falcon_mamba": hf_falcon_mamba, "jamba": hf_jamba, "bamba": hf_bamba, "nemotron_h": hf_nemotron_h,
          "nemotron_h_moe": hf_nemotron_h_moe, "recurrent_gemma": hf_recurrent_gemma, "zamba2": hf_zamba2, "granitemoehybrid": hf_granitemoehybrid,
          "falcon_h1": hf_falcon_h1}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def saved(request, tmp_path_factory):
    """(model_type, transformers model, its directory)."""
    torch.manual_seed(0)
    hf = _perturb(MAKERS[request.param]()).eval()
    directory = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(directory)
    return hf.config.model_type, hf, directory  # nemotron_h_moe is a second nemotron_h


def _ids(length=19, batch=2, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _assert_close(actual, expected, what):
    err = (actual - expected).abs().max().item()
    assert err <= 1e-4 * max(1.0, expected.abs().max().item()), f"{what}: logits differ by {err}"


def test_logits_match_transformers(saved):
    model_type, hf, directory = saved
    ours = from_pretrained(directory)
    ids = _ids()
    with torch.no_grad():
        _assert_close(ours(ids).logits[..., :VOCAB], hf(ids).logits, model_type)


def test_greedy_continuation_matches_transformers(saved):
    model_type, hf, directory = saved
    ours = from_pretrained(directory)
    prompt = _ids(length=7, batch=1, seed=2)
    hf.generation_config.eos_token_id = None  # plain greedy decoding on both sides, no early stop
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 7:]
    actual = ours.generate(prompt, max_new_tokens=20).new_tokens
    assert torch.equal(actual, expected), f"{model_type}: {actual.tolist()} != {expected.tolist()}"


def test_carried_state_equals_reading_everything(saved):
    model_type, _, directory = saved
    ours = from_pretrained(directory)
    ids = _ids(length=23)
    with torch.no_grad():
        whole = ours(ids).logits
        first = ours(ids[:, :9], return_state=True)
        second = ours(ids[:, 9:20], state=first.state, return_state=True)
        pieces = [first.logits, second.logits]
        state = second.state
        for t in range(20, 23):  # and token by token from there
            logits, state = ours.step(ids[:, t], state)
            pieces.append(logits[:, None])
    _assert_close(torch.cat(pieces, dim=1), whole, f"{model_type} with a carried state")


def test_convert_to_hf_loads_back_in_transformers(saved, tmp_path, capsys):
    model_type, hf, directory = saved
    assert cli_main(["convert", str(directory), str(tmp_path / "back"), "--to", "hf"]) == 0
    assert f"model_type {model_type}" in capsys.readouterr().out
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert again.config.model_type == model_type
    ids = _ids(seed=3)
    with torch.no_grad():
        _assert_close(again(ids).logits, hf(ids).logits, f"{model_type} written by ssmkit convert")


def test_nemotron_h_latent_experts_are_refused_by_name(tmp_path):
    cfg = _config_class("NemotronHConfig")(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=8, layers_block_type=["mamba", "moe"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=1,
        ssm_state_size=4, n_routed_experts=2, moe_intermediate_size=8, moe_shared_expert_intermediate_size=8,
        moe_latent_size=4)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="moe_latent_size=4"):
        from_pretrained(tmp_path)


def test_a_damaged_hybrid_checkpoint_lists_what_does_not_match(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    model_type, _, directory = saved
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text((directory / "config.json").read_text())
    tensors = load_file(str(directory / "model.safetensors"))
    dropped = sorted(k for k in tensors if "A_log" in k or "recurrent_param" in k)[0]
    del tensors[dropped]
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "d" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)missing \(1\): .*(A_log|recurrent_param).*"
                                         r"unexpected \(1\): model.extra.weight"):
        from_pretrained(tmp_path / "d")


def test_sharded_checkpoints_load(saved, tmp_path):
    model_type, hf, _ = saved
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    ours = from_pretrained(tmp_path / "sharded")
    ids = _ids(seed=4)
    with torch.no_grad():
        _assert_close(ours(ids).logits[..., :VOCAB], hf(ids).logits, f"{model_type} from shards")


@pytest.mark.parametrize("overrides, weight_sets", [(dict(tie_word_embeddings=False), 3), (dict(num_mem_blocks=5), 3)])
def test_zamba2_weight_sets_read_as_transformers_builds_them(tmp_path, overrides, weight_sets):
    """Without tie_word_embeddings transformers gives every use of a shared block its own copy (saved under its
    own layer, with adapter slots nothing reads); with more weight sets than uses it builds only one per use.
    ssmkit reads either as transformers runs it."""
    torch.manual_seed(0)
    hf = _scale_matrices(_perturb(transformers.Zamba2ForCausalLM(_zamba2_config(**overrides))), 6.0)
    hf.eval().save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.shared_block["num_blocks"] == weight_sets
    ids = _ids()
    with torch.no_grad():
        _assert_close(ours(ids).logits[..., :VOCAB], hf(ids).logits, f"zamba2 {overrides}")


def test_granite_without_experts_reads_and_converts_back(tmp_path):
    """num_local_experts=0: the shared MLP is each layer's only MLP (ssmkit mlp="gated"), no rotary embedding."""
    cfg = _config_class("GraniteMoeHybridConfig")(
        vocab_size=VOCAB, hidden_size=20, shared_intermediate_size=28, num_hidden_layers=3, num_attention_heads=5,
        num_key_value_heads=5, layer_types=["attention", "mamba", "mamba"], num_local_experts=0, mamba_n_heads=5,
        mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=4, mamba_chunk_size=4,
        embedding_multiplier=0.8, residual_multiplier=1.3, attention_multiplier=0.5, logits_scaling=0.7,
        position_embedding_type=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = _perturb(transformers.GraniteMoeHybridForCausalLM(cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert ours.config.layer_mlps() == ["gated"] * 3
    ids = _ids(seed=5)
    with torch.no_grad():
        _assert_close(ours(ids).logits[..., :VOCAB], hf(ids).logits, "granite without experts")
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "hf"]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        _assert_close(again(ids).logits, hf(ids).logits, "granite without experts, written back")


def test_formats_without_multipliers_refuse_a_scaled_model():
    from ssmkit.models import ModelConfig, SSMModel
    from ssmkit.models.interop import bamba, transformers_format

    hybrid = SSMModel(ModelConfig(d_model=16, n_layers=2, vocab_size=VOCAB, mixer=["mamba2", "attention"],
                                  mixer_kwargs={"mamba2": dict(headdim=8, d_state=4, chunk_size=4),
                                                "attention": dict(n_heads=2, rope_dim=4)},
                                  mlp="gated", mlp_hidden=8, residual_multiplier=0.5, residual_in_fp32=False))
    with pytest.raises(ValueError, match="residual_multiplier"):
        bamba.to_bamba(hybrid)
    plain = SSMModel(ModelConfig(d_model=16, n_layers=1, vocab_size=VOCAB, mixer="mamba2", logit_multiplier=2.0,
                                 mixer_kwargs={"mamba2": dict(headdim=8, d_state=4, chunk_size=4)}))
    with pytest.raises(ValueError, match="logit_multiplier"):
        transformers_format.to_hf(plain)


@pytest.mark.parametrize("overrides", [
    dict(mamba_rms_norm=False),  # the released checkpoints: no gated norm, y * silu(z)
    dict(mamba_norm_before_gate=True, attention_bias=True, mamba_proj_bias=True, projectors_bias=True,
         tie_word_embeddings=True, mamba_d_ssm=None, mamba_expand=2, mamba_n_heads=11, mamba_d_head=4,
         mamba_n_groups=1),
], ids=["released", "biases-tied"])
def test_falcon_h1_options_read_and_convert_back(tmp_path, overrides):
    torch.manual_seed(0)
    hf = _perturb(hf_falcon_h1(**overrides)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    ids = _ids(seed=6)
    with torch.no_grad():
        _assert_close(ours(ids).logits[..., :VOCAB], hf(ids).logits, f"falcon_h1 {overrides}")
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "hf"]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        _assert_close(again(ids).logits, hf(ids).logits, f"falcon_h1 {overrides}, written back")


@pytest.mark.parametrize("overrides, message", [
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(projectors_bias=True), "mamba_proj_bias, projectors_bias"),
])
def test_falcon_h1_options_ssmkit_lacks_are_refused_by_name(tmp_path, overrides, message):
    kwargs = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_state=4, mamba_d_conv=3)
    _config_class("FalconH1Config")(**kwargs, **overrides).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        from_pretrained(tmp_path)
