"""What the transformers hybrid formats (Jamba, Bamba, Nemotron-H, Falcon-Mamba, RecurrentGemma, Zamba2,
Granite-4.0-H, Falcon-H1) share:
reading their JSON values, renaming their per-layer tensors to ssmkit's and back, and the checks an export makes
before it claims a model.

Not a format itself (the leading underscore keeps it out of the package's import loop).

ssmkit's names: ``backbone.embeddings``, ``backbone.layers.{i}.norm`` (before the mixer), ``.mixer``,
``.norm2`` (before the MLP), ``.mlp`` (``gate_proj``/``up_proj``/``down_proj``; a mixture of experts:
``router`` and ``experts.{e}.*``), ``backbone.norm_f``, ``lm_head``.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, Optional, Tuple

import torch

Tensors = Dict[str, torch.Tensor]

_LAYER = re.compile(r"^(?P<prefix>.*?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")


def json_float(value) -> float:
    """transformers 5 writes non-finite floats as {"__float__": "Infinity"}; older versions as Infinity."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def require(raw: dict, key: str, model_type: str):
    """raw[key], or a ValueError naming the key that the config.json of ``model_type`` lacks."""
    if key not in raw:
        raise ValueError(f"{model_type} config.json has no {key!r}")
    return raw[key]


def rope_of(raw: dict, model_type: str, default_factor: float = 1.0) -> Tuple[float, float]:
    """(rope_theta, partial_rotary_factor): transformers 5 nests them in rope_parameters, older configs keep
    them at the top level; only the default (unscaled) rotary embedding is read."""
    params = raw.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{model_type} config: rope_type={rope_type!r} is not supported (ssmkit reads 'default')")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", default_factor))
    return float(theta), float(factor)


def mamba2_kwargs(raw: dict, expand, headdim: int, eps: float) -> dict:
    """Mamba2 mixer arguments from the ``mamba_*`` keys of a transformers hybrid config (Bamba, GraniteMoeHybrid,
    Falcon-H1 name them alike), with transformers' defaults."""
    limit = raw.get("time_step_limit") or (0.0, float("inf"))
    return dict(d_state=raw.get("mamba_d_state", 256), d_conv=raw.get("mamba_d_conv", 4), expand=expand,
                headdim=headdim, ngroups=raw.get("mamba_n_groups", 1), chunk_size=raw.get("mamba_chunk_size", 256),
                conv_bias=raw.get("mamba_conv_bias", True), bias=bool(raw.get("mamba_proj_bias", False)),
                dt_limit=tuple(json_float(v) for v in limit), norm_eps=eps)


def dt_rank_of(value, hidden_size: int) -> int:
    return math.ceil(hidden_size / 16) if value == "auto" else int(value)


def rename_layers(weights: Tensors, outer: Dict[str, str],
                  inner: Callable[[int, str], Optional[str]]) -> Tensors:
    """Rename a state dict: whole names through ``outer``, per-layer ones ``<...>layers.{i}.<rest>`` through
    ``inner(i, rest)`` (the new name, or None to keep it as it is, so a strict load reports it)."""
    renamed = {}
    for key, value in weights.items():
        if key in outer:
            renamed[outer[key]] = value
            continue
        match = _LAYER.match(key)
        new = inner(int(match["index"]), match["rest"]) if match else None
        renamed[new if new is not None else key] = value
    return renamed


def split_layer_name(name: str, outer: Dict[str, str]):
    """An ssmkit tensor name on its way out: (their name, None) for an outer tensor (``outer``: their name ->
    ours) or a name outside the layers (kept as it is); (None, (index, rest)) for backbone.layers.<index>.<rest>."""
    for theirs, ours in outer.items():
        if name == ours:
            return theirs, None
    if not name.startswith("backbone.layers."):
        return name, None
    index, rest = name[len("backbone.layers."):].split(".", 1)
    return None, (index, rest)


def outgoing_name(name: str, outer: Dict[str, str], inner) -> str:
    """An ssmkit tensor name -> theirs, for formats whose layer tensors differ from ours by a prefix only:
    ``inner`` pairs (their prefix, our prefix) under ``model.layers.<index>.``; other names as
    :func:`split_layer_name` gives them."""
    outside, parts = split_layer_name(name, outer)
    if parts is None:
        return outside
    index, rest = parts
    for theirs, ours in inner:
        if rest.startswith(ours):
            return f"model.layers.{index}.{theirs}{rest[len(ours):]}"
    return name


