"""Models: config, forward shapes and heads, hybrids with MoE, generation with a carried state, checkpoints."""

import json
import os

import pytest
import torch

import ssmkit
from ssmkit.layers import MIXERS
from ssmkit.models import ModelConfig, SSMModel, from_config, from_pretrained

from ..helpers import assert_close_scaled


def tiny(mixer="mamba", **overrides):
    kwargs = {"mamba": dict(d_state=4), "mamba2": dict(d_state=8, headdim=4, chunk_size=8), "s4": dict(d_state=8), "s5": dict(d_state=8),
              "attention": dict(n_heads=2), "s4d": dict(d_state=8), "linear_attention": dict(n_heads=2)}
    fields = dict(d_model=16, n_layers=2, vocab_size=23, mixer=mixer, mixer_kwargs=kwargs)
    fields.update(overrides)
    torch.manual_seed(0)
    return from_config(ModelConfig(**fields)).eval()


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
def test_config_patterns_and_json_round_trip():
    cfg = ModelConfig(d_model=16, n_layers=8, vocab_size=10, mixer="MMMAMMMM")
    assert cfg.layer_mixers() == ["mamba"] * 3 + ["attention"] + ["mamba"] * 4
    again = ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert ModelConfig(d_model=16, n_layers=2, vocab_size=10, mixer=["s4d", "mamba"]).layer_mixers() == ["s4d", "mamba"]


@pytest.mark.parametrize("fields, message", [
    (dict(mixer="mamab"), "did you mean 'mamba'"),
    (dict(mixer="MMX", n_layers=3), "pattern of n_layers=3 letters"),
    (dict(mixer=["mamba", "nope"]), "unknown mixer 'nope'"),
    (dict(mixer="MA", n_layers=3), "pattern of n_layers=3"),
    (dict(vocab_size=None), "exactly one of vocab_size"),
    (dict(mlp="dense"), "mlp must be one of"),
    (dict(head="classifier"), "needs num_classes"),
    (dict(bidirectional=True), "only allowed with head='classifier'"),
])
def test_config_errors(fields, message):
    base = dict(d_model=16, n_layers=2, vocab_size=10, mixer="mamba")
    base.update(fields)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**base)


def test_unknown_config_key_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'n_layers'"):
        ModelConfig.from_dict(dict(d_model=8, n_layer=2, vocab_size=5))


def test_heads_not_dividing_d_model_is_refused():
    with pytest.raises(ValueError, match="n_heads"):
        tiny("attention", mixer_kwargs={"attention": dict(n_heads=5)})


# ----------------------------------------------------------------------------------------------------------
# Forward, heads, hybrids
# ----------------------------------------------------------------------------------------------------------
def test_hybrid_moe_forward_backward_and_aux_loss():
    model = tiny(mixer="MA", mlp="moe", num_experts=4, top_k=2).train()
    ids = torch.randint(0, 23, (3, 11))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 11, 23)
    assert out.aux_loss.item() >= 0.99 * model.config.n_layers  # >= 1 per MoE layer, 1 when balanced
    (out.loss + 0.01 * out.aux_loss).backward()
    router = model.backbone.layers[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().max() > 0


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_classifier_and_bidirectional_backbone(pooling):
    model = tiny("s4d", head="classifier", num_classes=3, pooling=pooling, bidirectional=True)
    x = torch.randint(0, 23, (2, 9))
    logits = model(x).logits
    assert logits.shape == (2, 3)
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 23
    if pooling == "mean":  # a bidirectional backbone lets the first position see the last token
        h1 = model(x).logits
        assert not torch.allclose(h1, model(x2).logits)
    with pytest.raises(ValueError, match="no recurrent"):
        model.init_state(2)


def test_regression_head_on_real_inputs():
    model = tiny("s4d", vocab_size=None, input_dim=3, head="regression", output_dim=2)
    y = model(inputs=torch.randn(2, 7, 3)).logits
    assert y.shape == (2, 7, 2)


def test_bad_token_ids_and_empty_prompt():
    model = tiny()
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=23\); got values in \[0, 23\]"):
        model(torch.tensor([[0, 23]]))
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="empty"):
        model.generate([torch.tensor([], dtype=torch.long)], max_new_tokens=2)


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixer", sorted(MIXERS) + ["MA"])
def test_greedy_generation_equals_argmax_of_full_forward(mixer):
    model = tiny(mixer, n_layers=2).double()
    prompt = torch.randint(0, 23, (2, 7))
    out = model.generate(prompt, max_new_tokens=6)
    seq = out.sequences
    assert seq.shape == (2, 13)
    with torch.no_grad():
        logits = model(seq).logits
    assert torch.equal(logits[:, 6:-1].argmax(-1), seq[:, 7:])


@pytest.mark.parametrize("mixer", ["mamba", "mamba2", "MA"])
def test_chunked_prefill_equals_prefill_at_once(mixer):
    model = tiny(mixer).double()
    prompt = torch.randint(0, 23, (2, 29))
    logits_a, state_a = model.prefill(list(prompt))
    logits_b, state_b = model.prefill(list(prompt), chunk_size=5)
    assert_close_scaled(logits_b, logits_a, 1e-10, "last logits")
    for layer_a, layer_b in zip(state_a, state_b):
        for key in layer_a:
            assert_close_scaled(layer_b[key].double() if not layer_b[key].is_complex() else torch.view_as_real(layer_b[key]),
                                layer_a[key].double() if not layer_a[key].is_complex() else torch.view_as_real(layer_a[key]),
                                1e-10, key)


@pytest.mark.parametrize("mixer", ["mamba", "mamba2", "MA"])
def test_batch_of_different_prompt_lengths_equals_each_alone(mixer):
    model = tiny(mixer).double()
    prompts = [torch.randint(0, 23, (n,)) for n in (3, 9, 5)]
    batched = model.generate(prompts, max_new_tokens=5).new_tokens
    alone = torch.cat([model.generate([p], max_new_tokens=5).new_tokens for p in prompts])
    assert torch.equal(batched, alone)
    # the same through a left-padded tensor and its attention mask
    width = 9
    padded = torch.stack([torch.cat([torch.zeros(width - p.numel(), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - p.numel()), torch.ones(p.numel())]) for p in prompts])
    assert torch.equal(model.generate(padded, max_new_tokens=5, attention_mask=mask).new_tokens, alone)


def test_continuing_a_conversation_from_the_carried_state():
    model = tiny("mamba").double()
    turn1, turn2 = torch.randint(0, 23, (1, 6)), torch.randint(0, 23, (1, 4))
    first = model.generate(turn1, max_new_tokens=3, return_state=True)
    second = model.generate(turn2, max_new_tokens=4, state=first.state)
    whole = torch.cat([turn1, first.new_tokens, turn2], 1)
    assert torch.equal(model.generate(whole, max_new_tokens=4).new_tokens, second.new_tokens)


def test_state_memory_is_constant_for_ssm_layers():
    model = tiny("mamba")
    short = model.generate(torch.randint(0, 23, (1, 5)), max_new_tokens=1, return_state=True).state
    long = model.generate(torch.randint(0, 23, (1, 300)), max_new_tokens=1, return_state=True).state
    size = lambda st: sum(v.numel() for layer in st for v in layer.values())  # noqa: E731
    assert size(short) == size(long)


