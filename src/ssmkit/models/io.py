"""Checkpoint files on disk: atomic directories, the ssmkit config.json, reading and strictly loading weights.

Everything here is about files and tensors, not about any one checkpoint format or model class, so the
format converters (:mod:`ssmkit.models.interop`), the pretrained mixin (:mod:`ssmkit.models.pretrained`) and
the trainer's checkpoints (:mod:`ssmkit.train.checkpointing`) all build on it and it imports none of them.

Writing is atomic: files go to a temporary sibling directory, are flushed to disk, and only then is that
directory renamed into place, so a crash never leaves a half-written checkpoint under the final name (at
worst the previous checkpoint survives next to a ``.tmp-*`` folder). Reading never unpickles: safetensors,
or a ``pytorch_model.bin`` only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Union

import safetensors.torch  # called through the module, so a test can replace save_file to simulate a full disk
import torch
from safetensors import SafetensorError

from .._version import __version__
from .config import ModelConfig

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"

#: ``model_type`` of ssmkit's own config.json (transformers' key, so one file names its format either way)
SSMKIT_MODEL_TYPE = "ssmkit"
#: keys of ssmkit's config.json that are not :class:`ModelConfig` fields
_SSMKIT_EXTRA_KEYS = ("model_type", "ssmkit_version")


# ------------------------------------------------------------------------------------------------------
# The ssmkit config.json (the only place its dict is built and read)
# ------------------------------------------------------------------------------------------------------
def config_to_dict(config: ModelConfig) -> Dict[str, Any]:
    """The config.json of an ssmkit checkpoint: the :class:`ModelConfig` fields, ``model_type`` and the
    ssmkit version that wrote it."""
    return dict(config.to_dict(), model_type=SSMKIT_MODEL_TYPE, ssmkit_version=__version__)


def config_from_dict(raw: Dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_dict` (unknown keys are refused by :meth:`ModelConfig.from_dict`)."""
    return ModelConfig.from_dict({k: v for k, v in raw.items() if k not in _SSMKIT_EXTRA_KEYS})


def read_config_json(directory: PathLike) -> Dict[str, Any]:
    """The JSON object in ``directory/config.json``; errors name the directory or the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    path = directory / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: a checkpoint directory holds config.json and weights")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(raw).__name__}")
    return raw


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


def recover_interrupted_replace(directory: PathLike) -> bool:
    """Undo a replacement by :func:`write_directory_atomically` that a kill interrupted between its two renames
    (the old directory moved aside, the new one not yet in place): if ``directory`` is missing and a moved-aside
    copy ``.<name>.old-*`` exists beside it, that complete copy is renamed back. Returns whether it did."""
    directory = Path(directory)
    if directory.exists() or not directory.parent.is_dir():
        return False
    aside = sorted(directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not aside:
        return False
    os.replace(aside[-1], directory)  # the newest one moved aside: the last complete directory
    _fsync_dir(directory.parent)
    return True


def write_directory_atomically(directory: PathLike, write_files: Callable[[Path], None]) -> Path:
    """Run ``write_files(tmp)`` in a temporary sibling of ``directory``, flush every file to disk, then swap
    it into place: readers see the old directory or the new one, never a half-written one. Between the two
    renames of the swap the old one is moved aside; an interruption there (in this process, or a kill seen by
    the next writer or reader: :func:`recover_interrupted_replace`) puts it back."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_replace(final)
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
        recover_interrupted_replace(final)
        raise
    return final


def write_checkpoint_dir(directory: PathLike, config_dict: dict, tensors: Dict[str, torch.Tensor],
                         extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Atomically replace ``directory`` by one holding config.json and model.safetensors (and whatever
    ``extra(tmp_dir)`` writes beside them, e.g. a trainer's state)."""

    def write_files(tmp: Path) -> None:
        weights = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        safetensors.torch.save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(tmp)

    return write_directory_atomically(directory, write_files)


def unique_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors stores each storage once)."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


# ------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------
def load_safetensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """The tensors of one safetensors file; a truncated or corrupt file is one ValueError naming it."""
    try:
        return safetensors.torch.load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def read_weights(directory: PathLike) -> Dict[str, torch.Tensor]:
    """Tensors from model.safetensors (or sharded safetensors, or pytorch_model.bin with weights_only)."""
    directory = Path(directory)
    single = directory / WEIGHTS_FILE
    index = directory / WEIGHTS_INDEX_FILE
    binary = directory / PICKLE_WEIGHTS_FILE
    if single.exists():
        return load_safetensors(single)
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            raise ValueError(f"{index} must be JSON with a 'weight_map' of tensor name -> shard file; "
                             f"could not read it: {err!r}") from err
        weights = {}
        for shard in shards:
            weights.update(load_safetensors(directory / shard))
        return weights
    if binary.exists():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights in {directory}: expected {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} "
                            f"or {PICKLE_WEIGHTS_FILE}")


def load_weights_strict(model: torch.nn.Module, weights: Dict[str, torch.Tensor], source: str = "checkpoint",
                        may_be_absent: Iterable[str] = ()) -> None:
    """Load ``weights`` into ``model``; any missing, unexpected or mis-shaped tensor is an error listing them all.

    ``may_be_absent``: names the file may leave out; by default the LM head of a model whose config ties it
    to the embedding (stored once).
    """
    expected = model.state_dict()
    tied = set(may_be_absent)
    config = getattr(model, "config", None)
    if getattr(model, "lm_head", None) is not None and getattr(config, "tie_embeddings", False):
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
