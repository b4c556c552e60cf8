"""transformers' Zamba2 checkpoints (``model_type: zamba2``) <-> ssmkit.

Zamba2 (Glorioso et al. 2024, "The Zamba2 Suite: Technical Report", arXiv 2411.15242; after Zamba, arXiv
2405.16712): a stack of Mamba-2 layers, some of which ("hybrid" in ``layers_block_type``) first run a shared
transformer block: attention + MLP whose weights are reused at every hybrid layer (``num_mem_blocks`` weight
sets taken in turn), each use with its own low-rank adapters (on the MLP's gate/up projections, and on q, k, v
with ``use_shared_attention_adapter``) and its own output projection (``linear``). The shared block reads the
layer's input concatenated with the embeddings (width 2 hidden_size) and its output is added to the input of
the layer's Mamba-2 block, before its norm. In ssmkit terms: ``mixer="mamba2"`` everywhere, no MLP, and
``ModelConfig.shared_block`` (:class:`ssmkit.models.blocks.SharedBlock`) with ``layers`` = the hybrid layers,
``num_blocks`` = num_mem_blocks, head_dim = 2 hidden_size / num_attention_heads, softmax scale
1 / sqrt(head_dim / 2) (as transformers' Zamba2Attention), full rotary when ``use_mem_rope``.

transformers 5 ties the uses of a weight set only when ``tie_word_embeddings`` is true (as in the released
checkpoints); otherwise every use gets its own copy, saved under its own layer, and its adapter list keeps
slots of the other uses that nothing reads. ssmkit reads such a checkpoint as it runs: one weight set per use.

The Mamba-2 layers are transformers' Mamba-2 with a per-group gated norm of fixed eps 1e-5 and Delta clamped
from below at time_step_min.

Tensor names: ``model.embed_tokens``; ``model.layers.{i}.mamba`` / ``input_layernorm`` (plain layers) or
``model.layers.{i}.mamba_decoder.{mamba,input_layernorm}``, ``.linear`` and ``.shared_transformer.*`` (hybrid
layers; a weight set's tensors sit under the first layer that uses it, with the adapters of all its uses in
``*_adapter_list.{use}``); ``model.final_layernorm``; ``lm_head``. The MLP's ``gate_up_proj`` is ssmkit's
``gate_proj`` and ``up_proj`` stacked.
"""

from __future__ import annotations

import re
from typing import Tuple

import torch

from ..config import ModelConfig
from ._hybrid import (Tensors, all_equal, check_language_model, has_bias, json_float, require, rope_of,
                      state_dict_without_tied_head)
from .registry import CheckpointFormat, register_format

_OUTER = {"model.embed_tokens.weight": "backbone.embeddings.weight",
          "model.final_layernorm.weight": "backbone.norm_f.weight"}
_PLAIN_KINDS = ("mamba", "linear_attention")
#: Zamba2 hidden_act <-> ssmkit activation
_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "relu": "relu"}
_MAMBA_NORM_EPS = 1e-5  # Zamba2RMSNormGated's, fixed in transformers
_SHARED_INNER = (("input_layernorm.", "norm."), ("pre_ff_layernorm.", "norm2."),
                 ("self_attn.q_proj.", "attention.q_proj."), ("self_attn.k_proj.", "attention.k_proj."),
                 ("self_attn.v_proj.", "attention.v_proj."), ("self_attn.o_proj.", "attention.o_proj."),
                 ("feed_forward.down_proj.", "mlp.down_proj."))
_ADAPTER = re.compile(r"^(?:self_attn\.linear_(?P<qkv>[qkv])_adapter_list|feed_forward\.gate_up_proj_adapter_list)"
                      r"\.(?P<use>\d+)\.(?P<rest>.+)$")
_LAYER = re.compile(r"^model\.layers\.(?P<index>\d+)\.(?P<rest>.+)$")


