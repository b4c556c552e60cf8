"""transformers' Falcon-H1 checkpoints (``model_type: falcon_h1``) <-> ssmkit.

Falcon-H1 (TII, Zuo et al. 2025, arXiv 2507.22448): every decoder layer runs a Mamba-2 mixer and attention IN
PARALLEL on the same normed input and adds both outputs to the residual, then a pre-normed SwiGLU MLP. In ssmkit
terms: every layer's mixer is ``"mamba2+attention"`` (:class:`ssmkit.models.blocks.ParallelMixers`, outputs
summed), ``mlp="gated"``, full rotary attention.

Its muP multipliers are constants on linear maps, so the import folds each into the weights of the map it
scales, and the model runs without them:

=============================  ================================================================
``ssm_in_multiplier``          Mamba-2 ``in_proj`` weight (its input times m)
``ssm_multipliers`` (5)        ``in_proj`` rows (and bias) of the z, x, B, C, dt sections (transformers' mup_vector)
``ssm_out_multiplier``         Mamba-2 ``out_proj`` weight and bias
``attention_in_multiplier``    q, k, v weights (the attention's input times m)
``key_multiplier``             k weight and bias
``attention_out_multiplier``   o weight and bias
``mlp_multipliers`` (gate, down)  ``gate_proj`` and ``down_proj`` weights
=============================  ================================================================

``embedding_multiplier`` stays ``ModelConfig.embedding_multiplier`` (the embedding may be tied to the head) and
``lm_head_multiplier`` is ``ModelConfig.logit_multiplier``. The export writes the folded weights with every
folded multiplier at 1: an exact description of the same network (transformers computes the same logits), but
the split of each scale between a weight and its multiplier is not kept, so a model read and written back has
weights equal to the original's times their multipliers.

Supported: the defaults and the options of the released checkpoints; ``mamba_rms_norm`` and
``mamba_norm_before_gate`` either way, ``attention_bias``; ``mamba_proj_bias`` only together with
``projectors_bias`` (ssmkit's Mamba-2 has one bias switch for its in and out projections). Refused by name:
``mlp_bias``, a ``hidden_act`` other than silu, a layer type other than "hybrid", rope scaling.

Tensor names: ``model.embed_tokens``, ``model.layers.{i}.input_layernorm`` / ``mamba`` / ``self_attn`` /
``pre_ff_layernorm`` / ``feed_forward``, ``model.final_layernorm``, ``lm_head``.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..config import ModelConfig
from ._hybrid import (Tensors, all_equal, check_language_model, has_bias, mamba2_kwargs, rename_layers, require,
                      outgoing_name, rope_of, state_dict_without_tied_head)
from .registry import CheckpointFormat, register_format

FMT = "falcon_h1"
PARALLEL = "mamba2+attention"
_OUTER = {"model.embed_tokens.weight": "backbone.embeddings.weight",
          "model.final_layernorm.weight": "backbone.norm_f.weight"}
_INNER = (("input_layernorm.", "norm."), ("mamba.", "mixer.branches.mamba2."),
          ("self_attn.", "mixer.branches.attention."), ("pre_ff_layernorm.", "norm2."), ("feed_forward.", "mlp."))


def _d_ssm(raw: dict) -> int:
    hidden = require(raw, "hidden_size", FMT)
    d_ssm = raw.get("mamba_d_ssm", 1024)
    return int(raw.get("mamba_expand", 2) * hidden) if d_ssm is None else int(d_ssm)


def config_from_falcon_h1(raw: dict) -> ModelConfig:
    get = lambda key: require(raw, key, FMT)  # noqa: E731
    hidden, n_layers = get("hidden_size"), get("num_hidden_layers")
    d_ssm, n_heads = _d_ssm(raw), raw.get("mamba_n_heads", 128)
    head = raw.get("mamba_d_head", "auto")
    head = d_ssm // n_heads if head == "auto" else int(head)
    if head * n_heads != d_ssm:
        raise ValueError(f"{FMT} config: mamba_n_heads * mamba_d_head = {n_heads} * {head} must equal the Mamba "
                         f"width (mamba_d_ssm, else mamba_expand * hidden_size) = {d_ssm}")
    expand = d_ssm / hidden
    if int(expand * hidden) != d_ssm:
        raise ValueError(f"{FMT} config: a Mamba width of {d_ssm} over hidden_size={hidden} is not representable")
    refused = {k: raw[k] for k in ("mlp_bias",) if raw.get(k, False)}
    if raw.get("hidden_act", "silu") != "silu":
        refused["hidden_act"] = raw["hidden_act"]
    if bool(raw.get("mamba_proj_bias", False)) != bool(raw.get("projectors_bias", False)):
        refused["mamba_proj_bias, projectors_bias"] = (raw.get("mamba_proj_bias"), raw.get("projectors_bias"))
    types = raw.get("layers_block_type") or raw.get("layer_types")
    if types is not None and set(types) != {"hybrid"}:
        refused["layers_block_type"] = sorted(set(types))
    if refused:
        raise ValueError(f"{FMT} config: not supported: {refused} (ssmkit reads mlp_bias=false, hidden_act='silu', "
                         f"mamba_proj_bias equal to projectors_bias, every layer 'hybrid')")
    eps = raw.get("rms_norm_eps", 1e-5)
    mamba2 = dict(mamba2_kwargs(raw, expand, head, eps), rmsnorm=bool(raw.get("mamba_rms_norm", False)),
                  norm_before_gate=bool(raw.get("mamba_norm_before_gate", True)))
    heads = get("num_attention_heads")
    head_dim = raw.get("head_dim") or hidden // heads
    theta, factor = rope_of(raw, FMT)
    if factor != 1.0:
        raise ValueError(f"{FMT} config: partial_rotary_factor={factor} is not supported (Falcon-H1 rotates "
                         f"whole heads)")
    attention = dict(n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim,
                     rope=True, rope_base=theta, bias=bool(raw.get("attention_bias", False)))
    return ModelConfig(d_model=hidden, n_layers=n_layers, vocab_size=get("vocab_size"), mixer=[PARALLEL] * n_layers,
                       mixer_kwargs={"mamba2": mamba2, "attention": attention}, mlp="gated",
                       mlp_hidden=get("intermediate_size"), mlp_activation="silu", norm="rmsnorm", norm_eps=eps,
                       residual_in_fp32=False, tie_embeddings=raw.get("tie_word_embeddings", False), head="lm",
                       embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
                       logit_multiplier=float(raw.get("lm_head_multiplier", 1.0)))


def _multipliers(raw: dict) -> dict:
    """Each folded multiplier of a config.json (transformers' defaults where absent)."""
    mlp = raw.get("mlp_multipliers") or [1.0, 1.0]
    ssm = raw.get("ssm_multipliers") or [1.0] * 5
    if len(mlp) != 2 or len(ssm) != 5:
        raise ValueError(f"{FMT} config: mlp_multipliers must hold 2 values (gate, down) and ssm_multipliers 5 "
                         f"(z, x, B, C, dt); got {mlp} and {ssm}")
    out = {k: float(raw.get(k, 1.0)) for k in ("ssm_in_multiplier", "ssm_out_multiplier", "attention_in_multiplier",
                                                "key_multiplier", "attention_out_multiplier")}
    out.update(gate=float(mlp[0]), down=float(mlp[1]), ssm=[float(v) for v in ssm])
    return out


def _mup_vector(raw: dict, like: torch.Tensor) -> torch.Tensor:
    """The per-row scale of the Mamba-2 in_proj: ssm_multipliers over its z, x, B, C, dt sections."""
    d_ssm, groups_state = _d_ssm(raw), raw.get("mamba_n_groups", 1) * raw.get("mamba_d_state", 256)
    sizes = [d_ssm, d_ssm, groups_state, groups_state, like.shape[0] - 2 * d_ssm - 2 * groups_state]
    return torch.cat([torch.full((n,), m, dtype=like.dtype) for n, m in zip(sizes, _multipliers(raw)["ssm"])])


def _inner_to_ssmkit(i: int, rest: str):
    for theirs, ours in _INNER:
        if rest.startswith(theirs):
            return f"backbone.layers.{i}.{ours}{rest[len(theirs):]}"
    return None


def weights_from_falcon_h1(weights: Tensors, raw: dict) -> Tensors:
    """Renamed, each multiplier folded into the weights it scales (see the module docstring)."""
    m = _multipliers(raw)
    scales = {  # name suffix -> (weight scale, bias scale)
        "mixer.branches.mamba2.out_proj": (m["ssm_out_multiplier"],) * 2,
        "mixer.branches.attention.q_proj": (m["attention_in_multiplier"], 1.0),
        "mixer.branches.attention.k_proj": (m["attention_in_multiplier"] * m["key_multiplier"], m["key_multiplier"]),
        "mixer.branches.attention.v_proj": (m["attention_in_multiplier"], 1.0),
        "mixer.branches.attention.o_proj": (m["attention_out_multiplier"],) * 2,
        "mlp.gate_proj": (m["gate"],) * 2, "mlp.down_proj": (m["down"],) * 2}
    out = {}
    for name, value in rename_layers(weights, _OUTER, _inner_to_ssmkit).items():
        module, _, kind = name.rpartition(".")
        tail = module.split(".", 3)[-1] if module.startswith("backbone.layers.") else None
        if tail == "mixer.branches.mamba2.in_proj":
            mup = _mup_vector(raw, value).to(value.device)
            value = value * (mup[:, None] * m["ssm_in_multiplier"] if kind == "weight" else mup)
        elif tail in scales:
            value = value * scales[tail][0 if kind == "weight" else 1]
        out[name] = value
    return out


def to_falcon_h1(model) -> Tuple[dict, Tensors]:
    """(config.json dict, tensors) of a transformers Falcon-H1 checkpoint for an ssmkit model; a ValueError
    saying why when Falcon-H1 cannot describe the model."""
    check_language_model(model, FMT, scaled=True)
    cfg = model.config
    mixers, mlps = cfg.layer_mixers(), cfg.layer_mlps()
    if set(mixers) != {PARALLEL} or set(mlps) != {"gated"}:
        raise ValueError(f"{FMT}: needs every layer a parallel '{PARALLEL}' mixer with a gated MLP; this model has "
                         f"mixers {sorted(set(mixers))} and MLPs {sorted(set(mlps))}")
    odd = {k: getattr(cfg, k) for k, default in (("parallel_combine", "sum"), ("parallel_branch_norm", False),
                                                  ("residual_multiplier", 1.0), ("mlp_activation", "silu"))
           if getattr(cfg, k) != default}
    if odd:
        raise ValueError(f"{FMT}: sums the two branches unnormed, has no residual multiplier and runs silu MLPs; "
                         f"this model has {odd}")
    layers = model.backbone.layers
    mambas = [layer.mixer.branches["mamba2"] for layer in layers]
    attns = [layer.mixer.branches["attention"] for layer in layers]
    for key in ("d_state", "d_conv", "d_inner", "nheads", "headdim", "ngroups", "chunk_size", "dt_limit",
                "rmsnorm", "D_has_hdim"):
        all_equal((getattr(x, key) for x in mambas), key, fmt=FMT)
    mb = mambas[0]
    all_equal((has_bias(x.in_proj) for x in mambas), "Mamba-2 bias", FMT)
    all_equal((has_bias(x.conv1d) for x in mambas), "Mamba-2 conv bias", FMT)
    if mb.rmsnorm:
        all_equal((x.norm.norm_before_gate for x in mambas), "Mamba-2 norm_before_gate", FMT)
    if mb.D_has_hdim or (mb.rmsnorm and mb.norm.eps != cfg.norm_eps):
        raise ValueError(f"{FMT}: Mamba-2 layers need D per head and a gated norm (if any) with eps = rms_norm_eps; "
                         f"this model's: {mb.extra_repr()}")
    for key in ("n_heads", "n_kv_heads", "head_dim", "rope_base"):
        all_equal((getattr(x, key) for x in attns), key, FMT)
    all_equal((has_bias(x.q_proj) for x in attns), "attention bias", FMT)
    at = attns[0]
    for x in attns:
        if not x.rope or x.rope_dim != x.head_dim or x.window is not None or x.softmax_scale is not None \
                or has_bias(x.o_proj) != has_bias(x.q_proj):
            raise ValueError(f"{FMT}: attention rotates whole heads, has no window, the default scale and o_proj "
                             f"biased like q, k, v; this model's attention: {x.extra_repr()}")
    raw = dict(model_type=FMT, architectures=["FalconH1ForCausalLM"], vocab_size=cfg.padded_vocab_size,
               hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden or 4 * cfg.d_model,
               num_hidden_layers=cfg.n_layers, num_attention_heads=at.n_heads, num_key_value_heads=at.n_kv_heads,
               head_dim=at.head_dim, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings, mamba_d_ssm=mb.d_inner, mamba_n_heads=mb.nheads,
               mamba_d_head=mb.headdim, mamba_n_groups=mb.ngroups, mamba_d_state=mb.d_state, mamba_d_conv=mb.d_conv,
               mamba_expand=2, mamba_chunk_size=mb.chunk_size, mamba_conv_bias=has_bias(mb.conv1d),
               mamba_proj_bias=has_bias(mb.in_proj), projectors_bias=has_bias(mb.in_proj),
               mamba_rms_norm=mb.rmsnorm, mamba_norm_before_gate=bool(mb.rmsnorm and mb.norm.norm_before_gate),
               time_step_limit=list(mb.dt_limit), attention_bias=has_bias(at.q_proj), mlp_bias=False,
               rope_parameters=dict(rope_type="default", rope_theta=at.rope_base),
               embedding_multiplier=cfg.embedding_multiplier, lm_head_multiplier=cfg.logit_multiplier,
               mlp_multipliers=[1.0, 1.0], ssm_multipliers=[1.0] * 5, key_multiplier=1.0,
               attention_in_multiplier=1.0, attention_out_multiplier=1.0, ssm_in_multiplier=1.0,
               ssm_out_multiplier=1.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tensors = {outgoing_name(name, _OUTER, _INNER): value
               for name, value in state_dict_without_tied_head(model).items()}
    return raw, tensors


register_format(CheckpointFormat(name=FMT, config_from_raw=config_from_falcon_h1,
                                 weights_to_ssmkit=weights_from_falcon_h1, weights_read_config=True,
                                 export=to_falcon_h1), model_types=(FMT,))
