"""transformers' Mamba / Mamba2 checkpoints <-> ssmkit.

transformers is never imported here: its config.json is plain JSON and its tensor names equal ssmkit's
(``backbone.embeddings.weight``, ``backbone.layers.{i}.norm.weight``, ``backbone.layers.{i}.mixer.*``,
``backbone.norm_f.weight``, ``lm_head.weight``).
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from ..config import ModelConfig
from ..io import write_checkpoint_dir
from ._hybrid import check_no_gemma_options, check_unscaled
from .registry import CheckpointFormat, register_format


def _json_float(value) -> float:
    """transformers 5 writes non-finite floats as {"__float__": "Infinity"}; older versions as Infinity."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def config_from_hf(raw: dict) -> ModelConfig:
    model_type = raw["model_type"]
    d_model = raw["hidden_size"]
    common = dict(d_model=d_model, n_layers=raw["num_hidden_layers"], vocab_size=raw["vocab_size"],
                  norm="rmsnorm", norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                  residual_in_fp32=raw.get("residual_in_fp32", True), head="lm")
    expand = raw.get("expand", 2)
    if model_type == "mamba":
        rank = raw.get("time_step_rank", "auto")
        kwargs = dict(d_state=raw.get("state_size", 16), d_conv=raw.get("conv_kernel", 4), expand=expand,
                      dt_rank=math.ceil(d_model / 16) if rank == "auto" else rank,
                      conv_bias=raw.get("use_conv_bias", True), bias=raw.get("use_bias", False))
        return ModelConfig(mixer="mamba", mixer_kwargs={"mamba": kwargs},
                           tie_embeddings=raw.get("tie_word_embeddings", True), **common)
    head_dim = raw.get("head_dim", 64)
    num_heads = raw.get("num_heads")
    if num_heads is not None and num_heads * head_dim != expand * d_model:
        raise ValueError(f"mamba2 config: num_heads * head_dim = {num_heads * head_dim} must equal "
                         f"expand * hidden_size = {expand * d_model}")
    limit = raw.get("time_step_limit", (0.0, float("inf")))
    kwargs = dict(d_state=raw.get("state_size", 128), d_conv=raw.get("conv_kernel", 4), expand=expand,
                  headdim=head_dim, ngroups=raw.get("n_groups", 1), chunk_size=raw.get("chunk_size", 256),
                  conv_bias=raw.get("use_conv_bias", True), bias=raw.get("use_bias", False),
                  dt_limit=tuple(_json_float(v) for v in limit), norm_eps=raw.get("layer_norm_epsilon", 1e-5))
    return ModelConfig(mixer="mamba2", mixer_kwargs={"mamba2": kwargs},
                       tie_embeddings=raw.get("tie_word_embeddings", False), **common)


def to_hf(model) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(config.json dict, tensors) of a transformers Mamba/Mamba2 checkpoint for an ssmkit model.

    Only plain Mamba or Mamba2 language models (no attention, MLP or MoE layers, RMSNorm) have a transformers
    equivalent; anything else is refused with the reason.
    """
    cfg = model.config
    kinds = set(cfg.layer_mixers())
    if cfg.head != "lm" or len(kinds) != 1 or kinds - {"mamba", "mamba2"} or cfg.mlp != "none" \
            or cfg.norm != "rmsnorm" or cfg.bidirectional:
        raise ValueError("only pure Mamba or Mamba2 language models (RMSNorm, no MLP) convert to transformers; "
                         f"this model has mixers {sorted(kinds)}, mlp={cfg.mlp!r}, norm={cfg.norm!r}, head={cfg.head!r}")
    check_unscaled(model, "transformers")
    mixer = model.backbone.layers[0].mixer
    check_no_gemma_options(cfg, "transformers")
    if cfg.shared_block is not None:
        raise ValueError(f"transformers: Mamba and Mamba2 have no shared block; this model has shared_block="
                         f"{cfg.shared_block}")
    if getattr(mixer, "dt_bc_rmsnorm", None) is not None:
        raise ValueError("transformers' Mamba has no norms on dt, B and C; this model has "
                         f"dt_bc_rmsnorm={mixer.dt_bc_rmsnorm!r} (Falcon-Mamba or Jamba's)")
    if kinds == {"mamba2"} and mixer.rmsnorm and mixer.norm.eps != cfg.norm_eps:
        raise ValueError("transformers' Mamba2 uses layer_norm_epsilon in its gated norm too; this model has "
                         f"{mixer.norm.eps} there and norm_eps={cfg.norm_eps}")
    kind = kinds.pop()
    base = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, vocab_size=cfg.padded_vocab_size,
                layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=cfg.residual_in_fp32,
                tie_word_embeddings=cfg.tie_embeddings, expand=mixer.expand, conv_kernel=mixer.d_conv,
                state_size=mixer.d_state, use_bias=mixer.in_proj.bias is not None,
                use_conv_bias=mixer.conv1d.bias is not None, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if kind == "mamba":
        raw = dict(base, model_type="mamba", architectures=["MambaForCausalLM"], time_step_rank=mixer.dt_rank,
                   intermediate_size=mixer.d_inner)
    else:
        raw = dict(base, model_type="mamba2", architectures=["Mamba2ForCausalLM"], head_dim=mixer.headdim,
                   num_heads=mixer.nheads, n_groups=mixer.ngroups, chunk_size=mixer.chunk_size,
                   time_step_limit=list(mixer.dt_limit))
    tensors = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return raw, tensors


def save_hf(model, directory):
    """Write ``model`` as a transformers checkpoint directory (config.json + model.safetensors), atomically."""
    raw, tensors = to_hf(model)
    return write_checkpoint_dir(directory, raw, tensors)


register_format(CheckpointFormat(name="transformers", config_from_raw=config_from_hf, export=to_hf),
                model_types=("mamba", "mamba2"))