def config_from_zamba2(raw: dict) -> ModelConfig:
    fmt = "zamba2"
    get = lambda key: require(raw, key, fmt)  # noqa: E731
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    types = list(get("layers_block_type"))
    unknown = sorted(set(types) - set(_PLAIN_KINDS) - {"hybrid"})
    if unknown:
        raise ValueError(f"{fmt} config: layers_block_type {unknown} are not supported (ssmkit reads "
                         f"{sorted(_PLAIN_KINDS + ('hybrid',))})")
    hybrid = [i for i, t in enumerate(types) if t == "hybrid"]
    for key in ("add_bias_linear", "use_long_context"):
        if raw.get(key, False):
            raise ValueError(f"{fmt} config: {key}=True is not supported")
    act = raw.get("hidden_act", "gelu")
    if act not in _ACTS:
        raise ValueError(f"{fmt} config: hidden_act={act!r} is not supported; ssmkit reads {sorted(_ACTS)}")
    d_inner = int(raw.get("mamba_expand", 2) * hidden)
    n_mamba_heads = raw.get("n_mamba_heads", 8)
    if d_inner % n_mamba_heads:
        raise ValueError(f"{fmt} config: n_mamba_heads={n_mamba_heads} must divide mamba_expand * hidden_size = "
                         f"{d_inner}")
    mamba2 = dict(d_state=raw.get("mamba_d_state", 64), d_conv=raw.get("mamba_d_conv", 4),
                  expand=raw.get("mamba_expand", 2), headdim=d_inner // n_mamba_heads,
                  ngroups=raw.get("mamba_ngroups", 1), chunk_size=raw.get("chunk_size", 256),
                  conv_bias=raw.get("use_conv_bias", True), bias=False,
                  dt_limit=(json_float(raw.get("time_step_min", 0.001)), float("inf")), norm_eps=_MAMBA_NORM_EPS)
    head_dim = 2 * hidden // heads
    theta, factor = rope_of(raw, fmt)
    if factor != 1.0:
        raise ValueError(f"{fmt} config: partial_rotary_factor={factor} is not supported (Zamba2 rotates whole heads)")
    shared = None
    if hybrid:
        adapters = raw.get("use_shared_attention_adapter", False)
        kv_heads = raw.get("num_key_value_heads") or heads
        if adapters and kv_heads != heads:
            raise ValueError(f"{fmt} config: q/k/v adapters need num_key_value_heads = num_attention_heads "
                             f"(transformers adds a {2 * hidden}-wide adapter to each); got {kv_heads} and {heads}")
        # transformers ties the uses of a weight set only with tie_word_embeddings; otherwise each use has its own.
        # Weight sets beyond the number of uses are never built (nor saved).
        tied = raw.get("tie_word_embeddings", True)
        shared = dict(layers=hybrid, num_blocks=min(raw.get("num_mem_blocks", 1), len(hybrid)) if tied else len(hybrid),
                      n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
                      rope=bool(raw.get("use_mem_rope", False)), rope_base=theta, softmax_scale=(head_dim / 2) ** -0.5,
                      mlp_hidden=raw.get("intermediate_size") or 4 * hidden, mlp_activation=_ACTS[act],
                      adapter_rank=raw.get("adapter_rank", 128), attention_adapters=bool(adapters),
                      concat_embeddings=True)
    return ModelConfig(d_model=hidden, n_layers=len(types), vocab_size=get("vocab_size"), mixer="mamba2",
                       mixer_kwargs={"mamba2": mamba2}, mlp="none", norm="rmsnorm",
                       norm_eps=raw.get("rms_norm_eps", 1e-5), residual_in_fp32=False,
                       tie_embeddings=raw.get("tie_word_embeddings", True), head="lm", shared_block=shared)


