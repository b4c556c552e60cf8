"""``save_pretrained`` / ``from_pretrained`` for a model class, on top of :mod:`.io` and :mod:`.interop`.

A checkpoint is a directory with ``config.json`` and ``model.safetensors`` (see :mod:`ssmkit.models.io` for
how it is written and read). ``from_pretrained`` also reads the checkpoints users already have, all from
local directories (nothing is downloaded): every format in the table of :mod:`ssmkit.models.formats`, which
the modules of :mod:`ssmkit.models.interop` fill when ``ssmkit.models`` is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from . import io
from .formats import format_of
from .quantization import QUANTIZATION_FILE, quantize


class PretrainedMixin:
    """Saving and loading for a model class built as ``cls(config: ModelConfig)`` with a ``config`` attribute."""

    def save_pretrained(self, directory: io.PathLike) -> Path:
        """Write config.json + model.safetensors for this model atomically into ``directory`` (and, for a
        model made by :func:`ssmkit.quantize`, quantization.json: the method and the quantised modules)."""
        quantization = getattr(self, "quantization", None)
        extra = None
        if quantization is not None:
            def extra(tmp: Path) -> None:
                (tmp / QUANTIZATION_FILE).write_text(json.dumps(quantization, indent=2) + "\n")
        return io.write_checkpoint_dir(directory, io.config_to_dict(self.config), io.unique_state_dict(self), extra)

    @classmethod
    def from_pretrained(cls, directory: io.PathLike, dtype: Optional[torch.dtype] = None,
                        device: Optional[Union[str, torch.device]] = None):
        """Load a checkpoint of any registered format (ssmkit, transformers Mamba/Mamba2, state-spaces, ...)
        from a local directory, strictly (every tensor must match), in eval mode."""
        directory = Path(directory)
        io.recover_interrupted_replace(directory)  # a save killed between its two renames left it aside
        raw = io.read_config_json(directory)
        fmt = format_of(raw, source=str(directory / io.CONFIG_FILE))
        try:
            config = fmt.config_from_raw(raw)
        except (ValueError, TypeError) as err:
            written_by = raw.get("ssmkit_version")
            version = (f" (written by ssmkit {written_by}, this is {io.__version__})"
                       if written_by is not None and written_by != io.__version__ else "")
            raise ValueError(f"{directory / io.CONFIG_FILE} is not a config this ssmkit can read{version}: "
                             f"{err}") from err
        model = cls(config)
        quantization_path = directory / QUANTIZATION_FILE
        if quantization_path.exists():  # a quantised checkpoint: the same int8 modules first, then the weights
            spec = json.loads(quantization_path.read_text())
            quantize(model, spec["method"], spec["modules"])
        weights = fmt.read_weights(io.read_weights(directory), raw)
        io.load_weights_strict(model, weights, source=f"{fmt.name} checkpoint {directory}")
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        return model.eval()
