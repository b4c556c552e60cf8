"""Fused one-token decoding (ssmkit.models.decoding, ssmkit.ops.decode) and int8 weight quantisation.

The specification of a fused step is the model's own ``step`` (every layer's PyTorch step); the fused C++ step
must equal it to 1e-5 in float32 on awkward sizes and every Mamba/Mamba-2 option, with float32 weights and
with int8 weights (against the same quantised model's ``step``, which computes with the dequantised weights).
The C++ kernels build at first use; without a compiler these tests are skipped with the build error as the
reason (``SSMKIT_REQUIRE_CPP=1`` turns that into a failure, as for the C++ scan).
"""

import copy
import json
import os
import pickle

import pytest
import torch

import ssmkit
from ssmkit.models import decoding
from ssmkit.models.decoding import FusedDecoder
from ssmkit.models.quantization import Int8Linear, quantize
from ssmkit.ops.decode import cpp, dequantize_int8, linear_ref, quantize_int8


@pytest.fixture(scope="module")
def kernels():
    if not cpp.is_available():
        reason = f"C++ decoding kernels unavailable: {cpp.build_error()}"
        if os.environ.get("SSMKIT_REQUIRE_CPP") == "1":
            pytest.fail(reason + " (SSMKIT_REQUIRE_CPP=1)")
        pytest.skip(reason)
    return cpp.extension()


MAMBA_VARIANTS = {
    # name: (mixer, d_model, mixer arguments)
    "mamba-odd": ("mamba", 38, dict(d_state=13, d_conv=3, expand=1.5, dt_rank=5)),
    "mamba-bias": ("mamba", 38, dict(d_state=16, bias=True, conv_bias=False)),
    "mamba2-groups": ("mamba2", 40, dict(headdim=10, d_state=12, ngroups=2)),
    "mamba2-no-norm": ("mamba2", 39, dict(headdim=6, d_state=9, rmsnorm=False, D_has_hdim=True)),
    "mamba2-norm-first": ("mamba2", 40, dict(headdim=10, d_state=17, norm_before_gate=True, dt_limit=(0.01, 0.05),
                                             bias=True)),
}


def make_model(variant, n_layers=3, vocab=61):
    mixer, d_model, kwargs = MAMBA_VARIANTS[variant]
    model = ssmkit.from_config(dict(d_model=d_model, n_layers=n_layers, vocab_size=vocab, mixer=mixer,
                                    mixer_kwargs={mixer: kwargs})).eval()
    with torch.no_grad():  # non-trivial SSM parameters, so every term of the step matters
        for name, p in model.named_parameters():
            if name.endswith(("D", "dt_bias", "conv1d.bias", "norm.weight")) or "A_log" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def assert_steps_match(model, batch, steps=3):
    ids = torch.randint(0, model.config.vocab_size, (batch, 9))
    state = model(ids, return_state=True).state
    fused = FusedDecoder(model)
    fused_state = state
    for _ in range(steps):
        token = torch.randint(0, model.config.vocab_size, (batch,))
        want_logits, want_state = model.step(token, state)
        got_logits, got_state = fused.step(token, fused_state)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
        for want_layer, got_layer in zip(want_state, got_state):
            assert want_layer.keys() == got_layer.keys()
            for key in want_layer:
                torch.testing.assert_close(got_layer[key], want_layer[key], atol=1e-5, rtol=1e-5)
        state, fused_state = want_state, got_state


@pytest.mark.parametrize("variant", sorted(MAMBA_VARIANTS))
@pytest.mark.parametrize("batch", [1, 5])
def test_fused_step_equals_module_step(kernels, variant, batch):
    assert_steps_match(make_model(variant), batch)


@pytest.mark.parametrize("name", ["softplus", "silu"])
def test_vectorised_activations(kernels, name):
    """The kernels' softplus (dt) and silu (conv output, gate) against torch's in float64, over [-30, 30] and
    lengths that leave a scalar tail: relative error <= 1e-6 (softplus of very negative x ~ exp(x) keeps it)."""
    x = torch.cat([torch.linspace(-30.0, 30.0, 6001), torch.tensor([-88.0, -1e-8, 0.0, 1e-8, 19.99, 20.01, 90.0])])
    got = kernels.activation(name, x).double()
    want = torch.nn.functional.softplus(x.double()) if name == "softplus" else torch.nn.functional.silu(x.double())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)
    with pytest.raises(RuntimeError, match="name must be"):
        kernels.activation("gelu", x)


