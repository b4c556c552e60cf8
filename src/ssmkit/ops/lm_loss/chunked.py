"""Cross-entropy of a language-model head without the (T, V) logits: chunks of rows, recomputed in backward.

For a 130M-shape model at L = 4096 the logits and their gradient are 4096 x 50280 floats each (0.8 GB apiece
in float32); here at most ``chunk_size`` x V exist at a time. Forward keeps only the per-row log-normaliser
lse_t = logsumexp(logits_t) (T floats); backward recomputes each chunk's logits and uses

    d loss / d logits_t = (softmax(logits_t) - onehot(target_t)) / n_valid          (0 for ignored rows)
    d hidden_t = (d logits_t) @ weight,        d weight = sum_t (d logits_t)^T hidden_t

Equations and shapes as :mod:`.reference` (hidden (T, D), weight (V, D), targets (T,)).
"""

from __future__ import annotations

import torch

from .reference import check_lm_loss_args


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size):
        work = torch.promote_types(hidden.dtype, torch.float32)  # logits in float32 or wider, as the reference
        valid = targets != ignore_index
        n_valid = int(valid.sum())
        lse = torch.empty(hidden.shape[0], dtype=work, device=hidden.device)
        total = torch.zeros((), dtype=work, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (hidden[rows] @ weight.T).to(work)                               # (chunk, V)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            safe = targets[rows].clamp(min=0)
            picked = logits.gather(1, safe[:, None])[:, 0]
            total += ((lse[rows] - picked) * valid[rows]).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.config = (ignore_index, chunk_size, n_valid)
        return total / max(n_valid, 1) if n_valid else total * float("nan")

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, lse = ctx.saved_tensors
        ignore_index, chunk_size, n_valid = ctx.config
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        work = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=work, device=weight.device) if ctx.needs_input_grad[1] else None
        scale = grad_loss.to(work) / max(n_valid, 1)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            grad_logits = torch.exp((h @ weight.T).to(work) - lse[rows, None])        # softmax, (chunk, V)
            valid = targets[rows] != ignore_index
            grad_logits.scatter_add_(1, targets[rows].clamp(min=0)[:, None], -valid[:, None].to(work))
            grad_logits *= (valid.to(work) * scale)[:, None]
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).to(work)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def lm_loss_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                    chunk_size: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight^T`` against ``targets``, ``chunk_size`` rows of logits at a time;
    equals :func:`.reference.lm_loss_ref` (value and gradients) without its (T, V) memory."""
    check_lm_loss_args(hidden, weight, targets)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
    return _ChunkedLMLoss.apply(hidden, weight, targets, ignore_index, chunk_size)
