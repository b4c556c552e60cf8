"""Reading and writing the checkpoint formats users already have, from local directories only.

``config_from_checkpoint(raw)`` recognises the format of a config.json and returns ``(kind, ModelConfig)``;
``convert_weights(kind, tensors)`` renames tensors to ssmkit's names. ssmkit's module names already follow
transformers' (``backbone.embeddings``, ``backbone.layers.{i}.mixer.in_proj`` ...), so the conversions are
mostly configuration.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..config import ModelConfig
from . import state_spaces, transformers_format


def config_from_checkpoint(raw: dict, source: str = "config.json") -> Tuple[str, ModelConfig]:
    if not isinstance(raw, dict):
        raise ValueError(f"{source} must hold a JSON object; got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type == "ssmkit":
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "ssmkit_version")}
        return "ssmkit", ModelConfig.from_dict(fields)
    if model_type in ("mamba", "mamba2"):
        return model_type, transformers_format.config_from_hf(raw)
    if "d_model" in raw and "n_layer" in raw:
        return "state-spaces", state_spaces.config_from_state_spaces(raw)
    raise ValueError(f"{source}: unrecognised checkpoint (model_type={model_type!r}); ssmkit reads its own "
                     "checkpoints, transformers' 'mamba' and 'mamba2', and state-spaces (d_model, n_layer, ssm_cfg)")


def convert_weights(kind: str, weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if kind == "state-spaces":
        return state_spaces.weights_from_state_spaces(weights)
    return dict(weights)
