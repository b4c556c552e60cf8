"""Parallelism above the model: context (sequence) parallelism by passing recurrent states between ranks.

Layering: ``ops -> layers -> models -> parallel -> train/CLI``; nothing below imports this package (the
model only calls the duck-typed ``context`` hook documented in :meth:`ssmkit.models.model.SSMModel.forward`).
"""

from .context import ContextParallel, check_context_parallel, make_context_groups, sequence_bounds

__all__ = ["ContextParallel", "check_context_parallel", "make_context_groups", "sequence_bounds"]
