"""The causal depthwise conv1d as a plain loop over time: the specification the fast paths are tested against.

Formula, state layout, packed sequences and glossary: :mod:`ssmkit.ops.conv1d`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .args import _check_sequence_args


def _activate(y, activation):
    return F.silu(y) if activation == "silu" else y


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      initial_state: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None,
                      activation: Optional[str] = None, return_final_state: bool = False):
    """Plain loop over time, same arguments and results as :func:`causal_conv1d`.

    The window of past inputs is emptied (set to zero) whenever ``seq_idx`` changes: a new sequence starts.
    """
    weight, width = _check_sequence_args(x, weight, bias, initial_state, seq_idx, activation)
    batch, dim, _ = x.shape
    past = initial_state if initial_state is not None else x.new_zeros(batch, dim, width - 1)
    ids = seq_idx.unbind(1) if seq_idx is not None else None
    outputs = []
    for t, x_t in enumerate(x.unbind(-1)):
        if ids is not None and t > 0:
            same = (ids[t] == ids[t - 1]).to(x.dtype)[:, None, None]  # (batch, 1, 1)
            past = past * same
        window = torch.cat([past, x_t[..., None]], dim=-1)
        y_t = (window * weight).sum(-1)
        if bias is not None:
            y_t = y_t + bias
        outputs.append(y_t)
        past = window[..., 1:]
    y = _activate(torch.stack(outputs, dim=-1), activation)
    return (y, past) if return_final_state else y
