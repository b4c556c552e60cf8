"""The RG-LRU (real-gated linear recurrent unit) of Griffin and Hawk, one token at a time: the specification.

De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language
Models", arXiv 2402.19427, Sec. 2.4, Eqs. (1)-(4). Per channel, with x_t the unit's input at step t:

    r_t = sigmoid(W_a x_t + b_a)                 recurrence gate            (1)
    i_t = sigmoid(W_x x_t + b_x)                 input gate                 (2)
    a_t = a^(c r_t),  a = sigmoid(Lambda), c = 8                            (3)
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)                           (4)

and the unit outputs h_t. Details from the authors' code (google-deepmind/recurrentgemma) and transformers'
``RecurrentGemmaRglru``, which the parameter names follow:

* W_a and W_x are block-diagonal: ``n_heads`` blocks of (block_width, block_width), each applied as
  ``x_block @ W[h]`` (rows index inputs, columns outputs).
* a_t is computed in log space: log a_t = -c r_t softplus(recurrent_param), i.e. a = sigmoid(-recurrent_param)
  (Lambda = -recurrent_param), so a_t never leaves (0, 1] through rounding.
* The derivative of the square root is bounded (its argument clipped at 1 / (4 * 1000^2) in the backward only),
  which the authors added against NaNs in bfloat16 training; the forward is the exact square root.
* A reset (a document boundary; the first token of a sequence) sets a_t = 0: the state forgets everything
  before it, and the normalisation sqrt(1 - 0^2) = 1 lets the input in unscaled.

Glossary (code name: paper symbol):

=========================  ======================================================================
``x``                      x_t, the unit's input (the output of the short convolution in the block)
``recurrent_param``        -Lambda, (width,); a = sigmoid(-recurrent_param) = exp(-softplus(...))
``recurrent_gate_weight``  W_a as (n_heads, block_width, block_width) blocks; ``..._bias``: b_a
``input_gate_weight``      W_x as blocks; ``input_gate_bias``: b_x
``c``                      c = 8, the exponent scale of the recurrence gate
``h``                      h_t, the state (and output), (batch, width)
``reset``                  where a_t is forced to 0 (document boundaries)
=========================  ======================================================================
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..._checks import check_shape, check_tensor

#: c in a_t = a^(c r_t) (Griffin Sec. 2.4)
RGLRU_C = 8.0
#: the authors' bound on d sqrt(u) / du (recurrentgemma's and transformers' _MAX_SQRT_GRADIENT)
MAX_SQRT_GRADIENT = 1000.0


class _SqrtBoundedDerivative(torch.autograd.Function):
    """sqrt(u) whose derivative 1 / (2 sqrt(u)) is capped at MAX_SQRT_GRADIENT (at u -> 0, i.e. a_t -> 1)."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return torch.sqrt(u)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        # written with differentiable ops, so double backward works
        return grad / torch.sqrt(torch.clamp(4.0 * u, min=1.0 / MAX_SQRT_GRADIENT ** 2))


def sqrt_bounded_derivative(u: torch.Tensor) -> torch.Tensor:
    """sqrt(u) with the derivative capped at 1000 (see the module docstring)."""
    return _SqrtBoundedDerivative.apply(u)


def check_rglru_args(x, recurrent_param, input_gate_weight, input_gate_bias, recurrent_gate_weight,
                     recurrent_gate_bias, state, reset, time: bool) -> Tuple[int, int]:
    """Validate the RG-LRU arguments; returns (n_heads, block_width). ``time``: x is (batch, L, width)."""
    check_tensor("x", x)
    if x.dim() != (3 if time else 2):
        want = "(batch, length, width)" if time else "(batch, width)"
        raise ValueError(f"x must be {want}; got {tuple(x.shape)}")
    width = x.shape[-1]
    check_tensor("recurrent_param", recurrent_param)
    check_shape("recurrent_param", recurrent_param, (width,), f"(width={width},)")
    check_tensor("input_gate_weight", input_gate_weight)
    if input_gate_weight.dim() != 3 or input_gate_weight.shape[1] != input_gate_weight.shape[2] \
            or input_gate_weight.shape[0] * input_gate_weight.shape[1] != width:
        raise ValueError(f"input_gate_weight must be (n_heads, block_width, block_width) with n_heads * block_width "
                         f"= width={width}; got {tuple(input_gate_weight.shape)}")
    n_heads, block = input_gate_weight.shape[0], input_gate_weight.shape[1]
    for name, value, shape in (("recurrent_gate_weight", recurrent_gate_weight, (n_heads, block, block)),
                               ("input_gate_bias", input_gate_bias, (n_heads, block)),
                               ("recurrent_gate_bias", recurrent_gate_bias, (n_heads, block))):
        check_tensor(name, value)
        check_shape(name, value, shape, str(shape))
    batch = x.shape[0]
    if state is not None:
        check_tensor("initial_state" if time else "h", state)
        check_shape("initial_state" if time else "h", state, (batch, width), f"(batch={batch}, width={width})")
    if reset is not None:
        if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool:
            raise TypeError(f"reset must be a bool tensor; got {getattr(reset, 'dtype', type(reset).__name__)}")
        want = (batch, x.shape[1]) if time else (batch,)
        check_shape("reset", reset, want, str(want))
    for name, value in (("recurrent_param", recurrent_param), ("input_gate_weight", input_gate_weight),
                        ("input_gate_bias", input_gate_bias), ("recurrent_gate_weight", recurrent_gate_weight),
                        ("recurrent_gate_bias", recurrent_gate_bias), ("initial_state" if time else "h", state)):
        if value is not None and value.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}); got {value.dtype}")
    devices = {t.device for t in (x, recurrent_param, input_gate_weight, input_gate_bias, recurrent_gate_weight,
                                   recurrent_gate_bias, state, reset) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"the RG-LRU arguments must be on one device; got {sorted(map(str, devices))}")
    return n_heads, block


