"""transformers' Nemotron-H checkpoints (``model_type: nemotron_h``) <-> ssmkit.

Nemotron-H (NVIDIA 2025, "Nemotron-H: A Family of Accurate and Efficient Hybrid Mamba-Transformer Models",
arXiv 2504.03624): a pattern of single-sublayer pre-norm residual blocks, each a Mamba-2 mixer (``M``), an
attention mixer without positional encoding (``*``) or an MLP without a gate, down(relu(up(x))^2) (``-``).
In ssmkit terms: ``mixer`` a list of "mamba2" / "attention" / "none" (the MLP-only layers), ``mlp`` "plain"
on exactly the "none" layers, ``mlp_activation="relu2"``. The Mamba-2 width is mamba_num_heads *
mamba_head_dim (not expand * hidden_size), its gated norm normalises each of the n_groups groups, and its
Delta is clamped from below at time_step_min (transformers' NemotronHMamba2Mixer).

The mixture-of-experts layers (``E``, ``moe`` in layers_block_type; Nemotron-3 Nano) are MLP-only layers whose
MLP is ssmkit's MoE with ``moe_router="sigmoid"`` (DeepSeek-V3's: sigmoid scores, a choice-only score bias,
``n_group`` / ``topk_group`` grouped top-k, ``norm_topk_prob``, ``routed_scaling_factor``), ``moe_expert="plain"``
(up, relu2, down) and a shared expert of ``moe_shared_expert_intermediate_size``. Refused: ``moe_latent_size``
(a projection around the experts) and expert and MLP layers of different widths (ssmkit has one mlp_hidden).

Tensor names equal ssmkit's (``backbone.embeddings``, ``backbone.layers.{i}.norm`` / ``mixer``,
``backbone.norm_f``, ``lm_head``) except in the MLP-only and expert layers, whose ``norm`` and ``mixer.*``
are ssmkit's ``norm2`` and ``mlp.*`` (``gate.weight`` -> ``router.weight``, ``gate.e_score_correction_bias`` ->
``score_bias``, ``shared_experts`` -> ``shared_expert``; stacked ``experts.up_proj`` (E, I, D) tensors are split
into one per expert).
"""

from __future__ import annotations

from typing import Tuple

from ..config import NO_MIXER, ModelConfig
from ._hybrid import (Tensors, all_equal, check_language_model, has_bias, json_float, rename_layers, require,
                      state_dict_without_tied_head)
from .registry import CheckpointFormat, register_format

#: layers_block_type entry (and legacy hybrid_override_pattern letter) -> ssmkit mixer
_KINDS = {"mamba": "mamba2", "linear_attention": "mamba2", "attention": "attention", "full_attention": "attention",
          "mlp": NO_MIXER, "moe": NO_MIXER}
_LETTERS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
#: ssmkit mixer -> the layers_block_type name transformers 5 writes (an MLP-only layer: "mlp" or "moe")
_WRITTEN = {"mamba2": "linear_attention", "attention": "full_attention", NO_MIXER: "mlp"}


