"""Causal depthwise 1-D convolution with a carried state: the short convolution in front of Mamba's scan.

Each channel ``d`` is filtered by its own kernel of ``width`` taps, looking only at the present and the past
(Mamba Sec. 3.4, the ``conv1d`` of the block; the H3 "shift" convolution)::

    y[b, d, t] = bias[d] + sum_{k=0}^{width-1} weight[d, k] * xs[b, d, t + k]
    xs = concat(state, x)            # the width-1 inputs before x, then x

so ``weight[:, -1]`` multiplies the current input and ``weight[:, 0]`` the oldest one, exactly as
``torch.nn.Conv1d(dim, dim, width, groups=dim, padding=width-1)`` cropped to the first L outputs (and as
the ``causal_conv1d`` package).

**State.** The state is the last ``width - 1`` inputs, oldest first: (batch, dim, width - 1). That is all the
convolution needs to continue; it is the layout of ``causal_conv1d_fn``'s ``initial_states`` /
``final_states_out``. (mamba_ssm's and transformers' decoding caches keep ``width`` columns instead, the
oldest of which is never read again; convert with ``cache[..., 1:]``, and back by padding one zero column on
the left.) A zero state is the same as zero padding, i.e. the start of a sequence.

**Packed sequences.** ``seq_idx`` (batch, L) gives the integer id of the sequence each position belongs to,
non-decreasing along a row. An input contributes to an output only when both belong to the same sequence,
so no filter window reaches across a boundary; the carried ``state`` belongs to the sequence at position 0.
The final state holds only inputs of the last sequence of each row (zeros in place of older sequences' inputs),
so it continues that sequence.

Functions:

* :func:`causal_conv1d`         the whole sequence at once, backend "torch" (``shifted.py``: a custom autograd
  function with no padded copy of the input) or "triton" (``triton.py``);
* :func:`causal_conv1d_update`  one time step, for decoding (``step``);
* :func:`causal_conv1d_ref`     the specification: a plain loop over time (``reference.py``);
* argument checks shared by every backend, and :func:`packed_seq_idx`, are in ``args.py``.

Glossary: ``width`` = d_conv (kernel size, 4 in Mamba); ``dim`` = channels (d_inner in Mamba, conv_dim =
d_inner + 2 G N in Mamba-2); ``state`` = the conv part of a layer's recurrent state.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._triton import _check_runnable, auto_picks_triton, load_kernels, triton_available
from ..backends import last_backend as _last_backend
from ..backends import register_op, resolve
from .args import ACTIVATIONS, check_seq_idx, packed_seq_idx
from .reference import causal_conv1d_ref
from .shifted import causal_conv1d_torch, causal_conv1d_update_torch

register_op("causal_conv1d", ("torch", "triton"))
register_op("causal_conv1d_update", ("torch", "triton"))

__all__ = ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_ref", "check_seq_idx", "packed_seq_idx",
           "causal_conv1d_triton", "causal_conv1d_update_triton", "ACTIVATIONS", "last_backend",
           "available_backends"]


def available_backends() -> list[str]:
    """Backends of :func:`causal_conv1d` that can run here."""
    return (["triton"] if triton_available() else []) + ["torch"]


def last_backend():
    """The backend that the latest :func:`causal_conv1d` call ran in this thread, or None."""
    return _last_backend("causal_conv1d")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  initial_state: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None, return_final_state: bool = False,
                  backend: Optional[str] = None):
    """Causal depthwise convolution over a whole sequence (see the module docstring for the formula).

    Args:
        x: (batch, dim, L) input; any memory layout (a transposed view of a (batch, L, dim) tensor is fine).
        weight: (dim, width), or (dim, 1, width) as ``nn.Conv1d`` stores it.
        bias: optional (dim,).
        initial_state: optional (batch, dim, width-1), the inputs before ``x`` (oldest first); zeros if None.
        seq_idx: optional (batch, L) integer ids of packed sequences, non-decreasing along a row; no window
            crosses a change of id.
        activation: None or "silu", applied to the output.
        return_final_state: also return the state after the last step.
        backend: "torch" (shifted multiply-adds, any device), "triton" (GPU kernel of
            ``triton.py``), or None / "auto": the :func:`ssmkit.ops.use_backend` context, else
            "triton" for CUDA tensors when triton imports, else "torch".

    Returns:
        y (batch, dim, L), and the final state (batch, dim, width-1) when ``return_final_state``.
    """
    if resolve("causal_conv1d", backend, lambda: "triton" if auto_picks_triton(x) else "torch") == "triton":
        return causal_conv1d_triton(x, weight, bias, initial_state, seq_idx, activation, return_final_state)
    return causal_conv1d_torch(x, weight, bias, initial_state, seq_idx, activation, return_final_state)


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                         backend: Optional[str] = None, *, inplace: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """One time step: x (batch, dim), conv_state (batch, dim, width-1) -> (y (batch, dim), new state).

    Pure function (the state is not modified in place), so it works inside autograd and under tracing,
    unless ``inplace=True``: then the new window is written into ``conv_state``, which is returned.
    ``backend``: "torch", "triton" (fused GPU kernel, inference only) or None / "auto" (the
    :func:`ssmkit.ops.use_backend` context, else "triton" for CUDA tensors without gradients, else "torch").
    """
    if resolve("causal_conv1d_update", backend,
               lambda: "triton" if auto_picks_triton(x, inference_only=True) else "torch") == "triton":
        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation, inplace=inplace)
    y, new_state = causal_conv1d_update_torch(x, conv_state, weight, bias, activation)
    return (y, conv_state.copy_(new_state)) if inplace else (y, new_state)


def causal_conv1d_triton(x, weight, bias=None, initial_state=None, seq_idx=None, activation=None,
                         return_final_state=False):
    """Causal depthwise conv1d (+ SiLU) on Triton (``triton.py``); arguments and results as
    :func:`causal_conv1d`: x (batch, dim, L) any strides, weight (dim, width) or (dim, 1, width), bias (dim,),
    initial_state (batch, dim, width-1), seq_idx (batch, L)."""
    _check_runnable("causal_conv1d_triton", x)
    return load_kernels("ssmkit.ops.conv1d.triton").causal_conv1d_triton(
        x, weight, bias=bias, initial_state=initial_state, seq_idx=seq_idx, activation=activation,
        return_final_state=return_final_state)


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None, *, state_batch_indices=None,
                                inplace=False):
    """One conv step for decoding on Triton, as :func:`causal_conv1d_update`: x (batch, dim), conv_state
    (batch or cache rows, dim, width-1) -> (y (batch, dim), new state). Keyword-only ``state_batch_indices``
    (row ``i`` reads and writes cache row ``state_batch_indices[i]``) and ``inplace``; inference only."""
    _check_runnable("causal_conv1d_update_triton", x)
    return load_kernels("ssmkit.ops.conv1d.triton").causal_conv1d_update_triton(
        x, conv_state, weight, bias=bias, activation=activation, state_batch_indices=state_batch_indices,
        inplace=inplace)