def weights_from_zamba2(weights: Tensors) -> Tensors:
    """Zamba2's names -> ssmkit's. The hybrid layers are those with a ``linear``; weight set b is the b-th of
    them that holds ``shared_transformer`` tensors; adapter ``{use}`` belongs to the use-th hybrid layer."""
    def layer_of(key):
        match = _LAYER.match(key)
        return (int(match["index"]), match["rest"]) if match else (None, None)

    hybrid = sorted({i for i, rest in map(layer_of, weights) if rest == "linear.weight"})
    owners = sorted({i for i, rest in map(layer_of, weights)
                     if rest is not None and rest.startswith("shared_transformer.")})
    out = {}
    for key, value in weights.items():
        if key in _OUTER:
            out[_OUTER[key]] = value
            continue
        i, rest = layer_of(key)
        new = None
        if i is not None:
            layer = f"backbone.layers.{i}."
            for theirs, ours in (("mamba_decoder.mamba.", "mixer."), ("mamba_decoder.input_layernorm.", "norm."),
                                 ("mamba.", "mixer."), ("input_layernorm.", "norm."), ("linear.", "shared.out_proj.")):
                if rest.startswith(theirs):
                    new = layer + ours + rest[len(theirs):]
                    break
            if rest.startswith("shared_transformer."):
                inner = rest[len("shared_transformer."):]
                block = f"backbone.shared_blocks.{owners.index(i)}."
                adapter = _ADAPTER.match(inner)
                if adapter and int(adapter["use"]) % len(owners) != owners.index(i):
                    continue  # an untied copy's slot for another use (see the module docstring): never read
                if adapter and int(adapter["use"]) < len(hybrid):
                    name = f"{adapter['qkv']}_adapter" if adapter["qkv"] else "mlp_adapter"
                    new = f"backbone.layers.{hybrid[int(adapter['use'])]}.shared.{name}.{adapter['rest']}"
                elif inner == "feed_forward.gate_up_proj.weight":
                    gate, up = value.chunk(2, dim=0)
                    out[block + "mlp.gate_proj.weight"], out[block + "mlp.up_proj.weight"] = gate, up
                    continue
                else:
                    for theirs, ours in _SHARED_INNER:
                        if inner.startswith(theirs):
                            new = block + ours + inner[len(theirs):]
                            break
        out[new if new is not None else key] = value
    return out


