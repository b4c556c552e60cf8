"""transformers' Bamba checkpoints (``model_type: bamba``) <-> ssmkit.

Bamba (IBM, 2024; the Mamba-2 + attention recipe of Waleffe et al. 2024, "An Empirical Study of Mamba-based
Language Models", arXiv 2406.07887): Mamba-2 layers with a few attention layers at ``attn_layer_indices``
(rotary embeddings on half of each head: ``partial_rotary_factor`` 0.5), every layer followed by a SwiGLU MLP;
each layer is two pre-norm residual blocks. In ssmkit terms: ``mixer`` a list of "mamba2" / "attention"
(``rope_dim`` = head_dim / 2), ``mlp="gated"``; the Mamba-2 gated norm uses ``rms_norm_eps``.

Tensor names: ``model.embed_tokens``, ``model.layers.{i}.input_layernorm`` / ``mamba`` or ``self_attn`` /
``pre_ff_layernorm`` / ``feed_forward``, ``model.final_layernorm``, ``lm_head``.
"""

from __future__ import annotations

from typing import Tuple

from ..config import ModelConfig
from ._hybrid import (Tensors, all_equal, check_language_model, has_bias, mamba2_kwargs, rename_layers, require,
                      rope_of, split_layer_name, state_dict_without_tied_head)
from .registry import CheckpointFormat, register_format

_OUTER = {"model.embed_tokens.weight": "backbone.embeddings.weight",
          "model.final_layernorm.weight": "backbone.norm_f.weight"}


def _rope(raw: dict) -> Tuple[float, float]:
    """(rope_theta, partial_rotary_factor); Bamba's config fixes the factor at 0.5."""
    return rope_of(raw, "bamba", default_factor=0.5)


def config_from_bamba(raw: dict) -> ModelConfig:
    get = lambda key: require(raw, key, "bamba")  # noqa: E731
    hidden, n_layers = get("hidden_size"), get("num_hidden_layers")
    expand, n_heads = raw.get("mamba_expand", 2), raw.get("mamba_n_heads", 128)
    head = raw.get("mamba_d_head", "auto")
    head = expand * hidden // n_heads if head == "auto" else head
    if head * n_heads != expand * hidden:
        raise ValueError(f"bamba config: mamba_n_heads * mamba_d_head = {n_heads} * {head} must equal "
                         f"mamba_expand * hidden_size = {expand} * {hidden}")
    if raw.get("mlp_bias", False):
        raise ValueError("bamba config: mlp_bias=True is not supported (ssmkit's MLPs have no biases)")
    eps = raw.get("rms_norm_eps", 1e-5)
    mamba2 = mamba2_kwargs(raw, expand, head, eps)
    heads = get("num_attention_heads")
    head_dim = raw.get("head_dim") or hidden // heads
    theta, factor = _rope(raw)
    if int(head_dim * factor) % 2:
        raise ValueError(f"bamba config: the rotary part of each head, head_dim * partial_rotary_factor = "
                         f"int({head_dim} * {factor}), must be even")
    attention = dict(n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim,
                     rope=True, rope_base=theta, rope_dim=int(head_dim * factor), bias=raw.get("attention_bias", False))
    attn_at = set(raw.get("attn_layer_indices") or ())
    mixers = ["attention" if i in attn_at else "mamba2" for i in range(n_layers)]
    return ModelConfig(d_model=hidden, n_layers=n_layers, vocab_size=get("vocab_size"), mixer=mixers,
                       mixer_kwargs={"mamba2": mamba2, "attention": attention}, mlp="gated",
                       mlp_hidden=get("intermediate_size"), mlp_activation=raw.get("hidden_act", "silu"),
                       norm="rmsnorm", norm_eps=eps, residual_in_fp32=False,
                       tie_embeddings=raw.get("tie_word_embeddings", False), head="lm")


def _inner_to_ssmkit(i: int, rest: str):
    for theirs, ours in (("input_layernorm.", "norm."), ("mamba.", "mixer."), ("self_attn.", "mixer."),
                         ("pre_ff_layernorm.", "norm2."), ("feed_forward.", "mlp.")):
        if rest.startswith(theirs):
            return f"backbone.layers.{i}.{ours}{rest[len(theirs):]}"
    return None


def weights_from_bamba(weights: Tensors) -> Tensors:
    return rename_layers(weights, _OUTER, _inner_to_ssmkit)


