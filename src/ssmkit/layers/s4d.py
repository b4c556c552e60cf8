"""S4D: diagonal structured state space layer (Gu, Gupta, Goel, Re 2022, "On the Parameterization and
Initialization of Diagonal State Space Models").

Each of the H = d_model channels is its own single-input single-output SSM with a diagonal complex A of
N2 = d_state / 2 modes (each stands for itself and its conjugate, so the real state has d_state entries):

    h_k = Abar h_{k-1} + Bbar u_k,     s_k = 2 Re(C h_k) + D u_k,     y_k = GLU(W GELU(s_k))

run in parallel as an FFT convolution with the Vandermonde kernel K_k = 2 Re(C Bbar Abar^k) (S4D eq. 5), or
one token at a time (``step``). Both take (Abar, Bbar, C) from :meth:`S4D.discrete_parameters` and nothing
else, so the two forms cannot drift apart.

Glossary (code name: paper symbol):

================  ======================================================================================
``d_model``       H, number of channels
``d_state``       N, real state size per channel; N2 = N / 2 complex modes are stored
``log_dt``        log Delta (H,), the step of each channel
``rate``          multiplies Delta: dt_eff = exp(log_dt) * rate (sampling-rate change without retraining)
``A_log_re``      log(-Re A) (H, N2), so Re A = -exp(A_log_re) < 0 and the system stays stable
``A_im``          Im A (H, N2)
``B``, ``C``      B, C (H, N2) complex, stored as real views (H, N2, 2); ``C_backward`` the look-ahead C
``D``             D (H,), skip connection
``dtA``           log Abar (H, N2): dt A for ZOH, log of the bilinear Abar otherwise
================  ======================================================================================
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from .._checks import check_choice, check_positive_int
from ..ops.discretize import discretize_diag
from ..ops.fftconv import fft_conv
from ..ops.hippo_operators import S4D_INITS, s4d_init
from ..ops.lti_kernels import final_state, initial_state_response, kernel_vandermonde
from .base import ConvolutionalSSM, State, ssm_core_precision, to_core_dtype
from .registry import register_mixer

DISCRETIZATIONS = ("zoh", "bilinear")


class DiscreteS4D(NamedTuple):
    """The discrete system both passes use. All complex; C is (H, N2), or (2, H, N2) when bidirectional
    (look-back C first, look-ahead C second)."""

    dtA: torch.Tensor  # (H, N2) log Abar
    Abar: torch.Tensor  # (H, N2)
    Bbar: torch.Tensor  # (H, N2)
    C: torch.Tensor


@register_mixer("s4d")
class S4D(ConvolutionalSSM):
    """S4D layer: H diagonal SSMs, GELU, then a d_model -> 2 d_model linear map with GLU.

    Args:
        d_model: H, channels.
        d_state: N, real state size per channel (even, >= 2); N/2 complex modes are stored.
        init: diagonal A initialisation, one of ``lin``, ``inv``, ``real``, ``legs`` (S4D-Lin, -Inv, -Real,
            -LegS; :func:`ssmkit.ops.hippo_operators.s4d_init`).
        dt_min, dt_max: range of the log-uniform initial step.
        discretization: ``zoh`` (Abar = exp(dt A)) or ``bilinear``.
        bidirectional: add a look-ahead kernel with its own C (non-causal; no recurrent form).
        rate: step multiplier, also settable later (``layer.rate = 2.0`` when each step covers twice the time).
    """

    pattern_letter = "S"
    contract_config = dict(d_state=8)
    ssm_parameter_names = ("log_dt", "A_log_re", "A_im", "B")  # diagonal A, B, Delta

    def __init__(self, d_model: int, d_state: int = 64, init: str = "legs", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, discretization: str = "zoh", bidirectional: bool = False,
                 rate: float = 1.0):
        super().__init__(d_model)
        check_positive_int("d_state", d_state, minimum=2)
        if d_state % 2:
            raise ValueError(f"d_state must be even (conjugate pairs of modes); got {d_state}")
        check_choice("init", init, S4D_INITS)
        check_choice("discretization", discretization, DISCRETIZATIONS)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool; got {type(bidirectional).__name__}")
        if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float))) or not 0 < dt_min < dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min < dt_max; got dt_min={dt_min!r}, "
                             f"dt_max={dt_max!r}")
        H, N2 = d_model, d_state // 2
        self.d_state, self.init, self.discretization, self.bidirectional = d_state, init, discretization, bidirectional
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        self.rate = rate

        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        A = s4d_init(init, d_state).expand(H, N2)
        self.log_dt = nn.Parameter(log_dt)  # first parameter: real, so init_state reads the dtype from it
        self.A_log_re = nn.Parameter(torch.log(-A.real).float())
        self.A_im = nn.Parameter(A.imag.float().clone())
        self.B = nn.Parameter(torch.view_as_real(torch.ones(H, N2, dtype=torch.complex64)).clone())
        # S4D: C ~ complex normal with variance 0.5 in each of the real and imaginary parts
        self.C = nn.Parameter(torch.randn(H, N2, 2) * math.sqrt(0.5))
        self.C_backward = nn.Parameter(torch.randn(H, N2, 2) * math.sqrt(0.5)) if bidirectional else None
        self.D = nn.Parameter(torch.randn(H))
        self.output_linear = nn.Linear(d_model, 2 * d_model)

    # ----------------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, init={self.init!r}, "
                f"discretization={self.discretization!r}, bidirectional={self.bidirectional}, rate={self.rate}")

    def discrete_parameters(self) -> DiscreteS4D:
        """(dtA = log Abar, Abar, Bbar, C) from the parameters, at the current ``rate``; the one source of
        the discrete system for the convolution and the recurrence. Computed in float32 (complex64) for a
        half-precision model (there is no complex bfloat16, and powers of Abar need the precision)."""
        dt = torch.exp(to_core_dtype(self.log_dt)) * self.rate  # (H,)
        A = torch.complex(-torch.exp(to_core_dtype(self.A_log_re)), to_core_dtype(self.A_im))  # (H, N2)
        B = torch.view_as_complex(to_core_dtype(self.B))
        Abar, Bbar = discretize_diag(A, B, dt, self.discretization)
        # ZOH: exp(dtA) is Abar exactly (the same product discretize_diag takes the exponential of)
        dtA = dt[:, None] * A if self.discretization == "zoh" else torch.log(Abar)
        C = torch.view_as_complex(to_core_dtype(self.C))
        if self.bidirectional:
            C = torch.stack([C, torch.view_as_complex(to_core_dtype(self.C_backward))])
        return DiscreteS4D(dtA, Abar, Bbar, C)

    # ----------------------------------------------------------------------------------------------
    def state_spec(self, batch_size: int):
        return {"h": ((batch_size, self.d_model, self.d_state // 2), "complex")}

    def _forward(self, x: torch.Tensor, state: Optional[State], return_state: bool):
        if state is not None:
            self._refuse_recurrence("an initial state")
        if return_state:
            self._refuse_recurrence("return_state")
        with ssm_core_precision(x):  # kernel and FFT convolution in float32 under autocast
            u = to_core_dtype(x).transpose(1, 2)  # (B, H, L)
            L = u.shape[-1]
            p = self.discrete_parameters()
            K = kernel_vandermonde(p.dtA, p.Bbar, p.C, L)  # (H, L), or (2, H, L) bidirectional
            s = fft_conv(u, K, D=to_core_dtype(self.D), bidirectional=self.bidirectional)  # (B, H, L)
            h0 = state[self.state_key("h")] if state is not None else None
            if h0 is not None:
                s = s + initial_state_response(p.dtA, p.C, h0, L)
            new_state = {self.state_key("h"): final_state(p.dtA, p.Bbar, u, h0)} if return_state else None
        return self._output(s.transpose(1, 2).to(x.dtype)), new_state

    def _step(self, x_t: torch.Tensor, state: State):
        p = self.discrete_parameters()
        u = to_core_dtype(x_t)  # (B, H)
        h = p.Abar * state[self.state_key("h")] + p.Bbar * u[..., None]  # (B, H, N2)
        s = 2 * (p.C * h).sum(-1).real + to_core_dtype(self.D) * u  # (B, H)
        return self._output(s.to(x_t.dtype)), {self.state_key("h"): h}