def _block_types(raw: dict) -> list:
    if raw.get("layers_block_type"):
        return list(raw["layers_block_type"])
    if raw.get("layer_types"):
        return list(raw["layer_types"])
    pattern = raw.get("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("nemotron_h config.json has neither layers_block_type nor hybrid_override_pattern")
    unknown = sorted(set(pattern) - set(_LETTERS))
    if unknown:
        raise ValueError(f"nemotron_h hybrid_override_pattern has letters {unknown}; known: {sorted(_LETTERS)}")
    return [_LETTERS[c] for c in pattern]


def config_from_nemotron_h(raw: dict) -> ModelConfig:
    get = lambda key: require(raw, key, "nemotron_h")  # noqa: E731
    types = _block_types(raw)
    unknown = sorted({t for t in types if t not in _KINDS})
    if unknown:
        raise ValueError(f"nemotron_h: layers of type {unknown} are not supported (ssmkit reads {sorted(_KINDS)})")
    if "moe" in types and raw.get("moe_latent_size") is not None:
        raise ValueError(f"nemotron_h config: moe_latent_size={raw['moe_latent_size']} (a latent projection around "
                         "the experts) is not supported")
    if raw.get("mlp_bias", False):
        raise ValueError("nemotron_h config: mlp_bias=True is not supported (ssmkit's MLPs have no biases)")
    if raw.get("sliding_window") is not None:
        raise ValueError(f"nemotron_h config: sliding_window={raw['sliding_window']} is not supported")
    hidden = get("hidden_size")
    n_heads, head = raw.get("mamba_num_heads", 128), raw.get("mamba_head_dim", 64)
    d_inner = n_heads * head
    expand = d_inner / hidden
    if int(expand * hidden) != d_inner:
        raise ValueError(f"nemotron_h config: the Mamba-2 width mamba_num_heads * mamba_head_dim = {d_inner} is not "
                         f"a width ssmkit's expand * hidden_size can express (hidden_size={hidden})")
    eps = raw.get("layer_norm_epsilon", 1e-5)
    mamba2 = dict(d_state=raw.get("ssm_state_size", 128), d_conv=raw.get("conv_kernel", 4),
                  expand=int(expand) if expand == int(expand) else expand, headdim=head,
                  ngroups=raw.get("n_groups", 8), chunk_size=raw.get("chunk_size", 128),
                  conv_bias=raw.get("use_conv_bias", True), bias=raw.get("use_bias", False),
                  dt_limit=(json_float(raw.get("time_step_min", 0.001)), float("inf")), norm_eps=eps)
    heads = get("num_attention_heads")
    attention = dict(n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads,
                     head_dim=raw.get("head_dim") or hidden // heads, rope=False)
    mixers = [_KINDS[t] for t in types]
    mlps = ["moe" if t == "moe" else "plain" if _KINDS[t] == NO_MIXER else "none" for t in types]
    moe = {}
    if "moe" in mlps:
        if "plain" in mlps and raw.get("moe_intermediate_size") != get("intermediate_size"):
            raise ValueError(f"nemotron_h config: MLP layers (intermediate_size={get('intermediate_size')}) and expert "
                             f"layers (moe_intermediate_size={raw.get('moe_intermediate_size')}) of different widths "
                             "are not supported (ssmkit has one mlp_hidden)")
        moe = dict(num_experts=raw.get("n_routed_experts", raw.get("num_local_experts", 8)),
                   top_k=raw.get("num_experts_per_tok", 2), moe_renormalize=bool(raw.get("norm_topk_prob", True)),
                   moe_shared_hidden=raw.get("moe_shared_expert_intermediate_size") or None, moe_router="sigmoid",
                   moe_groups=raw.get("n_group", 1), moe_topk_groups=raw.get("topk_group", 1),
                   moe_scale=float(raw.get("routed_scaling_factor", 1.0)), moe_expert="plain")
    width = raw.get("moe_intermediate_size") if "plain" not in mlps and moe else get("intermediate_size")
    return ModelConfig(d_model=hidden, n_layers=len(types), vocab_size=get("vocab_size"), mixer=mixers,
                       mixer_kwargs={"mamba2": mamba2, "attention": attention}, mlp=mlps, **moe,
                       mlp_hidden=width, mlp_activation=raw.get("mlp_hidden_act", "relu2"),
                       norm="rmsnorm", norm_eps=eps, residual_in_fp32=raw.get("residual_in_fp32", False),
                       tie_embeddings=raw.get("tie_word_embeddings", False), head="lm")


#: an expert layer's tensors, theirs -> ours (under backbone.layers.<i>.mixer. / .mlp.)
_MOE_NAMES = (("gate.e_score_correction_bias", "score_bias"), ("gate.weight", "router.weight"),
              ("shared_experts.", "shared_expert."), ("experts.", "experts."))


def weights_from_nemotron_h(weights: Tensors) -> Tensors:
    weights = dict(weights)
    for name in [k for k in weights if k.endswith(("mixer.experts.up_proj", "mixer.experts.down_proj"))]:
        stacked = weights.pop(name)  # transformers 5 in memory: (E, out, in) per projection; on disk: one per expert
        prefix, projection = name.rsplit(".", 1)
        for e in range(stacked.shape[0]):
            weights[f"{prefix}.{e}.{projection}.weight"] = stacked[e]
    mlp_weights = ("mixer.up_proj.weight", "mixer.down_proj.weight", "mixer.gate.weight")  # MLP-only and expert layers
    mlp_layers = {k.split(".")[2] for k in weights if k.startswith("backbone.layers.") and k.endswith(mlp_weights)}

    def inner(i: int, rest: str):
        if str(i) not in mlp_layers:
            return None
        if rest.startswith("norm."):
            return f"backbone.layers.{i}.norm2.{rest[len('norm.'):]}"
        if rest.startswith("mixer."):
            rest = rest[len("mixer."):]
            for theirs, ours in _MOE_NAMES:
                if rest.startswith(theirs):
                    rest = ours + rest[len(theirs):]
                    break
            return f"backbone.layers.{i}.mlp.{rest}"
        return None

    return rename_layers(weights, {}, inner)


def to_nemotron_h(model) -> Tuple[dict, Tensors]:
    """(config.json dict, tensors) of a transformers Nemotron-H checkpoint for an ssmkit model; a ValueError
    saying why when Nemotron-H cannot describe the model."""
    fmt = "nemotron_h"
    check_language_model(model, fmt, deepseek_router=True)
    cfg = model.config
    mixers, mlps = cfg.layer_mixers(), cfg.layer_mlps()
    if "moe" in mlps and (cfg.moe_router, cfg.moe_expert) != ("sigmoid", "plain"):
        raise ValueError(f"{fmt}: its experts are ungated MLPs behind a sigmoid router; this model has "
                         f"moe_router={cfg.moe_router!r}, moe_expert={cfg.moe_expert!r}")
    if "moe" in mlps and cfg.moe_shared_hidden is None:
        raise ValueError(f"{fmt}: its expert layers have a shared expert; this model has moe_shared_hidden=None")
    if set(mixers) - {"mamba2", "attention", NO_MIXER} or "mamba2" not in mixers:
        raise ValueError(f"{fmt}: needs Mamba-2, attention and MLP-only layers; this model has mixers "
                         f"{sorted(set(mixers))}")
    for i, (mixer, mlp) in enumerate(zip(mixers, mlps)):
        if (mixer == NO_MIXER) != (mlp in ("plain", "moe")) or mlp not in ("none", "plain", "moe"):
            raise ValueError(f"{fmt}: each layer is a mixer or an ungated MLP, never both; layer {i} has mixer "
                             f"{mixer!r} and mlp {mlp!r}")
    layers = model.backbone.layers
    mambas = [layer.mixer for layer in layers if layer.mixer is not None and layer.mixer.name == "mamba2"]
    attns = [layer.mixer for layer in layers if layer.mixer is not None and layer.mixer.name == "attention"]
    for key in ("d_state", "d_conv", "d_inner", "nheads", "headdim", "ngroups", "chunk_size", "dt_limit",
                "rmsnorm", "D_has_hdim"):
        all_equal((getattr(x, key) for x in mambas), key, fmt)
    m = mambas[0]
    if not m.rmsnorm or m.norm.norm_before_gate or m.D_has_hdim or m.norm.eps != cfg.norm_eps \
            or m.dt_limit[1] != float("inf") or m.dt_limit[0] <= 0:
        raise ValueError(f"{fmt}: Mamba-2 layers need the gated norm after the gate with eps = layer_norm_epsilon, "
                         f"D per head and dt_limit (time_step_min > 0, inf); this model's: {m.extra_repr()}, "
                         f"dt_limit={m.dt_limit}")
    heads, kv_heads, head_dim = 1, 1, cfg.d_model
    if attns:
        heads = all_equal((x.n_heads for x in attns), "n_heads", fmt)
        kv_heads = all_equal((x.n_kv_heads for x in attns), "n_kv_heads", fmt)
        head_dim = all_equal((x.head_dim for x in attns), "head_dim", fmt)
        for x in attns:
            if x.rope or x.window is not None or has_bias(x.q_proj) or has_bias(x.o_proj):
                raise ValueError(f"{fmt}: attention has no positions, window or bias; this model's attention: "
                                 f"{x.extra_repr()}")
    raw = dict(model_type="nemotron_h", architectures=["NemotronHForCausalLM"], vocab_size=cfg.padded_vocab_size,
               hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden or 4 * cfg.d_model,
               layers_block_type=["moe" if mlp == "moe" else _WRITTEN[k] for k, mlp in zip(mixers, mlps)],
               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
               mlp_hidden_act=cfg.mlp_activation, mlp_bias=False, layer_norm_epsilon=cfg.norm_eps,
               residual_in_fp32=cfg.residual_in_fp32, tie_word_embeddings=cfg.tie_embeddings,
               ssm_state_size=m.d_state, mamba_num_heads=m.nheads, mamba_head_dim=m.headdim, n_groups=m.ngroups,
               conv_kernel=m.d_conv, expand=max(1, round(m.d_inner / cfg.d_model)), chunk_size=m.chunk_size,
               use_conv_bias=has_bias(m.conv1d), use_bias=has_bias(m.in_proj), time_step_min=m.dt_limit[0],
               attention_bias=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if "moe" in mlps:
        raw.update(n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                   moe_intermediate_size=cfg.mlp_hidden or 4 * cfg.d_model,
                   moe_shared_expert_intermediate_size=cfg.moe_shared_hidden, n_group=cfg.moe_groups,
                   topk_group=cfg.moe_topk_groups, norm_topk_prob=cfg.moe_renormalize,
                   routed_scaling_factor=cfg.moe_scale, moe_latent_size=None)
    tensors = {}
    for name, value in state_dict_without_tied_head(model).items():
        parts = name.split(".")
        if name.startswith("backbone.layers.") and mixers[int(parts[2])] == NO_MIXER:
            if parts[3] == "norm2":
                name = ".".join(parts[:3] + ["norm"] + parts[4:])
            elif parts[3] == "mlp":
                rest = ".".join(parts[4:])
                for theirs, ours in _MOE_NAMES:
                    if rest.startswith(ours):
                        rest = theirs + rest[len(ours):]
                        break
                name = ".".join(parts[:3] + ["mixer", rest])
        tensors[name] = value
    return raw, tensors


register_format(CheckpointFormat(name="nemotron_h", config_from_raw=config_from_nemotron_h,
                                 weights_to_ssmkit=weights_from_nemotron_h, export=to_nemotron_h),
                model_types=("nemotron_h",))
