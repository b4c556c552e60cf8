"""The original state-spaces (mamba_ssm) checkpoint format -> ssmkit.

config.json: ``d_model``, ``n_layer``, ``vocab_size``, ``ssm_cfg`` (mixer kwargs, ``layer``: "Mamba1" or
"Mamba2"), ``rms_norm``, ``residual_in_fp32``, ``fused_add_norm``, ``pad_vocab_size_multiple`` (50277 is padded
to 50280), ``tie_embeddings``; weights ``pytorch_model.bin`` with ``backbone.embedding.weight`` (singular).
"""

from __future__ import annotations

from typing import Dict

import torch

from ..config import ModelConfig
from .registry import CheckpointFormat, register_format

_MAMBA1_KEYS = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                "dt_init_floor", "conv_bias", "bias"}
_MAMBA2_KEYS = {"d_state", "d_conv", "expand", "headdim", "ngroups", "A_init_range", "D_has_hdim", "rmsnorm",
                "norm_before_gate", "dt_min", "dt_max", "dt_limit", "chunk_size", "conv_bias", "bias"}


def config_from_state_spaces(raw: dict) -> ModelConfig:
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ValueError(f"state-spaces ssm_cfg.layer must be 'Mamba1' or 'Mamba2'; got {layer!r}")
    if raw.get("attn_layer_idx") or raw.get("d_intermediate", 0):
        raise ValueError("state-spaces checkpoints with attention layers or MLPs (attn_layer_idx, d_intermediate) "
                         "are not supported yet")
    allowed = _MAMBA1_KEYS if layer == "Mamba1" else _MAMBA2_KEYS
    unknown = sorted(set(ssm_cfg) - allowed)
    if unknown:
        raise ValueError(f"state-spaces ssm_cfg has keys ssmkit does not know for {layer}: {unknown}")
    if "dt_limit" in ssm_cfg:
        ssm_cfg["dt_limit"] = tuple(float(v) for v in ssm_cfg["dt_limit"])
    if "A_init_range" in ssm_cfg:
        ssm_cfg["A_init_range"] = tuple(ssm_cfg["A_init_range"])
    name = "mamba" if layer == "Mamba1" else "mamba2"
    return ModelConfig(d_model=raw["d_model"], n_layers=raw["n_layer"], vocab_size=raw["vocab_size"],
                       pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", 8), mixer=name,
                       mixer_kwargs={name: ssm_cfg}, norm="rmsnorm" if raw.get("rms_norm", True) else "layernorm",
                       residual_in_fp32=raw.get("residual_in_fp32", True),
                       tie_embeddings=raw.get("tie_embeddings", True), head="lm")


def weights_from_state_spaces(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    renamed = {}
    for key, value in weights.items():
        if key == "backbone.embedding.weight":
            key = "backbone.embeddings.weight"
        renamed[key] = value
    return renamed


register_format(CheckpointFormat(name="state-spaces", config_from_raw=config_from_state_spaces,
                                 weights_to_ssmkit=weights_from_state_spaces,
                                 recognises=lambda raw: "d_model" in raw and "n_layer" in raw))
