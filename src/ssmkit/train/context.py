"""Context parallelism in the trainer (``parallel.context=N``): what the training loop asks of it.

    torchrun --nproc-per-node 4 -m ssmkit train --config configs/bytes_mamba.yaml parallel.context=2

The world of W processes is W / N data-parallel replicas of N consecutive ranks (a *context group*). The
ranks of a group read the same micro-batches (``data_rank = rank // N`` takes the place of ``rank`` in the
data order of :mod:`ssmkit.train.loop`, so a step reads the rows it reads with W / N processes and no
context parallelism) and each keeps its contiguous slice of every row (:mod:`ssmkit.parallel.context`).

Loss. Rank c of a group computes the task's loss on its slice (a mean over its scored positions), weighted
by its share of the micro-batch's scored positions, so the group's losses add up to the loss of the whole
micro-batch: ``loss_c = task.loss(slice c) * scored_c / scored``. DDP and FSDP average gradients over all W
ranks, i.e. over (W / N) replicas x N slices; the gradient of a replica is the *sum* over its slices, so
``backward`` runs on N x loss_c (:attr:`ContextPlan.gradient_scale`).

What is refused (ValueError): tasks other than language modelling (a sequence-level target sits on one
rank only), right-padded batches (``lengths``), layers without a constant-size state (attention: ring
attention is not implemented), bidirectional models and mixtures of experts (see
:func:`ssmkit.parallel.check_context_parallel`). Evaluation is not split: every rank evaluates whole
sequences, as without context parallelism.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..parallel.context import ContextParallel, check_context_parallel, make_context_groups
from ..tasks.base import IGNORE_INDEX, Batch
from .distributed import DistContext


class ContextPlan:
    """This process's share of a step: its data-parallel replica and its slice of the sequence.

    With ``size == 1`` everything is the identity (``data_rank = rank``, the batch unsplit, the task's loss).
    """

    def __init__(self, size: int, ctx: DistContext):
        self.size = size
        self.context: Optional[ContextParallel] = None
        self._scored = None
        if size == 1:
            self.data_rank, self.data_size = ctx.rank, ctx.world_size
            return
        if not ctx.distributed:
            raise ValueError(f"parallel.context={size} needs {size} processes per replica; this run has one process "
                             f"(start it with torchrun --nproc-per-node {size})")
        self.data_rank, self.data_size, group = make_context_groups(size)
        self.context = ContextParallel(group)

    @property
    def gradient_scale(self) -> int:
        """Factor on the loss before ``backward`` (module docstring)."""
        return self.size

    def check(self, model, task) -> None:
        """Refuse, before the first step, what context parallelism cannot split (module docstring)."""
        if self.context is None:
            return
        if getattr(task, "kind", None) != "lm":
            raise ValueError(f"parallel.context={self.size} needs a language-modelling task (targets at every "
                             f"position); task {getattr(task, 'name', task)!r} is of kind {task.kind!r}")
        check_context_parallel(model)

    def local_batch(self, batch: Batch) -> Batch:
        """This rank's slice of every row of ``batch`` (the whole batch without context parallelism)."""
        if self.context is None:
            return batch
        if batch.lengths is not None:
            raise ValueError(f"parallel.context={self.size} cannot split right-padded batches (the task gave "
                             "lengths); use parallel.context=1")
        self._scored = int((batch.targets != IGNORE_INDEX).sum())
        split = self.context.split
        return Batch(split(batch.inputs), split(batch.targets), None)

    def model_kwargs(self) -> Dict[str, Any]:
        """Extra keyword arguments of the model's forward."""
        return {} if self.context is None else {"context": self.context}

    def loss(self, task, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The loss of this rank's part of the micro-batch (module docstring); on a slice without scored
        positions a zero that still reaches every layer, so that the backward pass runs on every rank."""
        if self.context is None:
            return task.loss(logits, batch)
        scored = int((batch.targets != IGNORE_INDEX).sum())
        if scored == 0:
            return logits.sum() * 0.0
        return task.loss(logits, batch) * (scored / max(self._scored, 1))