def unpack_experts(weights: Tensors, prefix: str) -> Tensors:
    """transformers 5 keeps the experts of a mixture as two stacked tensors in memory
    (``experts.gate_up_proj`` (E, 2I, D), ``experts.down_proj`` (E, D, I)); checkpoints on disk usually hold
    one ``experts.{e}.{gate,up,down}_proj.weight`` per expert. Either way: the per-expert names under ``prefix``."""
    out = dict(weights)
    packed_gate_up, packed_down = f"{prefix}experts.gate_up_proj", f"{prefix}experts.down_proj"
    if packed_gate_up in out and packed_down in out:
        gate_up, down = out.pop(packed_gate_up), out.pop(packed_down)
        hidden = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            out[f"{prefix}experts.{e}.gate_proj.weight"] = gate_up[e, :hidden]
            out[f"{prefix}experts.{e}.up_proj.weight"] = gate_up[e, hidden:]
            out[f"{prefix}experts.{e}.down_proj.weight"] = down[e]
    return out


def check_language_model(model, fmt: str, gemma: bool = False, shared_block: bool = False,
                         scaled: bool = False, deepseek_router: bool = False) -> None:
    """The part every export shares: an RMSNorm language model read left to right. Unless ``gemma`` (a format
    that describes them itself), also none of the Gemma-family options (embedding multiplier, logit soft-cap,
    (1 + weight) norms, MLP biases, tanh GeLU), which the Mamba-family formats cannot say; unless
    ``shared_block``, no shared block (Zamba2's); unless ``scaled`` (Granite's), no multipliers, attention
    scale or shared expert; unless ``deepseek_router`` (Nemotron-H's), no sigmoid router, expert groups, routed
    scale or ungated experts. The embedding multiplier is allowed by either ``gemma`` or ``scaled``."""
    cfg = model.config
    if cfg.head != "lm" or cfg.vocab_size is None or cfg.bidirectional or cfg.norm != "rmsnorm":
        raise ValueError(f"{fmt}: only causal RMSNorm language models convert; this model has head={cfg.head!r}, "
                         f"norm={cfg.norm!r}, bidirectional={cfg.bidirectional}")
    embedding = ("embedding_multiplier",) if (gemma or scaled) else ()
    if not gemma:
        check_no_gemma_options(cfg, fmt, allow=embedding)
    if not shared_block and cfg.shared_block is not None:
        raise ValueError(f"{fmt}: the format has no shared block; this model has shared_block={cfg.shared_block}")
    if not scaled:  # Nemotron-H's expert layers have a shared expert too
        check_unscaled(model, fmt, allow=embedding + (("moe_shared_hidden",) if deepseek_router else ()))
    if not deepseek_router and "moe" in cfg.layer_mlps():
        odd = {k: getattr(cfg, k) for k, default in (("moe_router", "softmax"), ("moe_groups", 1), ("moe_scale", 1.0),
                                                    ("moe_expert", "gated")) if getattr(cfg, k) != default}
        if odd:
            raise ValueError(f"{fmt}: its mixture of experts is softmax-routed gated experts; this model sets {odd}")


def check_no_gemma_options(cfg, fmt: str, allow=()) -> None:
    """A ValueError naming the Gemma-family options of ``cfg`` that are not at their defaults (but ``allow``)."""
    set_ = {k: getattr(cfg, k) for k, default in (("embedding_multiplier", 1.0), ("logit_softcap", None),
                                                  ("norm_weight_offset", 0.0), ("mlp_bias", False))
            if getattr(cfg, k) != default and k not in allow}
    if cfg.mlp_activation == "gelu_tanh":
        set_["mlp_activation"] = cfg.mlp_activation
    if set_:
        raise ValueError(f"{fmt}: the format has no {sorted(set_)}; this model sets {set_}")


def check_unscaled(model, fmt: str, allow=()) -> None:
    """A ValueError when the model has what only Granite's format describes: multipliers other than 1 (but
    ``allow``), an attention scale other than 1/sqrt(head_dim) or a shared expert beside a mixture."""
    cfg = model.config
    scales = {name: getattr(cfg, name) for name in ("embedding_multiplier", "residual_multiplier", "logit_multiplier")
              if name not in allow}
    odd = {k: v for k, v in scales.items() if v != 1.0}
    odd.update({f"layer {i} attention scale": layer.mixer.softmax_scale
                for i, layer in enumerate(model.backbone.layers)
                if getattr(layer.mixer, "softmax_scale", None) is not None})
    if cfg.moe_shared_hidden is not None and "moe" in cfg.layer_mlps() and "moe_shared_hidden" not in allow:
        odd["moe_shared_hidden"] = cfg.moe_shared_hidden
    if odd:
        raise ValueError(f"{fmt}: has no multipliers, attention scale or shared expert; this model has {odd}")


def all_equal(values, what: str, fmt: str):
    """The one value every layer shares (transformers' configs hold one per model), else a ValueError."""
    values = list(values)
    if len(set(values)) > 1:
        raise ValueError(f"{fmt}: every layer must share one {what}; this model has {sorted(set(map(str, values)))}")
    return values[0] if values else None


def has_bias(linear) -> bool:
    return linear.bias is not None


def state_dict_without_tied_head(model) -> Tensors:
    tensors = dict(model.state_dict())
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors
