"""Cross-entropy of a language-model head: the specification.

    logits = hidden @ weight^T                      # (T, V)
    loss   = mean over t with target_t != ignore_index of  logsumexp(logits_t) - logits_t[target_t]

Shapes: hidden (T, D), weight (V, D), targets (T,) int64. This version materialises the (T, V) logits; the
chunked one (:mod:`.chunked`) never does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_lm_loss_args(hidden, weight, targets) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be (tokens, d_model); got {getattr(hidden, 'shape', type(hidden).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (vocab, {hidden.shape[1]}); got {getattr(weight, 'shape', None)}")
    if not isinstance(targets, torch.Tensor) or targets.shape != (hidden.shape[0],) or targets.is_floating_point():
        raise ValueError(f"targets must be integer ({hidden.shape[0]},); got {getattr(targets, 'shape', None)}")


def lm_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight^T`` against ``targets`` (logits in float32 or wider), a scalar."""
    check_lm_loss_args(hidden, weight, targets)
    logits = hidden @ weight.T
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=ignore_index)
