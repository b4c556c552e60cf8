"""Training checkpoints: written atomically, kept last-k, resumed exactly.

Layout of a run directory (``train.out_dir``)::

    out_dir/
      checkpoints/step-000500/      periodic, every train.checkpoint_every steps, the last keep_last kept
        config.json                 the ModelConfig (as save_pretrained writes it: from_pretrained reads it)
        model.safetensors           weights (the LM head tied to the embedding is stored once)
        trainer_state.pt            step, optimiser state (keyed by parameter name), scheduler state,
                                    RNG states of every rank, world size and micro-batches per step
        run.json                    the RunConfig, the task's settings, step, versions, latest metrics
      final/                        the same four files after the last step
      metrics.jsonl  curves.png  tensorboard/

Each checkpoint directory is first written as a hidden temporary sibling, flushed to disk and then
renamed into place (by :func:`ssmkit.models.io.write_checkpoint_dir`, as for model directories),
so a directory named ``step-*`` is always complete and a crash leaves at worst a ``.step-*.tmp-*`` folder
beside the previous checkpoint. ``trainer_state.pt`` holds only tensors, numbers, strings, lists, tuples
and dicts and is read back with ``torch.load(weights_only=True)``: nothing is unpickled.

Exact resume: the data of step ``s`` is a pure function of ``s`` (``ssmkit.train.loop``), so restoring the
weights, the optimiser and scheduler state, the step and the RNG states reproduces the losses of the
uninterrupted run bit for bit (on the same machine, threads and world size x grad_accum).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .._version import __version__
from ..models.io import (WEIGHTS_FILE, config_to_dict, load_safetensors, load_weights_strict,
                         recover_interrupted_replace, write_checkpoint_dir)
from .config import RunConfig, config_differences

PathLike = Union[str, os.PathLike]
CHECKPOINTS = "checkpoints"
FINAL = "final"
TRAINER_STATE = "trainer_state.pt"
RUN_INFO = "run.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

#: ``train`` keys that must match to resume: they change the optimisation or what each step computes.
#: The rest (out_dir, logging, evaluation, checkpoint cadence, threads, device, distributed, grad_accum as
#: long as world_size x grad_accum is unchanged) may differ between the interrupted and the resumed run.
RESUME_TRAIN_KEYS = ("steps", "batch_size", "lr", "ssm_lr_scale", "weight_decay", "betas", "eps", "warmup_steps",
                     "min_lr_ratio", "grad_clip", "aux_loss_weight", "bf16", "seed")


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run whose config differs from this one; the message lists the keys."""


class CheckpointCorrupt(ValueError):
    """A file of a training checkpoint cannot be read (truncated, corrupt, or not what it should be)."""


class OutputDirError(OSError):
    """``train.out_dir`` cannot hold the run (not writable, or too little free space), found before step 1."""


# --------------------------------------------------------------------------------------------------
# Checking the output directory up front
# --------------------------------------------------------------------------------------------------
def checkpoint_bytes(model: torch.nn.Module) -> int:
    """A generous size of one training checkpoint: the weights and AdamW's two moments in float32, plus
    1 MiB for the config, RNG states and run info."""
    return 3 * 4 * sum(p.numel() for p in model.parameters()) + 2 ** 20


