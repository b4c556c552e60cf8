"""The checkpoint-format table as the format modules see it, and writing a model in a transformers format.

The table itself (:data:`FORMATS`, :func:`register_format`, :func:`format_of`) lives in
:mod:`ssmkit.models.formats`, below the model that looks formats up; it is re-exported here so that a
format module imports everything it needs from ``.registry``.
"""

from __future__ import annotations

from typing import Tuple

from ..formats import (FORMATS, SSMKIT, CheckpointFormat, Tensors, format_of, register_format,  # noqa: F401
                       supported_model_types)
from ..io import write_checkpoint_dir


# ------------------------------------------------------------------------------------------------------
# Writing a model in a transformers format (``ssmkit convert --to hf``)
# ------------------------------------------------------------------------------------------------------
def transformers_export(model) -> Tuple[str, dict, Tensors]:
    """(format name, config.json dict, tensors) of the transformers format that describes ``model``.

    Every registered format with an ``export`` (other than ssmkit's own) is asked in turn, plain
    transformers Mamba/Mamba2 first, then the others by name; each refuses with a ValueError a model it
    cannot describe exactly. When all refuse, the ValueError lists each one's reason.
    """
    candidates = {id(f): f for f in FORMATS.values() if f.export is not None and f is not SSMKIT}.values()
    reasons = []
    for fmt in sorted(candidates, key=lambda f: (f.name != "transformers", f.name)):
        try:
            raw, tensors = fmt.export(model)
        except ValueError as err:
            reasons.append(f"  {fmt.name}: {err}")
            continue
        return fmt.name, raw, tensors
    raise ValueError("no transformers format describes this model:\n" + "\n".join(reasons))


def save_transformers(model, directory):
    """Write ``model`` as a transformers checkpoint directory (config.json + model.safetensors) in the format
    :func:`transformers_export` picks, atomically. Returns (path, format name)."""
    name, raw, tensors = transformers_export(model)
    return write_checkpoint_dir(directory, raw, tensors), name
