"""Liquid-S4: S4 whose kernel gains the liquid (input-correlation) terms of a linearised liquid time-constant
network (Hasani, Lechner, Wang, Chahine, Amini, Rus 2023, "Liquid Structural State-Space Models", ICLR 2023,
arXiv 2209.12951, Sec. 3).

The paper starts from the linearised LTC system x'(t) = [A + B u(t)] x(t) + B u(t), y = C x, whose
discretisation x_k = (Abar + Bbar u_k) x_{k-1} + Bbar u_k unrolls into the S4 convolution plus terms in
products of inputs weighted by powers of Bbar: y = Kbar * u + Kbar_liquid * u_correlations. Per channel
(H = d_model channels, N2 = d_state / 2 complex modes, conjugate pairs as in S4D):

    c^(q)_k = u_k u_{k-1} ... u_{k-q+1}                        order-q input correlation, q = 2..p
    "kb":    h_k = Abar h_{k-1} + Bbar u_k + sum_q Bbar^q c^(q)_k,   s_k = 2 Re(C . h_k) + D u_k
    "polyb": h_k = Abar h_{k-1} + Bbar u_k,   s_k = 2 Re(C . h_k) + D u_k + sum_q 2 Re(C . Bbar^q) c^(q)_k
    y_k = GLU(W GELU(s_k))                                      the S4 layer's output map

The "kb" kernel is Kbar_liquid^(q)_j = C Abar^j Bbar^q (the paper's liquid kernel); "polyb" (the PB
kernel, the authors' recommended default) keeps only the polynomial in Bbar, C Bbar^q, at lag 0. The
parallel pass (:func:`ssmkit.ops.liquid_s4.liquid_s4_fft`) is Vandermonde kernels + FFT convolutions; the
step is the recurrence above (:func:`ssmkit.ops.liquid_s4.liquid_s4_step`); both read
:meth:`S4D.discrete_parameters`, so they cannot drift apart. The differences from the authors' code (their
correlation signal is reversed in time, so their layer is not causal; their correlations at order 3 and
up are built differently) are listed in :mod:`ssmkit.ops.liquid_s4.reference`.

The SSM is S4D's diagonal system (S4D-LegS initialisation by default: the diagonal part of S4's NPLR HiPPO-LegS
matrix), not S4's DPLR one: the liquid Bbar^q are elementwise powers in the modal basis, which is where the
authors also take them (the diagonal part of their DPLR discretisation).

Glossary (code name: paper symbol); the S4D parameters (``log_dt``, ``A_log_re``, ``A_im``, ``B``, ``C``,
``D``) are as in :mod:`ssmkit.layers.s4d`:

==================  =========================================================================================
``liquid_degree``   p, the order of the highest input correlation (>= 2; the authors' ``liquid_degree``)
``liquid_kernel``   "polyb" (PB kernel) or "kb" (KB kernel), the authors' ``liquid_kernel`` names
==================  =========================================================================================

**State** ``{"liquid_s4.h": (batch, H, N2) complex, "liquid_s4.inputs": (batch, H, p - 1)}``: the modal state
and the last p - 1 inputs (oldest first), which the correlations of the next p - 1 tokens read. Constant size.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_choice, check_positive_int
from ..ops.liquid_s4 import LIQUID_KERNELS, liquid_s4_fft, liquid_s4_step
from .base import State, ssm_core_precision, state_dtype, to_core_dtype
from .registry import register_mixer
from .s4d import S4D


@register_mixer("liquid_s4")
class LiquidS4(S4D):
    """Liquid-S4 layer: S4D's diagonal SSMs with the liquid terms of order up to ``liquid_degree``.

    Args:
        d_model: H, channels.
        d_state: N, real state size per channel (even); N/2 complex modes are stored.
        liquid_degree: p >= 2, the highest order of the input correlations.
        liquid_kernel: "polyb" (PB kernel) or "kb" (KB kernel); see the module docstring.
        init, dt_min, dt_max, discretization, rate: as :class:`~ssmkit.layers.s4d.S4D` (no ``bidirectional``:
            the liquid terms are causal products of past inputs).

    Shapes: forward x (batch, L, d_model) -> (batch, L, d_model); step x_t (batch, d_model).
    """

    pattern_letter = "U"
    contract_config = dict(d_state=8, liquid_degree=3, liquid_kernel="kb")

    def __init__(self, d_model: int, d_state: int = 64, liquid_degree: int = 2, liquid_kernel: str = "polyb",
                 init: str = "legs", dt_min: float = 1e-3, dt_max: float = 1e-1, discretization: str = "zoh",
                 rate: float = 1.0):
        check_positive_int("liquid_degree", liquid_degree, minimum=2)
        check_choice("liquid_kernel", liquid_kernel, LIQUID_KERNELS)
        super().__init__(d_model, d_state=d_state, init=init, dt_min=dt_min, dt_max=dt_max,
                         discretization=discretization, bidirectional=False, rate=rate)
        self.liquid_degree, self.liquid_kernel = liquid_degree, liquid_kernel

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, liquid_degree={self.liquid_degree}, "
                f"liquid_kernel={self.liquid_kernel!r}")

    def state_spec(self, batch_size: int):
        return {"h": ((batch_size, self.d_model, self.d_state // 2), "complex"),
                "inputs": ((batch_size, self.d_model, self.liquid_degree - 1), "cache")}

    def _forward(self, x: torch.Tensor, state: Optional[State], return_state: bool):
        h0 = history = None
        if state is not None:
            h0 = state[self.state_key("h")]
            history = to_core_dtype(state[self.state_key("inputs")])
        with ssm_core_precision(x):  # kernels and FFT convolutions in float32 under autocast
            u = to_core_dtype(x).transpose(1, 2)                                  # (B, H, L)
            p = self.discrete_parameters()
            out = liquid_s4_fft(u, p.dtA, p.Bbar, p.C, to_core_dtype(self.D), self.liquid_degree,
                                self.liquid_kernel, h0=h0, history=history, return_state=return_state)
        s, h, history = out if return_state else (out, None, None)
        y = self._output(s.transpose(1, 2).to(x.dtype))
        if not return_state:
            return y, None
        # the kept inputs are x's own values (exact in x's dtype): a cache
        return y, {self.state_key("h"): h, self.state_key("inputs"): history.to(state_dtype(x.dtype, "cache"))}

    def _step(self, x_t: torch.Tensor, state: State):
        p = self.discrete_parameters()
        u = to_core_dtype(x_t)                                                    # (B, H)
        s, h, history = liquid_s4_step(u, state[self.state_key("h")], to_core_dtype(state[self.state_key("inputs")]),
                                       p.dtA, p.Bbar, p.C, to_core_dtype(self.D), self.liquid_degree,
                                       self.liquid_kernel)
        return self._output(s.to(x_t.dtype)), {self.state_key("h"): h,
                                               self.state_key("inputs"): history.to(state_dtype(x_t.dtype, "cache"))}