def check_output_dir(out_dir: PathLike, needed_bytes: int = 0) -> None:
    """Refuse an ``out_dir`` that cannot be created or written, or whose file system has fewer than
    ``needed_bytes`` free, with one :class:`OutputDirError` naming it (before training, not at the first
    checkpoint an hour later)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".ssmkit-write-probe-", dir=out)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise OutputDirError(f"train.out_dir {str(out)!r} is not writable ({err.strerror or err}); choose a "
                             "writable train.out_dir") from err
    free = shutil.disk_usage(out).free
    if free < needed_bytes:
        raise OutputDirError(f"train.out_dir {str(out)!r} has {free / 2**20:.1f} MiB free but the run's "
                             f"checkpoints need about {needed_bytes / 2**20:.1f} MiB; free some space or choose "
                             "another train.out_dir")


def checkpoints_kept(steps: int, checkpoint_every: int, keep_last: int) -> int:
    """How many checkpoints the run holds on disk at once at most: the periodic ones kept, one more being
    written before the oldest is pruned, and ``final``."""
    periodic = steps // checkpoint_every if checkpoint_every > 0 else 0
    if keep_last > 0:
        periodic = min(periodic, keep_last + 1)
    return periodic + 1


# --------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------
def list_checkpoints(out_dir: PathLike) -> List[Tuple[int, Path]]:
    """``(step, path)`` of the complete periodic checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir() and (child / TRAINER_STATE).exists():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The checkpoint with the most steps in ``out_dir`` (``final`` wins a tie), or None."""
    candidates = [(step, 0, path) for step, path in list_checkpoints(out_dir)]
    final = Path(out_dir) / FINAL
    recover_interrupted_replace(final)  # a kill between the two renames of replacing final/
    if (final / TRAINER_STATE).exists():
        candidates.append((read_run_info(final)["step"], 1, final))
    return max(candidates)[2] if candidates else None


def resolve_checkpoint(resume: Union[bool, str, PathLike], out_dir: PathLike) -> Optional[Path]:
    """What ``train(resume=...)`` starts from.

    ``False``: nothing; refused if ``out_dir`` already holds checkpoints (they would be overwritten).
    ``True``: the latest checkpoint in ``out_dir`` (an error when there is none).
    ``"auto"``: the latest checkpoint when there is one, else nothing (restartable jobs).
    a path: that checkpoint directory, or the latest checkpoint of that run directory.
    """
    existing = latest_checkpoint(out_dir)
    if resume is False or resume is None:
        if existing is not None:
            raise FileExistsError(f"train.out_dir {str(out_dir)!r} already holds checkpoints (latest: {existing}); "
                                  "resume with resume=True (ssmkit train --resume) or choose another train.out_dir")
        return None
    if resume is True:
        if existing is None:
            raise FileNotFoundError(f"resume=True but train.out_dir {str(out_dir)!r} holds no checkpoint "
                                    f"(looked for {CHECKPOINTS}/step-* and {FINAL}/)")
        return existing
    if resume == "auto":
        return existing
    path = Path(resume)
    if (path / TRAINER_STATE).exists():
        return path
    if path.is_dir():
        inner = latest_checkpoint(path)
        if inner is not None:
            return inner
    raise FileNotFoundError(f"resume={str(resume)!r} is neither a training checkpoint (a directory holding "
                            f"{TRAINER_STATE}) nor a run directory holding one")


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """The RNG states of this process (torch CPU and CUDA, Python ``random``, NumPy), as weights_only-safe
    values."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2 ** 32))
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def write_checkpoint(directory: PathLike, *, model_config, weights: Dict[str, torch.Tensor],
                     trainer_state: Dict[str, Any], run_info: Dict[str, Any]) -> Path:
    """Atomically write one training checkpoint (layout in the module docstring)."""
    if model_config.head == "lm" and model_config.tie_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}  # tied: stored once
    config = config_to_dict(model_config)

    def write_trainer_files(tmp: Path) -> None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / RUN_INFO).write_text(json.dumps(run_info, indent=2, sort_keys=True, default=str) + "\n")

    return write_checkpoint_dir(directory, config, weights, extra=write_trainer_files)