def rglru_step(x_t: torch.Tensor, h: Optional[torch.Tensor], recurrent_param: torch.Tensor,
               input_gate_weight: torch.Tensor, input_gate_bias: torch.Tensor, recurrent_gate_weight: torch.Tensor,
               recurrent_gate_bias: torch.Tensor, reset: Optional[torch.Tensor] = None,
               c: float = RGLRU_C) -> torch.Tensor:
    """One step of Eqs. (1)-(4): x_t (batch, width), h (batch, width) or None (zeros) -> h_t (batch, width).

    ``reset`` (batch,) bool: rows where a_t = 0 (a new document starts at this token). Pure function.
    """
    n_heads, block = check_rglru_args(x_t, recurrent_param, input_gate_weight, input_gate_bias,
                                      recurrent_gate_weight, recurrent_gate_bias, h, reset, time=False)
    blocks = x_t.reshape(x_t.shape[0], n_heads, block)                                 # (B, H, bw)
    r = torch.sigmoid(torch.einsum("bhi,hij->bhj", blocks, recurrent_gate_weight) + recurrent_gate_bias)
    i = torch.sigmoid(torch.einsum("bhi,hij->bhj", blocks, input_gate_weight) + input_gate_bias)
    r, i = r.reshape(x_t.shape), i.reshape(x_t.shape)
    log_a = -c * r * F.softplus(recurrent_param)                                       # log a_t <= 0
    a = torch.exp(log_a)
    normaliser = sqrt_bounded_derivative(-torch.expm1(2.0 * log_a))                    # sqrt(1 - a_t^2)
    if reset is not None:
        a = torch.where(reset[:, None], torch.zeros_like(a), a)
        normaliser = torch.where(reset[:, None], torch.ones_like(normaliser), normaliser)
    h_new = normaliser * (i * x_t)
    if h is not None:
        h_new = a * h + h_new
    return h_new


def rglru_ref(x: torch.Tensor, recurrent_param: torch.Tensor, input_gate_weight: torch.Tensor,
              input_gate_bias: torch.Tensor, recurrent_gate_weight: torch.Tensor, recurrent_gate_bias: torch.Tensor,
              initial_state: Optional[torch.Tensor] = None, reset: Optional[torch.Tensor] = None,
              return_final_state: bool = False, c: float = RGLRU_C):
    """The RG-LRU over a sequence by a loop of :func:`rglru_step`.

    Args:
        x: (batch, L, width), any memory layout.
        recurrent_param: (width,); input_gate_weight, recurrent_gate_weight: (n_heads, block_width, block_width)
            with n_heads * block_width = width; input_gate_bias, recurrent_gate_bias: (n_heads, block_width).
        initial_state: (batch, width), h before the first step; zeros if None.
        reset: (batch, L) bool, steps where a_t = 0 (document starts).
        return_final_state: also return h after the last step.

    Returns:
        h (batch, L, width), and h_{L-1} (batch, width) when ``return_final_state``.
    """
    check_rglru_args(x, recurrent_param, input_gate_weight, input_gate_bias, recurrent_gate_weight,
                     recurrent_gate_bias, initial_state, reset, time=True)
    if x.shape[1] == 0:
        raise ValueError(f"x must hold at least one time step; got shape {tuple(x.shape)}")
    h = initial_state
    states = []
    for t in range(x.shape[1]):
        h = rglru_step(x[:, t], h, recurrent_param, input_gate_weight, input_gate_bias, recurrent_gate_weight,
                       recurrent_gate_bias, None if reset is None else reset[:, t], c)
        states.append(h)
    out = torch.stack(states, dim=1)
    return (out, h) if return_final_state else out
