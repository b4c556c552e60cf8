"""transformers' Granite-4.0-H checkpoints (``model_type: granitemoehybrid``) <-> ssmkit.

Granite-4.0-H (IBM, 2025): Mamba-2 and attention layers as ``layer_types`` lists them ("mamba" /
"linear_attention" or "attention" / "full_attention"), each followed by a shared SwiGLU MLP that every token
goes through, beside a top-k mixture of experts when ``num_local_experts`` > 0 (softmax over the top-k router
logits: renormalised weights). Granite scales in four places: the embeddings by ``embedding_multiplier``, each
residual branch by ``residual_multiplier``, attention scores by ``attention_multiplier`` (in place of
1/sqrt(head_dim)), and the logits are divided by ``logits_scaling``. In ssmkit terms: ``mixer`` a list of
"mamba2" / "attention" (``softmax_scale`` = attention_multiplier), ``mlp="moe"`` with ``moe_shared_hidden`` (or
``mlp="gated"`` for the shared MLP alone), and the ModelConfig multipliers of the same names
(``logit_multiplier`` = 1 / logits_scaling).

Tensor names: ``model.embed_tokens``, ``model.layers.{i}.input_layernorm`` / ``mamba`` or ``self_attn`` /
``post_attention_layernorm`` / ``shared_mlp.{input,output}_linear`` (gate and up stacked in input_linear) /
``block_sparse_moe.router.layer``, ``block_sparse_moe.{input,output}_linear`` (experts stacked),
``model.norm``, ``lm_head``.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..config import ModelConfig
from ._hybrid import (Tensors, all_equal, check_language_model, has_bias, mamba2_kwargs, require,
                      split_layer_name, state_dict_without_tied_head)
from .registry import CheckpointFormat, register_format

_FMT = "granitemoehybrid"
_MAMBA, _ATTENTION = ("mamba", "linear_attention"), ("attention", "full_attention")
_OUTER = {"model.embed_tokens.weight": "backbone.embeddings.weight", "model.norm.weight": "backbone.norm_f.weight"}


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def config_from_granitemoehybrid(raw: dict) -> ModelConfig:
    get = lambda key: require(raw, key, _FMT)  # noqa: E731
    hidden, n_layers = get("hidden_size"), get("num_hidden_layers")
    types = raw.get("layer_types") or ["mamba"] * n_layers
    unknown = sorted(set(types) - set(_MAMBA) - set(_ATTENTION))
    if unknown or len(types) != n_layers:
        raise ValueError(f"{_FMT} config: layer_types must list num_hidden_layers={n_layers} of "
                         f"{list(_MAMBA + _ATTENTION)}; got {types}")
    expand, n_heads = raw.get("mamba_expand", 2), raw.get("mamba_n_heads", 128)
    head = raw.get("mamba_d_head", "auto")
    head = expand * hidden // n_heads if head == "auto" else head
    if head * n_heads != expand * hidden:
        raise ValueError(f"{_FMT} config: mamba_n_heads * mamba_d_head = {n_heads} * {head} must equal "
                         f"mamba_expand * hidden_size = {expand} * {hidden}")
    eps = raw.get("rms_norm_eps", 1e-6)
    mamba2 = mamba2_kwargs(raw, expand, head, eps)
    heads = get("num_attention_heads")
    if hidden % heads:
        raise ValueError(f"{_FMT} config: num_attention_heads={heads} must divide hidden_size={hidden}")
    attention = dict(n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads,
                     rope=raw.get("position_embedding_type") == "rope", rope_base=_rope_theta(raw),
                     bias=raw.get("attention_bias", False), softmax_scale=float(raw.get("attention_multiplier", 1.0)))
    experts = raw.get("num_local_experts", 0) or 0
    shared = get("shared_intermediate_size")
    moe = dict(mlp="moe", mlp_hidden=get("intermediate_size"), num_experts=experts,
               top_k=min(raw.get("num_experts_per_tok", 2), experts), moe_shared_hidden=shared) if experts \
        else dict(mlp="gated", mlp_hidden=shared)
    return ModelConfig(d_model=hidden, n_layers=n_layers, vocab_size=get("vocab_size"),
                       mixer=["attention" if t in _ATTENTION else "mamba2" for t in types],
                       mixer_kwargs={"mamba2": mamba2, "attention": attention}, **moe,
                       mlp_activation=raw.get("hidden_act", "silu"), moe_renormalize=True, norm="rmsnorm",
                       norm_eps=eps, residual_in_fp32=False, tie_embeddings=raw.get("tie_word_embeddings", True),
                       head="lm", embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
                       residual_multiplier=float(raw.get("residual_multiplier", 1.0)),
                       logit_multiplier=1.0 / float(raw.get("logits_scaling", 1.0)))


def weights_from_granitemoehybrid(weights: Tensors) -> Tensors:
    out = {}
    for key, value in weights.items():
        if key in _OUTER:
            out[_OUTER[key]] = value
            continue
        if not key.startswith("model.layers."):
            out[key] = value
            continue
        index, rest = key[len("model.layers."):].split(".", 1)
        base = f"backbone.layers.{index}."
        if rest.startswith("input_layernorm."):
            out[base + "norm." + rest[len("input_layernorm."):]] = value
        elif rest.startswith(("mamba.", "self_attn.")):
            out[base + "mixer." + rest.split(".", 1)[1]] = value
        elif rest.startswith("post_attention_layernorm."):
            out[base + "norm2." + rest[len("post_attention_layernorm."):]] = value
        elif rest in ("shared_mlp.input_linear.weight", "shared_mlp.output_linear.weight"):
            out.update(_shared_to_ssmkit(base, rest, value, weights, index))
        elif rest == "block_sparse_moe.router.layer.weight":
            out[base + "mlp.router.weight"] = value
        elif rest == "block_sparse_moe.input_linear.weight":
            half = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{base}mlp.experts.{e}.gate_proj.weight"] = value[e, :half]
                out[f"{base}mlp.experts.{e}.up_proj.weight"] = value[e, half:]
        elif rest == "block_sparse_moe.output_linear.weight":
            for e in range(value.shape[0]):
                out[f"{base}mlp.experts.{e}.down_proj.weight"] = value[e]
        else:
            out[key] = value  # kept as it is, so a strict load names it
    return out


def _shared_to_ssmkit(base: str, rest: str, value, weights: Tensors, index: str) -> Tensors:
    """The shared MLP is the layer's MLP when the model has no experts, else the MoE's shared expert."""
    has_moe = f"model.layers.{index}.block_sparse_moe.router.layer.weight" in weights
    prefix = base + ("mlp.shared_expert." if has_moe else "mlp.")
    if rest == "shared_mlp.output_linear.weight":
        return {prefix + "down_proj.weight": value}
    half = value.shape[0] // 2
    return {prefix + "gate_proj.weight": value[:half], prefix + "up_proj.weight": value[half:]}


def to_granitemoehybrid(model) -> Tuple[dict, Tensors]:
    """(config.json dict, tensors) of a transformers Granite-4.0-H checkpoint for an ssmkit model; a ValueError
    saying why when the format cannot describe the model."""
    check_language_model(model, _FMT, scaled=True)
    cfg = model.config
    mixers, mlps = cfg.layer_mixers(), cfg.layer_mlps()
    moe = set(mlps) == {"moe"} and cfg.moe_shared_hidden is not None
    if set(mixers) - {"mamba2", "attention"} or not (moe or set(mlps) == {"gated"}):
        raise ValueError(f"{_FMT}: needs Mamba-2 and attention layers, each with a gated MLP or each with a mixture "
                         f"of experts with a shared expert; this model has mixers {sorted(set(mixers))}, MLPs "
                         f"{sorted(set(mlps))} and moe_shared_hidden={cfg.moe_shared_hidden}")
    if moe and not cfg.moe_renormalize:
        raise ValueError(f"{_FMT}: its router renormalises the top-k weights; this model has moe_renormalize=False")
    layers = model.backbone.layers
    mambas = [layer.mixer for layer in layers if layer.mixer.name == "mamba2"]
    attns = [layer.mixer for layer in layers if layer.mixer.name == "attention"]
    mamba_raw = {}
    if mambas:
        for key in ("d_state", "d_conv", "d_inner", "nheads", "headdim", "ngroups", "chunk_size", "dt_limit"):
            all_equal((getattr(x, key) for x in mambas), key, _FMT)
        m = mambas[0]
        if not m.rmsnorm or m.norm.norm_before_gate or m.D_has_hdim or m.norm.eps != cfg.norm_eps \
                or m.d_inner % cfg.d_model:
            raise ValueError(f"{_FMT}: Mamba-2 layers need the gated norm after the gate with eps = rms_norm_eps, "
                             f"D per head and d_inner a multiple of d_model; this model's: {m.extra_repr()}")
        mamba_raw = dict(mamba_n_heads=m.nheads, mamba_d_head=m.headdim, mamba_n_groups=m.ngroups,
                         mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=m.d_inner // cfg.d_model,
                         mamba_chunk_size=m.chunk_size, mamba_conv_bias=has_bias(m.conv1d),
                         mamba_proj_bias=has_bias(m.in_proj), time_step_limit=list(m.dt_limit))
    heads, kv_heads, theta, rope, scale, bias = 1, 1, 10000.0, True, 1.0, False
    if attns:
        heads = all_equal((x.n_heads for x in attns), "n_heads", _FMT)
        kv_heads = all_equal((x.n_kv_heads for x in attns), "n_kv_heads", _FMT)
        theta = all_equal((x.rope_base for x in attns), "rope_base", _FMT)
        rope = all_equal((x.rope for x in attns), "rope", _FMT)
        scale = all_equal((x.softmax_scale for x in attns), "attention scale", _FMT)
        bias = all_equal((has_bias(x.q_proj) for x in attns), "attention bias", _FMT)
        for x in attns:
            if x.window is not None or x.head_dim * x.n_heads != cfg.d_model or x.rope_dim != x.head_dim:
                raise ValueError(f"{_FMT}: attention rotates whole heads of d_model / n_heads and has no window; "
                                 f"this model's attention: {x.extra_repr()}")
        if scale is None:
            scale = attns[0].head_dim ** -0.5
    hidden = cfg.mlp_hidden or (2 * cfg.d_model if moe else 4 * cfg.d_model)
    raw = dict(model_type=_FMT, architectures=["GraniteMoeHybridForCausalLM"], vocab_size=cfg.padded_vocab_size,
               hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, hidden_act=cfg.mlp_activation, rms_norm_eps=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings,
               layer_types=["attention" if k == "attention" else "mamba" for k in mixers],
               intermediate_size=hidden if moe else 1, shared_intermediate_size=cfg.moe_shared_hidden if moe else hidden,
               num_local_experts=cfg.num_experts if moe else 0, num_experts_per_tok=cfg.top_k if moe else 1,
               attention_bias=bias, attention_multiplier=scale, embedding_multiplier=cfg.embedding_multiplier,
               residual_multiplier=cfg.residual_multiplier, logits_scaling=1.0 / cfg.logit_multiplier,
               position_embedding_type="rope" if rope else None,
               rope_parameters=dict(rope_type="default", rope_theta=theta), **mamba_raw,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tensors = {}
    pending = {}
    for name, value in state_dict_without_tied_head(model).items():
        new = _to_granite_name(name, mixers)
        if isinstance(new, tuple):  # a half of a stacked tensor: (their name, position)
            pending.setdefault(new[0], {})[new[1]] = value
        else:
            tensors[new] = value
    for name, parts in pending.items():
        tensors[name] = _stack(parts)
    return raw, tensors


def _to_granite_name(name: str, mixers):
    outside, parts = split_layer_name(name, _OUTER)
    if parts is None:
        return outside
    index, rest = parts
    base = f"model.layers.{index}."
    if rest.startswith("norm."):
        return base + "input_layernorm." + rest[len("norm."):]
    if rest.startswith("mixer."):
        return base + ("mamba." if mixers[int(index)] == "mamba2" else "self_attn.") + rest[len("mixer."):]
    if rest.startswith("norm2."):
        return base + "post_attention_layernorm." + rest[len("norm2."):]
    if rest == "mlp.router.weight":
        return base + "block_sparse_moe.router.layer.weight"
    parts = rest.split(".")
    if rest.startswith("mlp.shared_expert.") or len(parts) == 3:  # mlp[.shared_expert].{gate,up,down}_proj.weight
        which = parts[-2]
        if which == "down_proj":
            return base + "shared_mlp.output_linear.weight"
        return base + "shared_mlp.input_linear.weight", (0 if which == "gate_proj" else 1)
    if rest.startswith("mlp.experts."):
        e, which = int(parts[2]), parts[3]
        if which == "down_proj":
            return base + "block_sparse_moe.output_linear.weight", (e, 0)
        return base + "block_sparse_moe.input_linear.weight", (e, 0 if which == "gate_proj" else 1)
    return name


def _stack(parts: dict) -> torch.Tensor:
    """Halves keyed 0/1 -> cat on rows (the shared MLP); keyed (expert, half) -> (E, rows, cols) stacked experts."""
    if all(isinstance(k, int) for k in parts):
        return torch.cat([parts[0], parts[1]], dim=0)
    experts = sorted({e for e, _ in parts})
    return torch.stack([torch.cat([parts[(e, h)] for h in sorted(h for x, h in parts if x == e)], dim=0)
                        for e in experts])


register_format(CheckpointFormat(name=_FMT, config_from_raw=config_from_granitemoehybrid,
                                 weights_to_ssmkit=weights_from_granitemoehybrid, export=to_granitemoehybrid),
                model_types=(_FMT,))
