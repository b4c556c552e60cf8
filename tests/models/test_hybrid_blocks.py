"""The building blocks the released hybrids need, held to hand-written references: MLP-only layers and a
per-layer MLP list (Nemotron-H), ungated MLPs and their activations, a mixture of experts without
renormalised router weights (Jamba), RMS norms on Mamba's dt/B/C (Jamba, Falcon-Mamba), and partial rotary
attention (Bamba)."""

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers import Attention, Mamba
from ssmkit.models import ModelConfig, SSMModel
from ssmkit.models.blocks import MoE
from ssmkit.ops.rope import apply_rope_ref


def _stepwise(model, ids):
    state = model.init_state(ids.shape[0])
    out = []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        out.append(logits)
    return torch.stack(out, dim=1)


def test_mlp_only_layers_follow_the_pattern_and_their_formula():
    torch.manual_seed(0)
    config = ModelConfig(d_model=12, n_layers=3, vocab_size=19, mixer="M-A", mlp=["none", "plain", "gated"],
                         mlp_hidden=7, mlp_activation="relu2", mixer_kwargs={"mamba": {"d_state": 3},
                                                                              "attention": {"n_heads": 2}})
    assert config.layer_mixers() == ["mamba", "none", "attention"]
    model = SSMModel(config).eval()
    block = model.backbone.layers[1]
    assert block.mixer is None and block.norm is None
    assert model.init_state(2)[1] == {}
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        h, _, _ = block(x)
        mlp = block.mlp
        expected = x + mlp.down_proj(F.relu(mlp.up_proj(block.norm2(x))) ** 2)
        torch.testing.assert_close(h, expected)
        ids = torch.randint(0, 19, (2, 9))
        torch.testing.assert_close(_stepwise(model, ids), model(ids).logits)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mixer="M-", mlp="none"), "layer 1 has neither a mixer nor an MLP"),
    (dict(mixer="MM", mlp=["gated"]), "mlp lists 1 layers but n_layers=2"),
    (dict(mixer="MM", mlp=["gated", "swiglu"]), "mlp must be one of"),
    (dict(mixer="MM", mlp="gated", mlp_activation="tanh"), "mlp_activation must be one of"),
    (dict(mixer="MM", moe_renormalize="no"), "moe_renormalize must be a bool"),
    (dict(mixer="MM", moe_shared_hidden=0), "moe_shared_hidden must be a positive int or None; got 0"),
    (dict(mixer="MM", residual_multiplier=float("nan")), "residual_multiplier must be a finite number"),
    (dict(mixer="MM", embedding_multiplier="2"), "embedding_multiplier must be a finite number"),
])
def test_bad_layer_lists_name_the_problem(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ModelConfig(d_model=8, n_layers=2, vocab_size=5, **kwargs)


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_weights_each_token_by_its_router_softmax(renormalize):
    torch.manual_seed(0)
    moe = MoE(6, 5, num_experts=4, top_k=2, renormalize=renormalize).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    out, _ = moe(x)
    probs = torch.softmax(moe.router(x), -1)
    expected = torch.zeros_like(x)
    for t in range(7):
        top = probs[t].topk(2)
        weights = top.values / top.values.sum() if renormalize else top.values
        for w, e in zip(weights, top.indices):
            expected[t] += w * moe.experts[int(e)](x[t])
    torch.testing.assert_close(out, expected)


def test_moe_shared_expert_is_added_for_every_token():
    torch.manual_seed(0)
    moe = MoE(6, 5, num_experts=3, top_k=1, shared_hidden=4).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    out, _ = moe(x)
    routed = moe.router(x).argmax(-1)
    expected = torch.stack([moe.experts[int(e)](x[t]) + moe.shared_expert(x[t]) for t, e in enumerate(routed)])
    torch.testing.assert_close(out, expected)


def test_multipliers_scale_embeddings_residual_branches_and_logits():
    """embedding x e, each mixer/MLP output x r before it joins the residual, logits x l; step agrees."""
    torch.manual_seed(0)
    base = dict(d_model=8, n_layers=2, vocab_size=11, mixer="MA", mlp="gated", mlp_hidden=6, residual_in_fp32=False,
                mixer_kwargs={"attention": dict(n_heads=2, scale=0.3)})
    model = SSMModel(ModelConfig(**base, embedding_multiplier=1.5, residual_multiplier=0.7, logit_multiplier=0.4))
    ids = torch.randint(0, 11, (2, 6))
    with torch.no_grad():
        h = model.backbone.embeddings(ids) * 1.5
        for layer in model.backbone.layers:
            h = h + 0.7 * layer.mixer(layer.norm(h))
            h = h + 0.7 * layer.mlp(layer.norm2(h))
        expected = model.lm_head(model.backbone.norm_f(h)) * 0.4
        torch.testing.assert_close(model(ids).logits, expected)
        torch.testing.assert_close(_stepwise(model, ids), expected)
    from ssmkit.models.decoding import fused_support
    assert "embedding_multiplier" in fused_support(model)  # the fused CPU decoder has no multipliers


def test_attention_scale_replaces_one_over_sqrt_head_dim():
    torch.manual_seed(0)
    plain, scaled = Attention(8, n_heads=2, rope=False), Attention(8, n_heads=2, rope=False, scale=0.25)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(1, 5, 8)
    with torch.no_grad():  # scale 0.25 on head_dim 4 is 1/sqrt(16): queries twice as long under the default
        plain.q_proj.weight.mul_(0.5)
        torch.testing.assert_close(scaled(x), plain(x))
    with pytest.raises(ValueError, match="scale must be a positive number"):
        Attention(8, n_heads=2, scale=0)


@pytest.mark.parametrize("kind", ["weighted", "weightless"])
def test_mamba_rms_norms_on_dt_b_c(kind):
    torch.manual_seed(0)
    layer = Mamba(10, d_state=3, dt_rank=2, dt_bc_rmsnorm=kind, dt_bc_rmsnorm_eps=1e-5, backend="torch").double()
    names = {n for n, _ in layer.named_parameters() if "layernorm" in n}
    learned = {"dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight"}
    assert names == (learned if kind == "weighted" else set())
    x = torch.randn(2, 11, 10, dtype=torch.float64)
    with torch.no_grad():
        if kind == "weighted":
            for name in names:
                layer.get_parameter(name).uniform_(0.5, 1.5)
        y, state = layer(x, return_state=True)
        steps, s = [], layer.init_state(2, dtype=torch.float64)
        for t in range(11):
            y_t, s = layer.step(x[:, t], s)
            steps.append(y_t)
        torch.testing.assert_close(torch.stack(steps, 1), y)
        # the reference: the same layer without the norms, fed x_proj's output normalised by hand
        plain = Mamba(10, d_state=3, dt_rank=2, backend="torch").double()
        plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "layernorm" not in k})
        original = plain.x_proj.forward

        def normalised(u):
            dt, B, C = original(u).split([2, 3, 3], dim=-1)
            out = []
            for part, norm in ((dt, layer.dt_layernorm), (B, layer.b_layernorm), (C, layer.c_layernorm)):
                part = part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + 1e-5)
                out.append(part * norm.weight if norm.weight is not None else part)
            return torch.cat(out, dim=-1)

        plain.x_proj.forward = normalised
        s = plain.init_state(2, dtype=torch.float64)
        ref = []
        for t in range(11):  # the step path calls x_proj as a module, so the patched projection is used
            y_t, s = plain.step(x[:, t], s)
            ref.append(y_t)
        torch.testing.assert_close(torch.stack(ref, 1), y)
    with pytest.raises(ValueError, match="dt_bc_rmsnorm"):
        Mamba(10, dt_bc_rmsnorm="layer")


def test_partial_rotary_attention_turns_only_the_first_rope_dim_features():
    torch.manual_seed(0)
    attn = Attention(12, n_heads=2, rope_dim=4).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    q, k, _ = attn._project(x, 3)
    raw_q = attn.q_proj(x).view(2, 5, 2, 6).transpose(1, 2)
    torch.testing.assert_close(q[..., :4], apply_rope_ref(raw_q[..., :4], 3))
    torch.testing.assert_close(q[..., 4:], raw_q[..., 4:])
    y, state = attn(x, return_state=True)
    steps, s = [], attn.init_state(2, dtype=torch.float64)
    for t in range(5):
        y_t, s = attn.step(x[:, t], s)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), y)
    for bad in (3, 8):
        with pytest.raises(ValueError, match="rope_dim must be even and at most head_dim=6"):
            Attention(12, n_heads=2, rope_dim=bad)
