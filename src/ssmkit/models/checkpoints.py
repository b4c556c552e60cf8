"""Saving and loading models: ``save_pretrained`` / ``from_pretrained``.

A checkpoint is a directory with ``config.json`` and ``model.safetensors``. Saving is atomic: everything is
written to a temporary sibling directory, flushed to disk, and only then renamed into place, so a crash
never leaves a half-written checkpoint under the final name (at worst the previous checkpoint survives next
to a ``.tmp-*`` folder). Loading never unpickles: safetensors by default, and a ``pytorch_model.bin`` only
through ``torch.load(weights_only=True)``.

``from_pretrained`` also reads the checkpoints users already have, all from local directories (nothing is
downloaded): transformers' Mamba and Mamba2 (``model_type`` "mamba" / "mamba2") and the original
state-spaces format (``d_model`` / ``n_layer`` / ``ssm_cfg``); see :mod:`ssmkit.models.interop`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch

from .config import ModelConfig
from .model import SSMModel

PathLike = Union[str, os.PathLike]
SSMKIT_MODEL_TYPE = "ssmkit"


def from_config(config: Union[ModelConfig, dict]) -> SSMModel:
    """Build a randomly initialised model from a :class:`ModelConfig` (or a dict of its fields)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return SSMModel(config)


# ------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_directory_atomically(directory: PathLike, write_files: Callable[[Path], None]) -> Path:
    """Run ``write_files(tmp)`` in a temporary sibling of ``directory``, flush every file to disk, then swap
    it into place: readers see the old directory or the new one, never a half-written one."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write_files(tmp)
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            old.rmdir()
            os.replace(final, old)  # the previous checkpoint stays complete until the new one is in place
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_checkpoint_dir(directory: PathLike, config_dict: dict, tensors: Dict[str, torch.Tensor],
                         extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Atomically replace ``directory`` by one holding config.json and model.safetensors (and whatever
    ``extra(tmp_dir)`` writes beside them, e.g. a trainer's state)."""
    from safetensors.torch import save_file

    def write_files(tmp: Path) -> None:
        weights = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(tmp)

    return write_directory_atomically(directory, write_files)


def _unique_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors stores each storage once)."""
    out, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = tensor
    return out


def save_pretrained(model: SSMModel, directory: PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for ``model`` atomically into ``directory``."""
    from .. import __version__

    config = dict(model.config.to_dict(), model_type=SSMKIT_MODEL_TYPE, ssmkit_version=__version__)
    quantization = getattr(model, "quantization", None)
    extra = None
    if quantization is not None:  # int8 weights: method and module names beside config.json (ssmkit.quantize)
        from .quantization import QUANTIZATION_FILE

        def extra(tmp: Path) -> None:
            (tmp / QUANTIZATION_FILE).write_text(json.dumps(quantization, indent=2) + "\n")
    return write_checkpoint_dir(directory, config, _unique_state_dict(model), extra)


# ------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------
def read_weights(directory: PathLike) -> Dict[str, torch.Tensor]:
    """Tensors from model.safetensors (or sharded safetensors, or pytorch_model.bin with weights_only)."""
    directory = Path(directory)
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    binary = directory / "pytorch_model.bin"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(load_file(str(directory / shard)))
        return weights
    if binary.exists():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights in {directory}: expected model.safetensors, "
                            "model.safetensors.index.json or pytorch_model.bin")


def load_weights_strict(model: torch.nn.Module, weights: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``weights`` into ``model``; any missing, unexpected or mis-shaped tensor is an error listing them all.

    Tied parameters (the LM head sharing the embedding) may be absent from the file.
    """
    expected = model.state_dict()
    tied = set()
    if getattr(model, "lm_head", None) is not None and model.config.tie_embeddings:
        tied.add("lm_head.weight")
    missing = sorted(k for k in expected if k not in weights and k not in tied)
    unexpected = sorted(k for k in weights if k not in expected)
    misshaped = sorted(f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in weights if k in expected and tuple(weights[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise ValueError("\n".join(lines))
    with torch.no_grad():
        for name, tensor in weights.items():
            expected[name].copy_(tensor)


def from_pretrained(directory: PathLike, dtype: Optional[torch.dtype] = None,
                    device: Optional[Union[str, torch.device]] = None) -> SSMModel:
    """Load an ssmkit, transformers (Mamba/Mamba2) or state-spaces checkpoint from a local directory."""
    from .interop import config_from_checkpoint, convert_weights

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} is missing: a checkpoint directory holds config.json and weights")
    raw = json.loads(config_path.read_text())
    kind, config = config_from_checkpoint(raw, source=str(config_path))
    model = SSMModel(config)
    from .quantization import QUANTIZATION_FILE, quantize

    quantization_path = directory / QUANTIZATION_FILE
    if quantization_path.exists():  # a quantised checkpoint: make the same int8 modules, then load into them
        spec = json.loads(quantization_path.read_text())
        quantize(model, spec["method"], spec["modules"])
    weights = convert_weights(kind, read_weights(directory))
    load_weights_strict(model, weights, source=f"{kind} checkpoint {directory}")
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
