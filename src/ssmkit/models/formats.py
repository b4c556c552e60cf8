"""The one table of checkpoint formats: ``model_type`` in config.json -> :class:`CheckpointFormat`.

The table sits below the model (``SSMModel.from_pretrained`` looks formats up here) and the formats above it:
each module under ``ssmkit/models/interop/`` calls :func:`register_format` at import, and ``ssmkit.models``
imports that package, so every format is in the table before any model is loaded. Interop thus depends on
the model and its checkpoints, never the reverse, and adding a format is adding one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .config import ModelConfig
from .io import SSMKIT_MODEL_TYPE, config_from_dict, config_to_dict, unique_state_dict

Tensors = Dict[str, torch.Tensor]


def _same_names(weights: Tensors) -> Tensors:
    return dict(weights)


@dataclass(frozen=True)
class CheckpointFormat:
    """How to read (and optionally write) one checkpoint format.

    Attributes:
        name: what messages call it ("mamba", "state-spaces").
        config_from_raw: config.json dict -> :class:`ModelConfig`.
        weights_to_ssmkit: the file's tensors -> ssmkit's names and layouts (default: unchanged).
        export: ``model -> (config.json dict, tensors)`` for ``ssmkit convert --to``, or None.
        recognises: for formats whose config.json has no ``model_type``: a test on the raw dict.
        weights_read_config: ``weights_to_ssmkit`` takes ``(tensors, config.json dict)``: for formats whose
            config.json holds constants that ssmkit folds into the weights (Falcon-H1's multipliers).
    """

    name: str
    config_from_raw: Callable[[dict], ModelConfig]
    weights_to_ssmkit: Callable[[Tensors], Tensors] = _same_names
    export: Optional[Callable[[torch.nn.Module], Tuple[dict, Tensors]]] = None
    recognises: Optional[Callable[[dict], bool]] = None
    weights_read_config: bool = False

    def read_weights(self, weights: Tensors, raw: dict) -> Tensors:
        """The file's tensors under ssmkit's names and layouts (``raw``: the checkpoint's config.json dict)."""
        return self.weights_to_ssmkit(weights, raw) if self.weights_read_config else self.weights_to_ssmkit(weights)


#: model_type -> format. Formats without a model_type are keyed by their name and found by ``recognises``.
FORMATS: Dict[str, CheckpointFormat] = {}


def register_format(fmt: CheckpointFormat, model_types: Tuple[str, ...] = ()) -> CheckpointFormat:
    """Add ``fmt`` under each of ``model_types`` (or under its name when it is recognised by content)."""
    if not model_types and fmt.recognises is None:
        raise ValueError(f"format {fmt.name!r} needs model_types or a recognises(raw) test")
    for key in model_types or (fmt.name,):
        if key in FORMATS and FORMATS[key] is not fmt:
            raise ValueError(f"checkpoint format {key!r} is registered twice ({FORMATS[key].name!r} and {fmt.name!r})")
        FORMATS[key] = fmt
    return fmt


def supported_model_types() -> list:
    """The ``model_type`` values (and content-recognised format names) ssmkit reads."""
    return sorted(FORMATS)


def format_of(raw: dict, source: str = "config.json") -> CheckpointFormat:
    """The format of a config.json dict; an unknown one is a ValueError naming the supported ones."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source} must hold a JSON object; got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type in FORMATS and FORMATS[model_type].recognises is None:
        return FORMATS[model_type]
    for fmt in FORMATS.values():
        if fmt.recognises is not None and fmt.recognises(raw):
            return fmt
    readable = [k for k, f in sorted(FORMATS.items()) if f.recognises is None]
    by_content = [k for k, f in sorted(FORMATS.items()) if f.recognises is not None]
    raise ValueError(f"{source}: unrecognised checkpoint (model_type={model_type!r}); ssmkit reads model_type "
                     f"{readable}" + (f" and, recognised by their keys, {by_content}" if by_content else ""))


# ssmkit's own format lives in models/io.py (the trainer writes it too); it is listed here like any other.
SSMKIT = register_format(CheckpointFormat(name=SSMKIT_MODEL_TYPE, config_from_raw=config_from_dict,
                                          export=lambda model: (config_to_dict(model.config), unique_state_dict(model))),
                         model_types=(SSMKIT_MODEL_TYPE,))
