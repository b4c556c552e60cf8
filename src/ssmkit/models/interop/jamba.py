"""transformers' Jamba checkpoints (``model_type: jamba``) <-> ssmkit.

Jamba (Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model", arXiv 2403.19887): Mamba
layers with RMS norms on dt, B and C, one attention layer (no positional encoding) in every
``attn_layer_period``, and a mixture of experts in place of the MLP in every ``expert_layer_period``-th layer;
each layer is two pre-norm residual blocks (mixer, then MLP or MoE). In ssmkit terms: ``mixer`` a list of
"mamba" / "attention", ``mlp`` a list of "gated" / "moe", ``moe_renormalize=False`` (Jamba weights the chosen
experts by their softmax probabilities as they are), ``dt_bc_rmsnorm="weighted"`` on the Mamba layers.

Tensor names: ``model.embed_tokens``, ``model.layers.{i}.input_layernorm`` / ``mamba`` or ``self_attn`` /
``pre_ff_layernorm`` / ``feed_forward`` (``router``, ``experts.{e}.*`` or the stacked ``experts.gate_up_proj``
and ``experts.down_proj``), ``model.final_layernorm``, ``lm_head``.
"""

from __future__ import annotations

from typing import Tuple

from ..config import ModelConfig
from ._hybrid import (Tensors, all_equal, check_language_model, dt_rank_of, has_bias, rename_layers, require,
                      split_layer_name, state_dict_without_tied_head, unpack_experts)
from .registry import CheckpointFormat, register_format

_OUTER = {"model.embed_tokens.weight": "backbone.embeddings.weight",
          "model.final_layernorm.weight": "backbone.norm_f.weight"}
_INNER = (("input_layernorm.", "norm."), ("mamba.", "mixer."), ("self_attn.", "mixer."),
          ("pre_ff_layernorm.", "norm2."), ("feed_forward.", "mlp."))


def config_from_jamba(raw: dict) -> ModelConfig:
    get = lambda key: require(raw, key, "jamba")  # noqa: E731
    hidden, n_layers = get("hidden_size"), get("num_hidden_layers")
    attn_period, attn_offset = raw.get("attn_layer_period", 8), raw.get("attn_layer_offset", 4)
    expert_period, expert_offset = raw.get("expert_layer_period", 2), raw.get("expert_layer_offset", 1)
    num_experts = raw.get("num_experts", 16)
    mixers = ["attention" if i % attn_period == attn_offset else "mamba" for i in range(n_layers)]
    mlps = ["moe" if num_experts > 1 and i % expert_period == expert_offset else "gated" for i in range(n_layers)]
    eps = raw.get("rms_norm_eps", 1e-6)
    heads = get("num_attention_heads")
    if hidden % heads:
        raise ValueError(f"jamba config: num_attention_heads={heads} must divide hidden_size={hidden}")
    mamba = dict(d_state=raw.get("mamba_d_state", 16), d_conv=raw.get("mamba_d_conv", 4),
                 expand=raw.get("mamba_expand", 2), dt_rank=dt_rank_of(raw.get("mamba_dt_rank", "auto"), hidden),
                 conv_bias=raw.get("mamba_conv_bias", True), bias=raw.get("mamba_proj_bias", False),
                 dt_bc_rmsnorm="weighted", dt_bc_rmsnorm_eps=eps)
    attention = dict(n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads, rope=False)
    return ModelConfig(d_model=hidden, n_layers=n_layers, vocab_size=get("vocab_size"), mixer=mixers,
                       mixer_kwargs={"mamba": mamba, "attention": attention}, mlp=mlps,
                       mlp_hidden=get("intermediate_size"), num_experts=max(num_experts, 1),
                       top_k=min(raw.get("num_experts_per_tok", 2), max(num_experts, 1)),
                       mlp_activation=raw.get("hidden_act", "silu"), moe_renormalize=False, norm="rmsnorm",
                       norm_eps=eps, residual_in_fp32=False, tie_embeddings=raw.get("tie_word_embeddings", False),
                       head="lm")


def _inner_to_ssmkit(i: int, rest: str):
    for theirs, ours in _INNER:
        if rest.startswith(theirs):
            return f"backbone.layers.{i}.{ours}{rest[len(theirs):]}"
    return None


def weights_from_jamba(weights: Tensors) -> Tensors:
    renamed = rename_layers(weights, _OUTER, _inner_to_ssmkit)
    prefixes = {k[:k.index("mlp.") + 4] for k in renamed if ".mlp.experts." in k}
    for prefix in sorted(prefixes):
        renamed = unpack_experts(renamed, prefix)
    return renamed


def _period_offset(flags, what: str) -> Tuple[int, int]:
    """(period, offset) with flags[i] == (i % period == offset) for every layer; a ValueError if none fits."""
    n = len(flags)
    if not any(flags):
        return n + 1, n  # offset n of period n + 1: no layer of the model
    for period in range(1, n + 1):
        for offset in range(period):
            if all(flag == (i % period == offset) for i, flag in enumerate(flags)):
                return period, offset
    raise ValueError(f"jamba: the {what} layers {[i for i, f in enumerate(flags) if f]} are not every "
                     "period-th layer from an offset, which is all a Jamba config can say")