def test_fused_step_at_extreme_dt(kernels):
    """softplus and silu are vectorised in the kernels: dt from far below zero (softplus ~ exp, where a naive
    log(1 + t) loses its relative precision) to above torch's threshold of 20 (softplus(x) = x)."""
    model = make_model("mamba-odd")
    with torch.no_grad():
        for layer in model.backbone.layers:
            bias = layer.mixer.dt_proj.bias
            bias.copy_(torch.linspace(-14.0, 26.0, bias.numel()))
    assert_steps_match(model, batch=2)


@pytest.mark.parametrize("variant", ["mamba-odd", "mamba2-groups", "mamba2-no-norm"])
def test_fused_step_equals_module_step_int8(kernels, variant):
    model = quantize(make_model(variant), "int8")
    assert isinstance(model.backbone.layers[0].mixer.in_proj, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear)
    assert_steps_match(model, batch=3)


def test_fused_step_leaves_the_input_state_alone(kernels):
    model = make_model("mamba-odd")
    state = model(torch.randint(0, 61, (2, 5)), return_state=True).state
    before = [{k: v.clone() for k, v in layer.items()} for layer in state]
    fused = FusedDecoder(model)
    s = state
    for _ in range(3):
        _, s = fused.step(torch.tensor([1, 2]), s)
    for old, layer in zip(before, state):
        for key in layer:
            assert torch.equal(old[key], layer[key])


# batch sizes reach every tile of the kernel (16, 8 and 1-7 rows); outputs not a multiple of the 16-row panel
@pytest.mark.parametrize("shape", [(1, 7, 3), (5, 37, 29), (4, 64, 8), (9, 130, 77), (16, 33, 20), (27, 16, 5),
                                   (3, 1, 1), (24, 50, 17)])