def to_zamba2(model) -> Tuple[dict, Tensors]:
    """(config.json dict, tensors) of a transformers Zamba2 checkpoint for an ssmkit model; a ValueError saying
    why when Zamba2 cannot describe the model."""
    fmt = "zamba2"
    check_language_model(model, fmt, shared_block=True)
    cfg = model.config
    spec = cfg.shared_block_spec()
    if set(cfg.layer_mixers()) != {"mamba2"} or set(cfg.layer_mlps()) != {"none"} or spec is None:
        raise ValueError(f"{fmt}: needs Mamba-2 layers without MLPs and a shared block; this model has mixers "
                         f"{sorted(set(cfg.layer_mixers()))}, MLPs {sorted(set(cfg.layer_mlps()))} and "
                         f"shared_block={cfg.shared_block}")
    if cfg.residual_in_fp32:
        raise ValueError(f"{fmt}: its residual stream stays in the model's dtype; this model has residual_in_fp32=True")
    hidden, heads = cfg.d_model, spec["n_heads"]
    head_dim = spec["head_dim"] or 2 * hidden // heads
    acts = {v: k for k, v in _ACTS.items()}
    wanted = dict(concat_embeddings=True, head_dim=2 * hidden // heads, softmax_scale=(head_dim / 2) ** -0.5)
    wrong = {k: spec[k] for k, v in wanted.items() if k != "head_dim" and spec[k] != v}
    if head_dim != wanted["head_dim"] or (2 * hidden) % heads:
        wrong["head_dim"] = head_dim
    if spec["adapter_rank"] is None or spec["mlp_activation"] not in acts \
            or len(spec["layers"]) < spec["num_blocks"]:
        wrong.update(adapter_rank=spec["adapter_rank"], mlp_activation=spec["mlp_activation"],
                     num_blocks=spec["num_blocks"])
    if not cfg.tie_embeddings and spec["num_blocks"] != len(spec["layers"]):
        wrong["num_blocks"] = spec["num_blocks"]  # transformers would untie the uses and initialise the copies
    kv_heads = spec["n_kv_heads"] or heads
    if spec["attention_adapters"] and kv_heads != heads:
        wrong["n_kv_heads"] = kv_heads
    if wrong:
        raise ValueError(f"{fmt}: its shared block reads [x, embeddings], has head_dim = 2 d_model / n_heads, "
                         f"softmax scale 1 / sqrt(head_dim / 2), MLP adapters, as many uses as weight sets at least "
                         f"and (with q/k/v adapters) n_kv_heads = n_heads; this model's differs in {wrong}")
    mambas = [layer.mixer for layer in model.backbone.layers]
    for key in ("d_state", "d_conv", "d_inner", "nheads", "headdim", "ngroups", "chunk_size", "dt_limit",
                "rmsnorm", "D_has_hdim"):
        all_equal((getattr(x, key) for x in mambas), key, fmt)
    m = mambas[0]
    if not m.rmsnorm or m.norm.norm_before_gate or m.D_has_hdim or m.norm.eps != _MAMBA_NORM_EPS \
            or m.dt_limit[1] != float("inf") or m.dt_limit[0] <= 0 or has_bias(m.in_proj) \
            or m.d_inner % hidden:
        raise ValueError(f"{fmt}: Mamba-2 layers need the gated norm after the gate with eps 1e-5, D per head, "
                         f"dt_limit (time_step_min > 0, inf), no projection biases and d_inner a multiple of d_model; "
                         f"this model's: {m.extra_repr()}, dt_limit={m.dt_limit}")
    hybrid, n_blocks = list(spec["layers"]), spec["num_blocks"]
    raw = dict(model_type=fmt, architectures=["Zamba2ForCausalLM"], vocab_size=cfg.padded_vocab_size,
               hidden_size=hidden, num_hidden_layers=cfg.n_layers,
               layers_block_type=["hybrid" if i in hybrid else "linear_attention" for i in range(cfg.n_layers)],
               mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=m.d_inner // hidden,
               mamba_ngroups=m.ngroups, n_mamba_heads=m.nheads, chunk_size=m.chunk_size,
               use_conv_bias=has_bias(m.conv1d), add_bias_linear=False, time_step_min=m.dt_limit[0],
               intermediate_size=spec["mlp_hidden"], hidden_act=acts[spec["mlp_activation"]],
               num_attention_heads=heads, num_key_value_heads=kv_heads, num_mem_blocks=n_blocks,
               use_shared_attention_adapter=spec["attention_adapters"], adapter_rank=spec["adapter_rank"],
               use_mem_rope=spec["rope"], rope_parameters=dict(rope_type="default", rope_theta=spec["rope_base"]),
               rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, use_mamba_kernels=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    owner = {b: hybrid[b] for b in range(n_blocks)}  # weight set b sits under its first use's layer
    tensors = {}
    for name, value in state_dict_without_tied_head(model).items():
        new = {v: k for k, v in _OUTER.items()}.get(name)
        parts = name.split(".")
        if new is None and name.startswith("backbone.shared_blocks."):
            b, rest = int(parts[2]), ".".join(parts[3:])
            prefix = f"model.layers.{owner[b]}.shared_transformer."
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                continue  # stacked below
            new = next(prefix + theirs + rest[len(ours):] for theirs, ours in _SHARED_INNER if rest.startswith(ours))
        elif new is None and name.startswith("backbone.layers."):
            i, rest = int(parts[2]), ".".join(parts[3:])
            layer = f"model.layers.{i}."
            if rest.startswith("shared."):
                use = hybrid.index(i)
                prefix = f"model.layers.{owner[use % n_blocks]}.shared_transformer."
                kind, tail = parts[4], ".".join(parts[5:])
                if kind == "out_proj":
                    new = layer + "linear." + tail
                elif kind == "mlp_adapter":
                    new = f"{prefix}feed_forward.gate_up_proj_adapter_list.{use}.{tail}"
                else:
                    new = f"{prefix}self_attn.linear_{kind[0]}_adapter_list.{use}.{tail}"
            else:
                inner = "mamba_decoder." if i in hybrid else ""
                for ours, theirs in (("mixer.", "mamba."), ("norm.", "input_layernorm.")):
                    if rest.startswith(ours):
                        new = layer + inner + theirs + rest[len(ours):]
        tensors[new if new is not None else name] = value
    for b in range(n_blocks):
        mlp = model.backbone.shared_blocks[b].mlp
        tensors[f"model.layers.{owner[b]}.shared_transformer.feed_forward.gate_up_proj.weight"] = torch.cat(
            [mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()], dim=0)
    return raw, tensors


register_format(CheckpointFormat(name="zamba2", config_from_raw=config_from_zamba2,
                                 weights_to_ssmkit=weights_from_zamba2, export=to_zamba2), model_types=("zamba2",))
