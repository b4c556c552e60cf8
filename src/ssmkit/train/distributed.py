"""Data-parallel training on PyTorch's own engine: DistributedDataParallel, or FSDP as an option.

    torchrun --nproc-per-node 2 -m ssmkit train --config configs/bytes_mamba.yaml

torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address; :func:`setup` then
joins the process group (gloo on CPU, NCCL on CUDA, one GPU per process by ``LOCAL_RANK``). Without
``WORLD_SIZE > 1`` training runs in one process and nothing here talks to other processes.

Each rank reads only its own micro-batches (``ssmkit.train.loop``), the gradients are averaged by DDP's
all-reduce (or reduce-scattered by FSDP), and rank 0 alone writes checkpoints and logs, between barriers.
Evaluation is run identically by every rank on the same batches (it needs no communication under DDP,
and under FSDP every rank must take part in each forward anyway).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process stands: ``world_size`` processes, this one is ``rank`` (``local_rank`` on its host)
    and computes on ``device``; ``backend`` is the process group's ("gloo"/"nccl"), None when alone."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False  # this module created the process group, so it also destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {raw!r}") from None


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``"cpu"``, ``"cuda"`` (GPU ``local_rank``) or ``"auto"`` (CUDA when available, else CPU); the
    choice is reported by the trainer."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but torch.cuda.is_available() is False; use device=cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but this host has {count} CUDA device(s): start at most "
                           f"{count} processes per node")
    return torch.device("cuda", local_rank)


def setup(device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``); otherwise a one-process
    context. An already initialised process group is reused (and left for its owner to destroy)."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistContext(device=resolve_device(device, 0))
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    target = resolve_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    backend = "nccl" if target.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        kwargs = {"device_id": target} if target.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
        owns = True
    else:
        backend = dist.get_backend()
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"process group has world size {dist.get_world_size()} / rank {dist.get_rank()} but "
                           f"the environment says WORLD_SIZE={world_size} / RANK={rank}")
    return DistContext(world_size=world_size, rank=rank, local_rank=local_rank, device=target, backend=backend,
                       owns_group=owns)


def shutdown(ctx: DistContext, clean: bool = True) -> None:
    """Destroy the process group if :func:`setup` created it; after a last barrier when ``clean`` (so no rank
    leaves while another still writes), without one after an error (the others may never reach it)."""
    if ctx.owns_group and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
def wrap_model(model: nn.Module, ctx: DistContext, kind: str = "ddp", *,
               find_unused_parameters: bool = False, shard_layers: bool = True) -> nn.Module:
    """Wrap ``model`` (already on ``ctx.device``) for data-parallel training; unchanged in one process.

    ``kind="ddp"``: DistributedDataParallel (a full replica per rank, gradients all-reduced).
    ``kind="fsdp"``: FSDP2 ``fully_shard`` on every block and on the root (parameters, gradients and
    optimiser state sharded over ranks; the module keeps its class and parameter names).
    ``find_unused_parameters`` is needed when some parameters may get no gradient in a step (mixture of
    experts: an expert that no token chose). ``shard_layers=False`` shards the root only (under context
    parallelism: a per-block all-gather inside the forward would wait for ranks that are themselves waiting
    for the previous rank's state, so the gathers happen once, before the layers, instead).
    """
    if not ctx.distributed:
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(getattr(model, "backbone", None), "layers", []) if shard_layers else []:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"distributed must be 'ddp' or 'fsdp'; got {kind!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 modules are not wrapped)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce for accumulation micro-batches that are not the last one
    (``enabled=False``); the last micro-batch syncs the sum of them all."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        if is_fsdp(model):
            model.set_requires_gradient_sync(True)
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        yield
    else:
        yield


# --------------------------------------------------------------------------------------------------
def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks (in place; returned for convenience)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_gather_object(obj: Any, ctx: DistContext) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