@pytest.mark.parametrize("int8", [False, True])
def test_linear_kernel(kernels, shape, int8):
    batch, out_features, in_features = shape
    x = torch.randn(batch, in_features)
    weight = torch.randn(out_features, in_features)
    bias = torch.randn(out_features)
    scale = torch.empty(0)
    if int8:
        weight, scale = quantize_int8(weight)
    out = torch.empty(batch, out_features)
    kernels.linear_out(x, kernels.pack_weight(weight), scale, bias, out)
    want = linear_ref(x, weight, scale if int8 else None, bias)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # a row's result does not depend on the batch it is computed in (tiles of 16, 8, 1-7 sum in one order)
    alone = torch.empty(1, out_features)
    for row in (0, batch - 1):
        kernels.linear_out(x[row:row + 1].clone(), kernels.pack_weight(weight), scale, bias, alone)
        assert torch.equal(alone[0], out[row])


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_pack_weight_layout(kernels, dtype):
    weight = torch.randint(-100, 100, (37, 5)).to(dtype)
    panels = kernels.pack_weight(weight)
    assert panels.shape == (3, 5, 16) and panels.dtype == dtype and panels.is_contiguous()
    for m in range(48):  # panel p holds rows 16p .. 16p + 15 column by column; rows past 37 are zero
        want = weight[m] if m < 37 else torch.zeros(5, dtype=dtype)
        assert torch.equal(panels[m // 16, :, m % 16], want)
    out = torch.empty(2, 37)
    with pytest.raises(RuntimeError, match="panels of pack_weight"):
        kernels.linear_out(torch.randn(2, 5), weight, torch.empty(0), torch.empty(0), out)  # unpacked weight
    with pytest.raises(RuntimeError, match="panels of pack_weight"):
        kernels.linear_out(torch.randn(2, 5), panels, torch.empty(0), torch.empty(0), torch.empty(2, 49))


def test_quantize_int8_spec():
    w = torch.randn(6, 11)
    w[2] = 0.0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert int(q.abs().max()) == 127 and scale[2] == 1.0
    assert (dequantize_int8(q, scale) - w).abs().max() <= scale.max() / 2 + 1e-7
    with pytest.raises(ValueError, match="weight must be"):
        quantize_int8(torch.randn(3))
    with pytest.raises(ValueError, match="method must be one of"):
        quantize(make_model("mamba-odd"), "int3")


@pytest.mark.parametrize("variant", ["mamba-odd", "mamba2-groups"])
def test_generate_fused_equals_module(kernels, variant):
    model = make_model(variant)
    prompts = torch.randint(0, 61, (3, 6))
    want = model.generate(prompts, 24, eos_token_id=5, return_state=True)
    assert model.last_decode_backend == "module"
    got = model.generate(prompts, 24, eos_token_id=5, return_state=True, decode_backend="fused")
    assert model.last_decode_backend == "fused"
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.state, want.state):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    model.generate(prompts, 4, decode_backend="auto")
    assert model.last_decode_backend == "fused" and "auto" in model.last_decode_backend_reason


def test_fused_decoder_is_kept_until_a_weight_changes(kernels):
    """generate keeps one FusedDecoder (its packed weights) per model; a changed weight rebuilds it, and a copy
    or pickle of the model leaves it out."""
    model = make_model("mamba-odd")
    prompts = torch.randint(0, 61, (2, 5))
    model.generate(prompts, 3, decode_backend="fused")
    decoder = decoding.fused_decoder(model)
    model.generate(prompts, 3, decode_backend="fused")
    assert decoding.fused_decoder(model) is decoder and not decoder.stale()
    with torch.no_grad():
        model.backbone.layers[1].mixer.out_proj.weight.mul_(3.0)  # in place: same tensor, new version
    assert decoder.stale()
    got = model.generate(prompts, 6, decode_backend="fused").sequences
    assert decoding.fused_decoder(model) is not decoder
    assert torch.equal(got, model.generate(prompts, 6, decode_backend="module").sequences)
    copied = copy.deepcopy(model)
    assert "_fused_decoder" not in copied.__dict__ and "_fused_decoder" in model.__dict__
    assert torch.equal(pickle.loads(pickle.dumps(model)).generate(prompts, 6, decode_backend="fused").sequences, got)


def make_hybrid():
    """Mamba, attention (KV cache), Mamba-2; gated MLPs and an MoE layer; biases on the attention projections."""
    model = ssmkit.from_config(dict(d_model=32, n_layers=4, vocab_size=61, mixer=["mamba", "attention", "mamba2",
                                                                                   "attention"],
                                    mixer_kwargs={"attention": dict(n_heads=4, bias=True),
                                                  "mamba2": dict(headdim=8, d_state=8)},
                                    mlp=["gated", "moe", "none", "gated"], num_experts=4, top_k=2)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("D", "dt_bias", "bias", "norm.weight")) or "A_log" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("int8", [False, True])
def test_packed_step_equals_module_step(kernels, int8):
    """Any model's step with every linear map on the panel kernel == its module step (hybrid with attention,
    MLPs and MoE; int8 weights too), and the model is left as it was (no forward replaced after the step)."""
    model = make_hybrid()
    if int8:
        quantize(model, "int8")
    batch = 3
    ids = torch.randint(0, 61, (batch, 7))
    state = model(ids, return_state=True).state
    packed = decoding.PackedDecoder(model)
    packed_state = state
    for _ in range(3):
        token = torch.randint(0, 61, (batch,))
        want_logits, want_state = model.step(token, state)
        got_logits, got_state = packed.step(token, packed_state)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
        for want_layer, got_layer in zip(want_state, got_state):
            for key in want_layer:
                torch.testing.assert_close(got_layer[key], want_layer[key], atol=1e-5, rtol=1e-5)
        state, packed_state = want_state, got_state
    assert not any("forward" in module.__dict__ for module in model.modules())
    # the kernel did run: a changed packed weight changes the step's logits (the module step does not see it)
    packed._linears[-1][1][0].neg_()  # the LM head's panels
    assert not torch.allclose(packed.step(token, state)[0], model.step(token, state)[0], atol=1e-3)


def test_generate_auto_packs_a_hybrid(kernels):
    model = make_hybrid()
    prompts = torch.randint(0, 61, (2, 6))
    want = model.generate(prompts, 12, decode_backend="module").sequences
    got = model.generate(prompts, 12, decode_backend="auto").sequences
    assert model.last_decode_backend == "packed" and "not fused" in model.last_decode_backend_reason
    assert torch.equal(got, want)
    assert decoding.packed_decoder(model) is decoding.packed_decoder(model)
    assert "_packed_decoder" not in copy.deepcopy(model).__dict__


def test_decode_backend_choice_is_explicit(monkeypatch):
    model = ssmkit.from_config(dict(d_model=16, n_layers=2, vocab_size=11, mixer="attention"))
    with pytest.raises(ValueError, match="decode_backend must be one of"):
        model.generate(torch.tensor([[1, 2]]), 2, decode_backend="fast")
    with pytest.raises(ValueError, match="decode_backend='fused'.*Attention"):
        model.generate(torch.tensor([[1, 2]]), 2, decode_backend="fused")
    model.generate(torch.tensor([[1, 2]]), 2, decode_backend="auto")  # not fused (attention): packed linear maps
    assert model.last_decode_backend == "packed" and "Attention" in model.last_decode_backend_reason
    half = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(ValueError, match="decode_backend='packed'.*float32"):
        half.generate(torch.tensor([[1, 2]]), 2, decode_backend="packed")
    half.generate(torch.tensor([[1, 2]]), 2, decode_backend="auto")
    assert half.last_decode_backend == "module" and "float32" in half.last_decode_backend_reason
    # a machine without a compiler: "auto" says so, "fused" raises with the build error
    mamba = make_model("mamba-odd")
    monkeypatch.setattr(cpp, "is_available", lambda: False)
    monkeypatch.setattr(cpp, "build_error", lambda: "no C++ compiler found")
    mamba.generate(torch.tensor([[1, 2]]), 2, decode_backend="auto")
    assert mamba.last_decode_backend == "module"
    assert "no C++ compiler found" in mamba.last_decode_backend_reason

    def no_extension():
        raise RuntimeError("the C++ decoding kernels could not be built: no C++ compiler found")

    monkeypatch.setattr(cpp, "extension", no_extension)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        mamba.generate(torch.tensor([[1, 2]]), 2, decode_backend="fused")
    assert "decode" not in json.dumps(mamba.config.to_dict())


def test_quantized_checkpoint_round_trip(tmp_path):
    model = quantize(make_model("mamba2-groups"), "int8")
    model.save_pretrained(tmp_path / "q")
    assert (tmp_path / "q" / "quantization.json").exists()
    assert "quant" not in (tmp_path / "q" / "config.json").read_text()
    loaded = ssmkit.from_pretrained(tmp_path / "q")
    assert loaded.quantization == model.quantization
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert any(v.dtype == torch.int8 for v in got.values())
    for key in want:
        assert torch.equal(want[key], got[key]), key
    ids = torch.randint(0, 61, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def _corpus() -> bytes:
    """Real text that every checkout has: ssmkit's own sources (train on most, hold out the rest)."""
    root = os.path.dirname(ssmkit.__file__)
    text = b""
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    text += f.read()
    return text


@pytest.mark.slow  # ~15-30 s: trains a small model
def test_int8_quality_on_a_trained_bytes_lm():
    """Issue 12's quality bar: bits per byte within 1% of float32 and greedy top-1 agreement >= 99% over
    2,000 held-out positions, on a small bytes LM trained here for a few seconds."""
    torch.manual_seed(0)
    data = torch.tensor(list(_corpus()), dtype=torch.long)
    held_out, train_data = data[-2001:], data[:-2001]
    model = ssmkit.from_config(dict(d_model=64, n_layers=2, vocab_size=256, mixer="mamba"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3)
    for _ in range(120):
        starts = torch.randint(0, train_data.numel() - 129, (16,))
        batch = torch.stack([train_data[s : s + 129] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    def scores(m):
        with torch.no_grad():
            logits = m(held_out[None, :-1]).logits[0, :, :256].float()
        nll = torch.nn.functional.cross_entropy(logits, held_out[1:], reduction="mean")
        return nll.item() / torch.log(torch.tensor(2.0)).item(), logits.argmax(-1)

    bpb_fp32, top1_fp32 = scores(model)
    assert bpb_fp32 < 5.0, f"the model did not learn (bits per byte {bpb_fp32:.2f}); the comparison would be empty"
    bpb_int8, top1_int8 = scores(quantize(model, "int8"))
    agreement = (top1_fp32 == top1_int8).float().mean().item()
    assert top1_fp32.numel() == 2000
    assert abs(bpb_int8 - bpb_fp32) <= 0.01 * bpb_fp32, (bpb_fp32, bpb_int8)
    assert agreement >= 0.99, agreement
