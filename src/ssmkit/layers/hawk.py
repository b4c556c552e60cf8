"""Hawk / Griffin's recurrent block: a gated short convolution followed by the RG-LRU (De et al. 2024,
"Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language Models",
arXiv 2402.19427, Sec. 2.3 and Fig. 2 for the block, Sec. 2.4, Eqs. (1)-(4) for the RG-LRU).

One block, read top to bottom (x of (batch, L, d_model)):

    y   = gelu(linear_y(x))                        # (B, L, W) the gate branch (tanh-approximated GeLU)
    u   = conv_1d(linear_x(x))                     # (B, L, W) causal depthwise conv, width 4, no activation
    h_t = RG-LRU(u)_t:                             # ssmkit.ops.rglru, per channel:
          r_t = sigmoid(W_a u_t + b_a),  i_t = sigmoid(W_x u_t + b_x)          (1), (2)
          log a_t = -8 r_t softplus(recurrent_param)      (a_t = a^(c r_t), a = sigmoid(Lambda))   (3)
          h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t)                          (4)
    out = linear_out(h * y)                        # (B, L, d_model)

Hawk stacks these blocks (with MLP blocks: ``ModelConfig(mixer="hawk", mlp="gated")``); Griffin interleaves
two of them with one local (sliding-window) attention layer: the pattern "HHA" with ``attention: {window: w}``
(``configs/griffin.yaml``).

Parameter names and shapes are those of transformers' ``RecurrentGemmaRecurrentBlock`` (``linear_y``,
``linear_x``, ``linear_out``, ``conv_1d``, ``rg_lru.{recurrent_param, input_gate_weight, input_gate_bias,
recurrent_gate_weight, recurrent_gate_bias}``), so its state dict loads unchanged, and the initialisation is
theirs: linear_x, linear_y ~ N(0, 1 / d_model), zero biases; conv_1d ~ N(0, 0.01 / width), zero bias; the
block-diagonal gate weights ~ N(0, 0.01 / block_width), zero biases; a^2 = sigmoid(Lambda)^2 ~ U[0.9^2,
0.999^2]; linear_out ~ N(0, 4 / W), zero bias, which the model's depth scaling (``depth_scaled``, divided by
sqrt(2 n_layers)) brings to RecurrentGemma's N(0, (2 / n_layers) / W).

Glossary (code name: paper symbol):

=======================  ================================================================================
``d_model``              D, the model width
``lru_width``            W, the width of the recurrence (d_model unless given, as in RecurrentGemma)
``n_heads``              the number of blocks of the block-diagonal gate weights W_a, W_x
``conv_width``           the temporal convolution's width (4)
``rg_lru.recurrent_param``  -Lambda (W,): a = sigmoid(Lambda) = exp(-softplus(recurrent_param))
=======================  ================================================================================

**Resets.** As in the authors' code, a_t = 0 at the first token of a document (RecurrentGemma: position 0),
so it enters unnormalised (sqrt(1 - 0) = 1) and nothing before it is remembered. The state therefore
carries ``pos``, the number of tokens seen: a forward without a state, or from ``init_state``, starts a
document; a state from an earlier call continues one. Packed sequences (``seq_idx`` / ``cu_seqlens``) reset
the convolution window and the RG-LRU at every boundary, which equals running each sequence alone.

**State** ``{"hawk.conv": (batch, W, conv_width - 1), "hawk.h": (batch, W), "hawk.pos": (batch,) int64}``:
the last conv_width - 1 inputs of the convolution (oldest first), the RG-LRU state h, and the position.
transformers keeps the same two tensors (``conv1d_state``, ``rg_lru.recurrent_states``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int
from ..ops.conv1d import causal_conv1d, causal_conv1d_update
from ..ops.rglru import BACKENDS as RGLRU_BACKENDS
from ..ops.rglru import rglru, rglru_step
from .base import Mixer, State, ssm_core_precision, state_dtype, to_core_dtype
from .registry import register_mixer


class RGLRU(nn.Module):
    """The RG-LRU's parameters (transformers' ``RecurrentGemmaRglru`` names) and its initialisation; the
    computation is :mod:`ssmkit.ops.rglru`."""

    def __init__(self, width: int, n_heads: int, w_init_variance_scale: float = 0.01):
        super().__init__()
        block = width // n_heads
        self.n_heads, self.block_width = n_heads, block
        self.recurrent_param = nn.Parameter(torch.empty(width))
        self.input_gate_weight = nn.Parameter(torch.empty(n_heads, block, block))
        self.input_gate_bias = nn.Parameter(torch.empty(n_heads, block))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(n_heads, block, block))
        self.recurrent_gate_bias = nn.Parameter(torch.empty(n_heads, block))
        self.reset_parameters(w_init_variance_scale)

    @torch.no_grad()
    def reset_parameters(self, w_init_variance_scale: float = 0.01) -> None:
        std = math.sqrt(w_init_variance_scale / self.block_width)
        nn.init.normal_(self.input_gate_weight, std=std)
        nn.init.normal_(self.recurrent_gate_weight, std=std)
        nn.init.zeros_(self.input_gate_bias)
        nn.init.zeros_(self.recurrent_gate_bias)
        # a^2 ~ U[0.9^2, 0.999^2], stored as recurrent_param = softplus^-1(-log a) = log(1/a - 1)
        a = torch.empty_like(self.recurrent_param).uniform_(0.9 ** 2 + 1e-8, 0.999 ** 2 + 1e-8).sqrt()
        self.recurrent_param.copy_(torch.log(1.0 / a - 1.0))

    def parameters_in_order(self):
        return (self.recurrent_param, self.input_gate_weight, self.input_gate_bias, self.recurrent_gate_weight,
                self.recurrent_gate_bias)


@register_mixer("hawk")
class Hawk(Mixer):
    """Griffin / Hawk recurrent block (RG-LRU mixer); see the module docstring for the equations.

    Args:
        d_model: model width D.
        lru_width: W, the recurrence width; None = d_model.
        n_heads: blocks of the block-diagonal gate weights (must divide W).
        conv_width: width of the causal depthwise convolution.
        w_init_variance_scale: variance scale of the conv and gate initialisation (RecurrentGemma's 0.01).
        backend: how the RG-LRU runs ("auto", "chunked", "associative", "reference"); execution only, not
            part of a saved configuration. ``last_backend`` names the one that ran.

    Shapes: forward x (batch, L, d_model) -> (batch, L, d_model); step x_t (batch, d_model).
    """

    pattern_letter = "H"
    contract_config = dict(lru_width=12, n_heads=3)
    contract_backends = ("chunked", "associative", "reference")
    ssm_parameter_names = ("rg_lru.recurrent_param",)
    depth_scaled = ("linear_out.weight",)
    supports_packing = True
    main_op = "rglru"

    def __init__(self, d_model: int, lru_width: Optional[int] = None, n_heads: int = 8, conv_width: int = 4,
                 w_init_variance_scale: float = 0.01, backend: Optional[str] = "auto"):
        super().__init__(d_model)
        width = d_model if lru_width is None else check_positive_int("lru_width", lru_width)
        check_positive_int("n_heads", n_heads)
        if width % n_heads:
            raise ValueError(f"n_heads must divide lru_width; got lru_width={width}, n_heads={n_heads}")
        self.conv_width = check_positive_int("conv_width", conv_width)
        if isinstance(w_init_variance_scale, bool) or not isinstance(w_init_variance_scale, (int, float)) \
                or not w_init_variance_scale > 0:
            raise ValueError(f"w_init_variance_scale must be a positive number; got {w_init_variance_scale!r}")
        if backend is not None:
            check_choice("backend", backend, RGLRU_BACKENDS)
        self.backend = backend
        self.lru_width, self.n_heads = width, n_heads

        self.linear_y = nn.Linear(d_model, width)
        self.linear_x = nn.Linear(d_model, width)
        self.linear_out = nn.Linear(width, d_model)
        self.conv_1d = nn.Conv1d(width, width, kernel_size=conv_width, groups=width, padding=conv_width - 1)
        self.rg_lru = RGLRU(width, n_heads, w_init_variance_scale)
        self._init_weights(w_init_variance_scale)

    @torch.no_grad()
    def _init_weights(self, w_init_variance_scale: float) -> None:
        """RecurrentGemma's initialisation (module docstring); the RG-LRU initialises itself."""
        for linear in (self.linear_x, self.linear_y):
            nn.init.normal_(linear.weight, std=math.sqrt(1.0 / self.d_model))
            nn.init.zeros_(linear.bias)
        # variance 4 / W before the model's 1 / (2 n_layers) depth scaling: RecurrentGemma's (2 / n_layers) / W
        nn.init.normal_(self.linear_out.weight, std=math.sqrt(4.0 / self.lru_width))
        nn.init.zeros_(self.linear_out.bias)
        nn.init.normal_(self.conv_1d.weight, std=math.sqrt(w_init_variance_scale / self.conv_width))
        nn.init.zeros_(self.conv_1d.bias)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, lru_width={self.lru_width}, n_heads={self.n_heads}, "
                f"conv_width={self.conv_width}, backend={self.backend!r}")

    def state_spec(self, batch_size: int):
        return {"conv": ((batch_size, self.lru_width, self.conv_width - 1), "cache"),
                "h": ((batch_size, self.lru_width), "real"),
                "pos": ((batch_size,), "index")}

    def _conv_parameters(self):
        """Weight (W, 1, width) and bias (W,) of the convolution in the core's dtype (float32 for a half model)."""
        return to_core_dtype(self.conv_1d.weight), to_core_dtype(self.conv_1d.bias)

    def _rglru_parameters(self):
        """The RG-LRU's parameters in the core's dtype, in the order :func:`ssmkit.ops.rglru.rglru` takes them."""
        return tuple(to_core_dtype(p) for p in self.rg_lru.parameters_in_order())

    # ----------------------------------------------------------------------------------------------
    def _forward(self, x, state, return_state, seq_idx=None):
        batch, length, _ = x.shape
        conv_state = h0 = None
        pos = torch.zeros(batch, dtype=torch.int64, device=x.device)
        if state is not None:
            conv_state, h0, pos = (state[self.state_key(k)] for k in ("conv", "h", "pos"))
        y_branch = F.gelu(self.linear_y(x), approximate="tanh")                 # (B, L, W)
        u = self.linear_x(x)                                                     # (B, L, W)
        # a_t = 0 where a document starts: at the first token of a fresh state, and at packed boundaries
        reset = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
        reset[:, 0] = pos == 0
        if seq_idx is not None:
            reset[:, 1:] |= seq_idx[:, 1:] != seq_idx[:, :-1]
        with ssm_core_precision(x):  # conv and recurrence in float32 under autocast and in a half-precision model
            conv_in = to_core_dtype(u).transpose(1, 2)                           # (B, W, L) view
            out = causal_conv1d(conv_in, *self._conv_parameters(),
                                None if conv_state is None else to_core_dtype(conv_state), seq_idx,
                                return_final_state=return_state)
            u, conv_final = out if return_state else (out, None)
            h, h_final = rglru(u.transpose(1, 2), *self._rglru_parameters(), initial_state=h0, reset=reset,
                               return_final_state=True)
        out = self.linear_out(h.to(y_branch.dtype) * y_branch)                  # (B, L, d_model)
        if not return_state:
            return out, None
        if seq_idx is None:
            pos_final = pos + length
        else:  # tokens of the last sequence of each row (plus pos if it is also the first)
            boundary = torch.cat([torch.zeros_like(reset[:, :1]), seq_idx[:, 1:] != seq_idx[:, :-1]], 1)
            steps = torch.arange(length, device=x.device).expand(batch, length)
            last_start = torch.where(boundary, steps, torch.zeros_like(steps)).amax(1)
            pos_final = torch.where(boundary.any(1), length - last_start, pos + length)
        # the conv window holds inputs already rounded to x's dtype: exact in a "cache" of that dtype
        return out, {self.state_key("conv"): conv_final.to(state_dtype(x.dtype, "cache")),
                     self.state_key("h"): h_final.to(state_dtype(x.dtype)), self.state_key("pos"): pos_final}

    def _step(self, x_t: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        pos = state[self.state_key("pos")]
        y_branch = F.gelu(self.linear_y(x_t), approximate="tanh")               # (B, W)
        with ssm_core_precision(x_t):  # as in forward: conv and recurrence in float32 under autocast / half
            u, conv_state = causal_conv1d_update(to_core_dtype(self.linear_x(x_t)),
                                                 to_core_dtype(state[self.state_key("conv")]),
                                                 *self._conv_parameters())
            h = rglru_step(u, state[self.state_key("h")], *self._rglru_parameters(), reset=pos == 0)
        out = self.linear_out(h.to(y_branch.dtype) * y_branch)
        return out, {self.state_key("conv"): conv_state.to(state_dtype(x_t.dtype, "cache")), self.state_key("h"): h,
                     self.state_key("pos"): pos + 1}
