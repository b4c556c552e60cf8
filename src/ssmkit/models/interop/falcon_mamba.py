"""transformers' Falcon-Mamba checkpoints (``model_type: falcon_mamba``) <-> ssmkit.

Falcon-Mamba (Zuo et al. 2024, "Falcon Mamba: The First Competitive Attention-free 7B Language Model",
arXiv 2410.05355) is transformers' Mamba with one change inside the mixer: dt (before dt_proj), B and C are
RMS-normalised without learned weights (eps ``mixer_rms_eps``). In ssmkit terms: mixer "mamba" with
``dt_bc_rmsnorm="weightless"``. Tensor names equal ssmkit's (the norms have no tensors).
"""

from __future__ import annotations

from typing import Tuple

from ..config import ModelConfig
from ._hybrid import Tensors, all_equal, check_language_model, dt_rank_of, has_bias, require
from .registry import CheckpointFormat, register_format


def config_from_falcon_mamba(raw: dict) -> ModelConfig:
    get = lambda key: require(raw, key, "falcon_mamba")  # noqa: E731
    hidden = get("hidden_size")
    mamba = dict(d_state=raw.get("state_size", 16), d_conv=raw.get("conv_kernel", 4), expand=raw.get("expand", 2),
                 dt_rank=dt_rank_of(raw.get("time_step_rank", "auto"), hidden),
                 conv_bias=raw.get("use_conv_bias", True), bias=raw.get("use_bias", False),
                 dt_bc_rmsnorm="weightless", dt_bc_rmsnorm_eps=raw.get("mixer_rms_eps", 1e-6))
    return ModelConfig(d_model=hidden, n_layers=get("num_hidden_layers"), vocab_size=get("vocab_size"),
                       mixer="mamba", mixer_kwargs={"mamba": mamba}, norm="rmsnorm",
                       norm_eps=raw.get("layer_norm_epsilon", 1e-5), residual_in_fp32=raw.get("residual_in_fp32", True),
                       tie_embeddings=raw.get("tie_word_embeddings", True), head="lm")


def to_falcon_mamba(model) -> Tuple[dict, Tensors]:
    """(config.json dict, tensors) of a transformers Falcon-Mamba checkpoint for an ssmkit model; a ValueError
    saying why when the model is not a Falcon-Mamba."""
    fmt = "falcon_mamba"
    check_language_model(model, fmt)
    cfg = model.config
    if set(cfg.layer_mixers()) != {"mamba"} or set(cfg.layer_mlps()) != {"none"}:
        raise ValueError(f"{fmt}: only Mamba layers without MLPs; this model has mixers "
                         f"{sorted(set(cfg.layer_mixers()))} and MLPs {sorted(set(cfg.layer_mlps()))}")
    mixers = [layer.mixer for layer in model.backbone.layers]
    for key in ("d_state", "d_conv", "d_inner", "dt_rank", "dt_bc_rmsnorm"):
        all_equal((getattr(m, key) for m in mixers), key, fmt)
    m = mixers[0]
    if m.dt_bc_rmsnorm != "weightless" or m.d_inner % cfg.d_model:
        raise ValueError(f"{fmt}: Mamba layers with weightless RMS norms on dt, B and C and d_inner a multiple of "
                         f"d_model; this model's: {m.extra_repr()}")
    raw = dict(model_type="falcon_mamba", architectures=["FalconMambaForCausalLM"], vocab_size=cfg.padded_vocab_size,
               hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, state_size=m.d_state,
               expand=m.d_inner // cfg.d_model,
               conv_kernel=m.d_conv, time_step_rank=m.dt_rank, use_bias=has_bias(m.in_proj),
               use_conv_bias=has_bias(m.conv1d), layer_norm_epsilon=cfg.norm_eps, mixer_rms_eps=m.dt_layernorm.eps,
               residual_in_fp32=cfg.residual_in_fp32, tie_word_embeddings=cfg.tie_embeddings,
               intermediate_size=m.d_inner, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    tensors = dict(model.state_dict())
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return raw, tensors


register_format(CheckpointFormat(name="falcon_mamba", config_from_raw=config_from_falcon_mamba, export=to_falcon_mamba),
                model_types=("falcon_mamba",))
