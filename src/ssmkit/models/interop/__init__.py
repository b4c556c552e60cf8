"""Reading and writing the checkpoint formats users already have, from local directories only.

One module per external format (``transformers_format.py``: transformers' Mamba and Mamba2; ``falcon_mamba.py``,
``jamba.py``, ``bamba.py``, ``nemotron_h.py``, ``recurrent_gemma.py``, ``zamba2.py``,
``granitemoehybrid.py``, ``falcon_h1.py``: transformers' hybrids of
those names; ``state_spaces.py``: the original mamba_ssm format), each registering a :class:`CheckpointFormat`
in the one table :data:`FORMATS` (model_type -> format, :mod:`.registry`). This package imports every module in
it, so a new format is one new file; CONTRIBUTING.md ("Add a checkpoint format") gives the steps.

    fmt = format_of(json.loads(Path(d, "config.json").read_text()))   # e.g. FORMATS["mamba2"]
    config = fmt.config_from_raw(raw); weights = fmt.weights_to_ssmkit(read_weights(d))

ssmkit's module names already follow transformers' (``backbone.embeddings``, ``backbone.layers.{i}.mixer.in_proj``
...), so most conversions are configuration only.
"""

from __future__ import annotations

import importlib
import pkgutil

from .registry import (FORMATS, CheckpointFormat, format_of, register_format, save_transformers,  # noqa: F401
                       supported_model_types, transformers_export)

# every format module registers itself on import; the leading underscore keeps helpers out of this loop
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