def to_bamba(model) -> Tuple[dict, Tensors]:
    """(config.json dict, tensors) of a transformers Bamba checkpoint for an ssmkit model; a ValueError saying
    why when Bamba cannot describe the model."""
    fmt = "bamba"
    check_language_model(model, fmt)
    cfg = model.config
    mixers, mlps = cfg.layer_mixers(), cfg.layer_mlps()
    if set(mixers) - {"mamba2", "attention"} or "mamba2" not in mixers or set(mlps) != {"gated"}:
        raise ValueError(f"{fmt}: needs Mamba-2 and attention layers, each with a gated MLP; this model has "
                         f"mixers {sorted(set(mixers))} and MLPs {sorted(set(mlps))}")
    layers = model.backbone.layers
    mambas = [layer.mixer for layer in layers if layer.mixer.name == "mamba2"]
    attns = [layer.mixer for layer in layers if layer.mixer.name == "attention"]
    for key in ("d_state", "d_conv", "d_inner", "nheads", "headdim", "ngroups", "chunk_size", "dt_limit",
                "rmsnorm", "D_has_hdim"):
        all_equal((getattr(x, key) for x in mambas), key, fmt)
    m = mambas[0]
    if not m.rmsnorm or m.norm.norm_before_gate or m.D_has_hdim or m.norm.eps != cfg.norm_eps \
            or m.d_inner % cfg.d_model:
        raise ValueError(f"{fmt}: Mamba-2 layers need the gated norm after the gate with eps = rms_norm_eps, D per "
                         f"head and d_inner a multiple of d_model; this model's: {m.extra_repr()}")
    heads, kv_heads, theta = 1, 1, 10000.0  # a model without attention layers: any head count describes them
    if attns:
        heads = all_equal((x.n_heads for x in attns), "n_heads", fmt)
        kv_heads = all_equal((x.n_kv_heads for x in attns), "n_kv_heads", fmt)
        all_equal((x.head_dim for x in attns), "head_dim", fmt)
        theta = all_equal((x.rope_base for x in attns), "rope_base", fmt)
        all_equal((has_bias(x.q_proj) for x in attns), "attention bias", fmt)
        for x in attns:
            if not x.rope or x.rope_dim != int(x.head_dim * 0.5) or x.window is not None \
                    or has_bias(x.o_proj) != has_bias(x.q_proj) \
                    or x.head_dim != cfg.d_model // x.n_heads:
                raise ValueError(f"{fmt}: attention rotates half of each head (head_dim = d_model / n_heads) and has "
                                 f"no window; this model's attention: {x.extra_repr()}")
    raw = dict(model_type="bamba", architectures=["BambaForCausalLM"], vocab_size=cfg.padded_vocab_size,
               hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden or 4 * cfg.d_model,
               num_hidden_layers=cfg.n_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               hidden_act=cfg.mlp_activation, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
               attn_layer_indices=[i for i, k in enumerate(mixers) if k == "attention"],
               mamba_n_heads=m.nheads, mamba_d_head=m.headdim, mamba_n_groups=m.ngroups, mamba_d_state=m.d_state,
               mamba_d_conv=m.d_conv, mamba_expand=m.d_inner // cfg.d_model, mamba_chunk_size=m.chunk_size,
               mamba_conv_bias=has_bias(m.conv1d), mamba_proj_bias=has_bias(m.in_proj),
               time_step_limit=list(m.dt_limit), attention_bias=bool(attns) and has_bias(attns[0].q_proj),
               mlp_bias=False, rope_parameters=dict(rope_type="default", rope_theta=theta, partial_rotary_factor=0.5),
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tensors = {}
    for name, value in state_dict_without_tied_head(model).items():
        tensors[_to_bamba_name(name, mixers)] = value
    return raw, tensors


def _to_bamba_name(name: str, mixers) -> str:
    outside, parts = split_layer_name(name, _OUTER)
    if parts is None:
        return outside
    index, rest = parts
    mixer = "mamba." if mixers[int(index)] == "mamba2" else "self_attn."
    for theirs, ours in (("input_layernorm.", "norm."), (mixer, "mixer."), ("pre_ff_layernorm.", "norm2."),
                         ("feed_forward.", "mlp.")):
        if rest.startswith(ours):
            return f"model.layers.{index}.{theirs}{rest[len(ours):]}"
    return name


register_format(CheckpointFormat(name="bamba", config_from_raw=config_from_bamba, weights_to_ssmkit=weights_from_bamba,
                                 export=to_bamba), model_types=("bamba",))