def make_run_info(run: RunConfig, *, step: int, task_config: Dict[str, Any], world_size: int,
                  micro_batches: int, metrics: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    return {"run": run.to_dict(), "step": step, "task": task_config, "world_size": world_size,
            "micro_batches": micro_batches, "metrics": metrics or {}, "ssmkit_version": __version__,
            "torch_version": torch.__version__, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def prune_checkpoints(out_dir: PathLike, keep_last: int) -> List[Path]:
    """Delete all but the ``keep_last`` newest periodic checkpoints (0 keeps all); returns what was deleted."""
    if keep_last <= 0:
        return []
    doomed = [path for _, path in list_checkpoints(out_dir)[:-keep_last]]
    for path in doomed:
        # renamed out of the step-* namespace first: a crash during the deletion must not leave a half-deleted
        # directory that still looks like a checkpoint
        hidden = Path(tempfile.mkdtemp(prefix=f".{path.name}.deleting-", dir=path.parent))
        hidden.rmdir()
        os.replace(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def read_run_info(directory: PathLike) -> Dict[str, Any]:
    path = Path(directory) / RUN_INFO
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a training checkpoint")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointCorrupt(f"{path} is not valid JSON (truncated or corrupt?): {err}") from err
    if not isinstance(info, dict) or not isinstance(info.get("run"), dict) or "step" not in info:
        raise CheckpointCorrupt(f"{path} must be a JSON object with 'run' and 'step' (as the trainer writes "
                                f"it); got {str(info)[:80]!r}")
    return info


def read_trainer_state(directory: PathLike, map_location="cpu") -> Dict[str, Any]:
    path = Path(directory) / TRAINER_STATE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a training checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types (RuntimeError, EOFError, pickle's)
        raise CheckpointCorrupt(f"{path} is not a readable trainer state (truncated or corrupt?): "
                                f"{type(err).__name__}: {err}") from err
    missing = [key for key in ("step", "optimizer", "scheduler", "rng")
               if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointCorrupt(f"{path} lacks {missing} (not written by the ssmkit trainer?)")
    return state


def load_run_config_from_checkpoint(directory: PathLike) -> RunConfig:
    """The :class:`RunConfig` that wrote the checkpoint ``directory``."""
    return RunConfig.from_dict(read_run_info(directory)["run"])


def check_resumable(directory: PathLike, run: RunConfig, micro_batches: int) -> Dict[str, Any]:
    """Refuse to resume ``run`` from ``directory`` when the task, the model or the optimisation differ
    (:data:`RESUME_TRAIN_KEYS`), naming every differing key with both values; returns the run info."""
    info = read_run_info(directory)
    saved, now = info["run"], run.to_dict()
    differing = [key for key in config_differences({"task": saved.get("task", {}), "model": saved.get("model", {})},
                                                   {"task": now["task"], "model": now["model"]})]
    saved_train = saved.get("train", {})
    differing += [f"train.{key}" for key in RESUME_TRAIN_KEYS
                  if config_differences({key: saved_train.get(key)}, {key: now["train"][key]})]
    lines = []
    for key in differing:
        lines.append(f"  {key}: checkpoint {_lookup(saved, key)!r}, this run {_lookup(now, key)!r}")
    if info.get("micro_batches") != micro_batches:
        lines.append(f"  world_size x train.grad_accum (micro-batches per step): checkpoint "
                     f"{info.get('micro_batches')}, this run {micro_batches} (the data of each step would change)")
    if lines:
        raise CheckpointMismatch(f"cannot resume from {directory}: it was written by another config; differing "
                                 f"keys:\n" + "\n".join(lines) + "\nstart a new train.out_dir for a new config")
    return info


def _lookup(data: Dict[str, Any], dotted: str):
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


def gather_model_state(model: torch.nn.Module, fsdp: bool) -> Dict[str, torch.Tensor]:
    """The full, unsharded weights on CPU. Under FSDP a collective (every rank calls it; rank 0 gets the
    tensors, the others an empty dict)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def gather_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> Dict[str, Any]:
    """The optimiser state keyed by parameter name (torch.distributed.checkpoint's format, independent of
    parameter order and of sharding); a collective under FSDP, like :func:`gather_model_state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if fsdp else StateDictOptions()
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any],
                         fsdp: bool) -> None:
    """Inverse of :func:`gather_optimizer_state` (every rank passes the full state read from the file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=fsdp))


def load_model_weights(model: torch.nn.Module, directory: PathLike) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``model`` (strictly: every tensor must match)."""
    load_weights_strict(model, load_safetensors(Path(directory) / WEIGHTS_FILE), source=f"checkpoint {directory}")