def test_sampling_is_seeded_eos_per_row_and_streamer():
    model = tiny("mamba")
    prompt = torch.randint(0, 23, (3, 4))
    a = model.generate(prompt, 8, do_sample=True, temperature=0.9, top_k=10, top_p=0.9, min_p=0.01,
                       repetition_penalty=1.3, seed=3).new_tokens
    b = model.generate(prompt, 8, do_sample=True, temperature=0.9, top_k=10, top_p=0.9, min_p=0.01,
                       repetition_penalty=1.3, seed=3).new_tokens
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 8).new_tokens
    eos = int(greedy[0, 2])
    seen = []
    out = model.generate(prompt, 8, eos_token_id=eos, pad_token_id=22, streamer=seen.append).new_tokens
    for row in out:
        hits = (row == eos).nonzero()
        if hits.numel():
            assert (row[hits[0, 0] + 1 :] == 22).all()
    assert len(seen) == out.shape[1]
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(prompt, 2, top_p=1.5)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    model = tiny("MA", mlp="gated")
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 23, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # saving again over an existing checkpoint replaces it whole and leaves no temporary folders
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny()
    model.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny(n_layers=2, d_model=16).save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_mismatched_checkpoint_lists_the_tensors(tmp_path):
    tiny("mamba").save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["n_layers"] = 3
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing \(\d+\): backbone.layers.2"):
        from_pretrained(tmp_path / "a")
    config["n_layers"], config["d_model"] = 2, 24
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mis-shaped"):
        from_pretrained(tmp_path / "a")


def test_unknown_checkpoint_kind_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match="unrecognised checkpoint"):
        from_pretrained(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nothing")


def test_bin_weights_load_only_without_pickled_code(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "c")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "c" / "model.safetensors"))
    torch.save(tensors, tmp_path / "c" / "pytorch_model.bin")
    (tmp_path / "c" / "model.safetensors").unlink()
    assert torch.equal(from_pretrained(tmp_path / "c").lm_head.weight, model.lm_head.weight)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "c" / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        from_pretrained(tmp_path / "c")


def test_top_level_api():
    assert ssmkit.from_config is from_config and ssmkit.ModelConfig is ModelConfig
    assert isinstance(tiny(), SSMModel)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_bfloat16_autocast_trains_every_mixer(mixer):
    """Projections run in bfloat16 under autocast; each mixer's recurrent core stays in float32."""
    model = tiny(mixer).train()
    ids = torch.randint(0, 23, (2, 24))
    reference = model(ids, labels=ids).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert abs(out.loss.item() - reference) < 2e-2 * abs(reference)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mixer", sorted(MIXERS) + ["MA"])
def test_half_precision_model_forward_generate_and_step(mixer, dtype):
    """``model.to(bfloat16)`` / ``.half()`` (no autocast): forward, loss and gradients, prefill + step and
    generate run in the model's dtype and agree with the float64 twin of the same (rounded) parameters.
    Tolerance 16 u of the dtype (u = 2^-8 bfloat16, 2^-11 float16): two blocks, the norms and the head each
    round their outputs; the recurrent cores and states are float32 (layers/base.py, Precision)."""
    from ssmkit.layers.base import state_dtype

    u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    model = tiny(mixer).to(dtype)
    exact = tiny(mixer).double()
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ids = torch.randint(0, 23, (2, 21))
    out = model(ids, labels=ids)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    with torch.no_grad():
        reference = exact(ids).logits
    assert_close_scaled(out.logits.double(), reference, 16 * u, f"{mixer} {dtype} logits")
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)

    with torch.no_grad():
        logits, state = model.prefill(list(ids[:, :13]))              # parallel over the prompt
        stepped = [logits]
        for t in range(13, 21):                                       # then one token at a time
            logits, state = model.step(ids[:, t], state)
            stepped.append(logits)
    assert_close_scaled(torch.stack(stepped[:-1], 1).double(), reference[:, 12:20], 16 * u,
                        f"{mixer} {dtype} prefill + step logits")
    for layer, layer_state in zip(model.backbone.layers, state):
        kinds = layer.mixer.state_spec(2)
        for key, value in layer_state.items():
            assert value.dtype == state_dtype(dtype, kinds[key.split(".", 1)[1]][1]), f"{key}: {value.dtype}"
    generated = model.generate(ids[:, :5], max_new_tokens=4, return_state=True)
    assert generated.sequences.shape == (2, 9)
    assert [{k: v.dtype for k, v in s.items()} for s in generated.state] == \
        [{k: v.dtype for k, v in s.items()} for s in model.init_state(2)]