def to_jamba(model) -> Tuple[dict, Tensors]:
    """(config.json dict, tensors) of a transformers Jamba checkpoint for an ssmkit model; a ValueError saying
    why when the model is not one Jamba can describe."""
    fmt = "jamba"
    check_language_model(model, fmt)
    cfg = model.config
    mixers, mlps = cfg.layer_mixers(), cfg.layer_mlps()
    if set(mixers) - {"mamba", "attention"} or "mamba" not in mixers or set(mlps) - {"gated", "moe"}:
        raise ValueError(f"{fmt}: needs Mamba and attention layers, each with a gated MLP or a mixture of experts; "
                         f"this model has mixers {sorted(set(mixers))} and MLPs {sorted(set(mlps))}")
    if "moe" in mlps and cfg.moe_renormalize:
        raise ValueError(f"{fmt}: Jamba's router keeps the top-k softmax weights as they are; this model has "
                         "moe_renormalize=True")
    layers = model.backbone.layers
    mambas = [layer.mixer for layer in layers if layer.mixer.name == "mamba"]
    attns = [layer.mixer for layer in layers if layer.mixer.name == "attention"]
    if all_equal((m.dt_bc_rmsnorm for m in mambas), "dt_bc_rmsnorm", fmt) != "weighted":
        raise ValueError(f"{fmt}: its Mamba layers normalise dt, B and C with learned weights; this model's "
                         f"dt_bc_rmsnorm is {mambas[0].dt_bc_rmsnorm!r}")
    if {m.dt_layernorm.eps for m in mambas} != {cfg.norm_eps}:
        raise ValueError(f"{fmt}: one rms_norm_eps serves every norm; this model's dt/B/C norms use "
                         f"{sorted({m.dt_layernorm.eps for m in mambas})} and its blocks {cfg.norm_eps}")
    m = mambas[0]
    for key in ("d_state", "d_conv", "d_inner", "dt_rank"):
        all_equal((getattr(x, key) for x in mambas), key, fmt)
    in_bias = all_equal((has_bias(x.in_proj) for x in mambas), "in_proj bias", fmt)
    conv_bias = all_equal((has_bias(x.conv1d) for x in mambas), "conv bias", fmt)
    if m.d_inner % cfg.d_model:
        raise ValueError(f"{fmt}: d_inner={m.d_inner} must be a whole multiple of d_model={cfg.d_model} (mamba_expand)")
    heads = kv_heads = 1  # a model without attention layers: any head count describes them
    if attns:
        heads = all_equal((x.n_heads for x in attns), "n_heads", fmt)
        kv_heads = all_equal((x.n_kv_heads for x in attns), "n_kv_heads", fmt)
        for x in attns:
            if x.rope or x.window is not None or has_bias(x.q_proj) or has_bias(x.o_proj) \
                    or x.head_dim * x.n_heads != cfg.d_model:
                raise ValueError(f"{fmt}: attention has no positions, window or bias and head_dim = d_model / "
                                 f"n_heads; this model's attention: {x.extra_repr()}")
    attn_period, attn_offset = _period_offset([k == "attention" for k in mixers], "attention")
    expert_period, expert_offset = _period_offset([k == "moe" for k in mlps], "mixture-of-experts")
    hidden = cfg.mlp_hidden or (2 * cfg.d_model if "moe" in mlps else 4 * cfg.d_model)
    if "gated" in mlps and "moe" in mlps and cfg.mlp_hidden is None:
        raise ValueError(f"{fmt}: one intermediate_size serves MLPs and experts; set mlp_hidden")
    raw = dict(model_type="jamba", architectures=["JambaForCausalLM"], vocab_size=cfg.padded_vocab_size,
               hidden_size=cfg.d_model, intermediate_size=hidden, num_hidden_layers=cfg.n_layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_act=cfg.mlp_activation,
               rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
               num_experts=cfg.num_experts if "moe" in mlps else 1, num_experts_per_tok=cfg.top_k,
               expert_layer_period=expert_period, expert_layer_offset=expert_offset,
               attn_layer_period=attn_period, attn_layer_offset=attn_offset, mamba_d_state=m.d_state,
               mamba_d_conv=m.d_conv, mamba_expand=m.d_inner // cfg.d_model, mamba_dt_rank=m.dt_rank,
               mamba_conv_bias=conv_bias, mamba_proj_bias=in_bias, use_mamba_kernels=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tensors = {}
    for name, value in state_dict_without_tied_head(model).items():
        tensors[_to_jamba_name(name, mixers)] = value
    return raw, tensors


def _to_jamba_name(name: str, mixers) -> str:
    outside, parts = split_layer_name(name, _OUTER)
    if parts is None:
        return outside
    index, rest = parts
    mixer = "mamba." if mixers[int(index)] == "mamba" else "self_attn."
    for theirs, ours in (("input_layernorm.", "norm."), (mixer, "mixer."), ("pre_ff_layernorm.", "norm2."),
                         ("feed_forward.", "mlp.")):
        if rest.startswith(ours):
            return f"model.layers.{index}.{theirs}{rest[len(ours):]}"
    return name


register_format(CheckpointFormat(name="jamba", config_from_raw=config_from_jamba, weights_to_ssmkit=weights_from_jamba,
                                 export=to_jamba), model_types=("jamba",))
