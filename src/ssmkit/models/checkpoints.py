"""The names this module used to define, kept so that old imports still work.

The code now lives where each job belongs: files and tensors in :mod:`ssmkit.models.io`, the formats in
:mod:`ssmkit.models.interop`, ``save_pretrained`` / ``from_pretrained`` on the model
(:mod:`ssmkit.models.pretrained`). New code imports from those modules.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .config import ModelConfig
from .io import (SSMKIT_MODEL_TYPE, PathLike, load_weights_strict, read_weights,  # noqa: F401
                 write_checkpoint_dir, write_directory_atomically)
from .model import SSMModel


def from_config(config: Union[ModelConfig, dict]) -> SSMModel:
    """Build a randomly initialised model from a :class:`ModelConfig` (or a dict of its fields)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return SSMModel(config)


def from_pretrained(directory: PathLike, dtype: Optional[torch.dtype] = None,
                    device: Optional[Union[str, torch.device]] = None) -> SSMModel:
    """:meth:`SSMModel.from_pretrained`: a checkpoint of any registered format from a local directory."""
    return SSMModel.from_pretrained(directory, dtype=dtype, device=device)


def save_pretrained(model: SSMModel, directory: PathLike):
    """:meth:`SSMModel.save_pretrained`."""
    return model.save_pretrained(directory)
