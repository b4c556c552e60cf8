"""transformers' RecurrentGemma checkpoints (``model_type: recurrent_gemma``) <-> ssmkit.

RecurrentGemma (Botev et al. 2024, "RecurrentGemma: Moving Past Transformers for Efficient Open Language
Models", arXiv 2404.07839) is Griffin (De et al. 2024, arXiv 2402.19427): a repeating pattern of temporal
blocks (``block_types``, by default two recurrent blocks then one local attention block), each layer two
pre-norm residual blocks, temporal block then MLP. In ssmkit terms:

=================================  ============================================================================
RecurrentGemma                     ssmkit
=================================  ============================================================================
recurrent block (conv + RG-LRU)    mixer "hawk" (lru_width, n_heads = num_attention_heads, conv_width)
local attention                    mixer "attention": multi-query (num_key_value_heads), head_dim = hidden /
                                   heads, rotary on the first partial_rotary_factor of each head, window =
                                   attention_window_size, q/k/v bias = attention_bias, o_proj always biased
MLP                                mlp "gated" with mlp_bias, mlp_activation "gelu_tanh", hidden =
                                   intermediate_size / 2
RMSNorm scaling by (1 + weight)    norm_weight_offset = 1
embeddings times sqrt(hidden)      embedding_multiplier = sqrt(hidden_size) rounded to bfloat16, as transformers
                                   keeps it (a bfloat16 buffer: sqrt(24) = 4.899 is applied as 4.906)
logits soft-capped                 logit_softcap = logits_soft_cap
residual stream in the model dtype residual_in_fp32 = False
=================================  ============================================================================

The RG-LRU's first token of a sequence (position 0) is a reset in both (a_t = 0), which ssmkit's Hawk state
tracks with its ``pos``. transformers applies ``hidden_activation`` both to the MLP and to the recurrent
block's gate branch; ssmkit's Hawk gate is the tanh GeLU, so only ``gelu_pytorch_tanh`` (every released
checkpoint's) is read.

Tensor names: ``model.embed_tokens``, ``model.layers.{i}.temporal_pre_norm`` / ``temporal_block`` /
``channel_pre_norm`` / ``mlp_block``, ``model.final_norm``, ``lm_head`` (tied by default); the recurrent and
attention blocks' own names equal ssmkit's Hawk and Attention names.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..config import ModelConfig
from ._hybrid import (Tensors, all_equal, check_language_model, has_bias, rename_layers, require, rope_of,
                      outgoing_name, state_dict_without_tied_head)
from .registry import CheckpointFormat, register_format

_OUTER = {"model.embed_tokens.weight": "backbone.embeddings.weight",
          "model.final_norm.weight": "backbone.norm_f.weight"}
_INNER = (("temporal_pre_norm.", "norm."), ("temporal_block.", "mixer."), ("channel_pre_norm.", "norm2."),
          ("mlp_block.", "mlp."))
#: block_types entry <-> ssmkit mixer
_KINDS = {"recurrent": "hawk", "attention": "attention"}
_BLOCK_TYPES = {v: k for k, v in _KINDS.items()}
#: transformers' names of the tanh-approximated GeLU
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")


def embedding_multiplier_for(hidden_size: int) -> float:
    """sqrt(hidden_size) as transformers applies it: stored in a bfloat16 buffer, so rounded to bfloat16."""
    return float(torch.tensor(hidden_size ** 0.5, dtype=torch.bfloat16))


def config_from_recurrent_gemma(raw: dict) -> ModelConfig:
    fmt = "recurrent_gemma"
    get = lambda key: require(raw, key, fmt)  # noqa: E731
    hidden, n_layers, heads = get("hidden_size"), get("num_hidden_layers"), get("num_attention_heads")
    block_types = list(raw.get("block_types") or ["recurrent", "recurrent", "attention"])
    unknown = sorted(set(block_types) - set(_KINDS))
    if unknown:
        raise ValueError(f"{fmt} config: block_types {unknown} are not supported (ssmkit reads {sorted(_KINDS)})")
    act = raw.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in _GELU_TANH:
        raise ValueError(f"{fmt} config: hidden_activation={act!r} is not supported: ssmkit's recurrent block gates "
                         f"with the tanh GeLU, one of {list(_GELU_TANH)}")
    if hidden % heads:
        raise ValueError(f"{fmt} config: num_attention_heads={heads} must divide hidden_size={hidden}")
    head_dim = hidden // heads  # transformers derives it so, whatever head_dim config.json holds
    theta, factor = rope_of(raw, fmt, default_factor=0.5)
    rope_dim = int(head_dim * factor)
    if rope_dim % 2 or rope_dim < 2:
        raise ValueError(f"{fmt} config: the rotated part of each head, int(head_dim * partial_rotary_factor) = "
                         f"int({head_dim} * {factor}) = {rope_dim}, must be a positive even number")
    lru_width = raw.get("lru_width") or hidden
    if lru_width % heads:
        raise ValueError(f"{fmt} config: num_attention_heads={heads} must divide lru_width={lru_width} (the RG-LRU "
                         "gates are block-diagonal with one block per head)")
    intermediate = get("intermediate_size")
    if intermediate % 2:
        raise ValueError(f"{fmt} config: intermediate_size={intermediate} must be even (the MLP is "
                         "intermediate_size / 2 wide)")
    hawk = dict(lru_width=lru_width, n_heads=heads, conv_width=raw.get("conv1d_width", 4))
    attention = dict(n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim,
                     rope=True, rope_base=theta, rope_dim=rope_dim, window=raw.get("attention_window_size", 2048),
                     bias=bool(raw.get("attention_bias", False)), out_bias=True)
    mixers = [_KINDS[block_types[i % len(block_types)]] for i in range(n_layers)]
    return ModelConfig(d_model=hidden, n_layers=n_layers, vocab_size=get("vocab_size"), mixer=mixers,
                       mixer_kwargs={"hawk": hawk, "attention": attention}, mlp="gated",
                       mlp_hidden=intermediate // 2, mlp_activation="gelu_tanh", mlp_bias=True, norm="rmsnorm",
                       norm_eps=raw.get("rms_norm_eps", 1e-6), norm_weight_offset=1.0,
                       embedding_multiplier=embedding_multiplier_for(hidden),
                       logit_softcap=float(raw.get("logits_soft_cap", 30.0)), residual_in_fp32=False,
                       tie_embeddings=raw.get("tie_word_embeddings", True), head="lm")


def _inner_to_ssmkit(i: int, rest: str):
    for theirs, ours in _INNER:
        if rest.startswith(theirs):
            return f"backbone.layers.{i}.{ours}{rest[len(theirs):]}"
    return None


def weights_from_recurrent_gemma(weights: Tensors) -> Tensors:
    return rename_layers(weights, _OUTER, _inner_to_ssmkit)


def _period(kinds) -> list:
    """The shortest prefix whose repetition gives ``kinds`` (what block_types says)."""
    n = len(kinds)
    for p in range(1, n + 1):
        if all(kinds[i] == kinds[i % p] for i in range(n)):
            return list(kinds[:p])
    return list(kinds)


def to_recurrent_gemma(model) -> Tuple[dict, Tensors]:
    """(config.json dict, tensors) of a transformers RecurrentGemma checkpoint for an ssmkit model; a ValueError
    saying why when RecurrentGemma cannot describe the model."""
    fmt = "recurrent_gemma"
    check_language_model(model, fmt, gemma=True)
    cfg = model.config
    mixers, mlps = cfg.layer_mixers(), cfg.layer_mlps()
    if set(mixers) - set(_BLOCK_TYPES) or set(mlps) != {"gated"}:
        raise ValueError(f"{fmt}: needs hawk and attention layers, each with a gated MLP; this model has mixers "
                         f"{sorted(set(mixers))} and MLPs {sorted(set(mlps))}")
    expected = dict(mlp_bias=True, mlp_activation="gelu_tanh", norm_weight_offset=1.0, residual_in_fp32=False,
                    embedding_multiplier=embedding_multiplier_for(cfg.d_model))
    wrong = {k: getattr(cfg, k) for k, v in expected.items() if getattr(cfg, k) != v}
    if cfg.logit_softcap is None:
        wrong["logit_softcap"] = None
    if wrong:
        raise ValueError(f"{fmt}: needs {expected} and a logit_softcap; this model has {wrong}")
    layers = model.backbone.layers
    hawks = [layer.mixer for layer in layers if layer.mixer.name == "hawk"]
    attns = [layer.mixer for layer in layers if layer.mixer.name == "attention"]
    heads = all_equal([x.n_heads for x in hawks + attns], "n_heads (one num_attention_heads serves both)", fmt)
    lru_width = all_equal((x.lru_width for x in hawks), "lru_width", fmt) or cfg.d_model
    conv_width = all_equal((x.conv_width for x in hawks), "conv_width", fmt) or 4
    kv_heads, theta, factor, window, bias = heads, 10000.0, 0.5, 2048, False
    if attns:
        kv_heads = all_equal((x.n_kv_heads for x in attns), "n_kv_heads", fmt)
        theta = all_equal((x.rope_base for x in attns), "rope_base", fmt)
        window = all_equal((x.window for x in attns), "window", fmt)
        bias = all_equal((has_bias(x.q_proj) for x in attns), "attention bias", fmt)
        rope_dim = all_equal((x.rope_dim for x in attns), "rope_dim", fmt)
        for x in attns:
            factor = x.rope_dim / x.head_dim
            if not x.rope or x.window is None or x.head_dim * heads != cfg.d_model or not has_bias(x.o_proj) \
                    or int(x.head_dim * factor) != rope_dim:
                raise ValueError(f"{fmt}: attention is local (a window), rotary, with head_dim = d_model / n_heads and "
                                 f"a biased o_proj; this model's attention: {x.extra_repr()}")
    if cfg.mlp_hidden is None:
        raise ValueError(f"{fmt}: set mlp_hidden (intermediate_size is twice it)")
    raw = dict(model_type=fmt, architectures=["RecurrentGemmaForCausalLM"], vocab_size=cfg.padded_vocab_size,
               hidden_size=cfg.d_model, intermediate_size=2 * cfg.mlp_hidden, num_hidden_layers=cfg.n_layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, lru_width=lru_width,
               attention_window_size=window, conv1d_width=conv_width, logits_soft_cap=cfg.logit_softcap,
               rms_norm_eps=cfg.norm_eps, hidden_activation="gelu_pytorch_tanh", attention_bias=bias,
               block_types=[_BLOCK_TYPES[k] for k in _period(mixers)], tie_word_embeddings=cfg.tie_embeddings,
               rope_parameters=dict(rope_type="default", rope_theta=theta, partial_rotary_factor=factor),
               pad_token_id=0, eos_token_id=1, bos_token_id=2)
    tensors = {outgoing_name(name, _OUTER, _INNER): value
               for name, value in state_dict_without_tied_head(model).items()}
    return raw, tensors


register_format(CheckpointFormat(name="recurrent_gemma", config_from_raw=config_from_recurrent_gemma,
                                 weights_to_ssmkit=weights_from_recurrent_gemma, export=to_recurrent_gemma),
                model_types=("recurrent_gemma",))
