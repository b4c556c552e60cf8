"""S4: structured state space layer with a diagonal plus low-rank A (Gu, Goel, Re, ICLR 2022, "Efficiently
Modeling Long Sequences with Structured State Spaces").

Each of the H = d_model channels is its own single-input single-output SSM of real state size N = d_state,
initialised from HiPPO-LegS in its normal plus low-rank form (S4 Thm. 1) and discretised by the bilinear rule:

    h_k = dA h_{k-1} + dB u_k,     s_k = C h_k + D u_k,     y_k = GLU(W GELU(s_k))

It runs in parallel as an FFT convolution with the kernel K_k = C dA^k dB computed by S4's Algorithm 1
(:func:`ssmkit.ops.dplr.kernel_dplr`), or one token at a time (``step``) with the dense real matrices
(:func:`ssmkit.ops.dplr.discretize_dplr`). Both start from :meth:`S4.ssm_parameters` and nothing else, so
the two forms cannot drift apart.

Parameters hold M = N / 2 complex modes; the other half are their conjugates (see :mod:`ssmkit.ops.dplr`
for why the conjugate halves are treated explicitly). The state is the real vector of the same system in
real coordinates, (batch, H, N).

Glossary (code name: paper symbol):

======================  ================================================================================
``d_model``             H, number of channels
``d_state``             N, real state size per channel; M = N / 2 complex modes are stored
``rank``                r, rank of the low-rank term P Q^* (Q = P, as in S4)
``log_dt``              log Delta (H,), the step of each channel
``rate``                multiplies Delta: dt_eff = exp(log_dt) * rate
``Lambda_log_neg_re``   log(-Re Lambda) (H, M), so Re Lambda = -exp(...) < 0
``Lambda_im``           Im Lambda (H, M)
``P``                   P (r, H, M) complex, stored as a real view (r, H, M, 2)
``B``, ``C``            B, C (H, M) complex, stored as real views (H, M, 2); ``C_backward`` the look-ahead C
``D``                   D (H,), skip connection
======================  ================================================================================

With Q = P, A = Lambda - P P^* has a negative definite Hermitian part whenever Re Lambda < 0, so every
parameter setting is stable, not only the initial one.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from .._checks import check_positive_int
from ..ops.dplr import DiscreteDPLR, discretize_dplr, dplr_state_input, final_state_dense, kernel_dplr
from ..ops.fftconv import fft_conv
from ..ops.hippo_operators import conjugate_half, nplr_legs
from .base import ConvolutionalSSM, State, to_core_dtype
from .registry import register_mixer


class DPLRParameters(NamedTuple):
    """The continuous DPLR system both passes use (complex, M modes per channel)."""

    Lambda: torch.Tensor  # (H, M)
    P: torch.Tensor  # (r, H, M); Q = P
    B: torch.Tensor  # (H, M)
    C: torch.Tensor  # (H, M), or (2, H, M) when bidirectional (look-back C first, look-ahead C second)
    dt: torch.Tensor  # (H,) effective step, rate included


@register_mixer("s4")
class S4(ConvolutionalSSM):
    """S4 layer: H DPLR SSMs (HiPPO-LegS init, bilinear rule), GELU, then a d_model -> 2 d_model linear map
    with GLU.

    Args:
        d_model: H, channels.
        d_state: N, real state size per channel (even, >= 2); N/2 complex modes are stored.
        dt_min, dt_max: range of the log-uniform initial step.
        rank: rank of the low-rank term (1 for LegS; extra rows start small and random, since P = 0 is a
            stationary point of P P^* and would never train).
        bidirectional: add a look-ahead kernel with its own C (non-causal; no recurrent form).
        rate: step multiplier, also settable later (``layer.rate = 0.5`` when the input is sampled twice as
            densely as in training).
    """

    pattern_letter = "4"
    contract_config = dict(d_state=8)
    ssm_parameter_names = ("log_dt", "Lambda_log_neg_re", "Lambda_im", "P", "B")  # DPLR A = Lambda - P P^*, B, Delta

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 rank: int = 1, bidirectional: bool = False, rate: float = 1.0):
        super().__init__(d_model)
        check_positive_int("d_state", d_state, minimum=2)
        if d_state % 2:
            raise ValueError(f"d_state must be even (conjugate pairs of modes); got {d_state}")
        check_positive_int("rank", rank)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool; got {type(bidirectional).__name__}")
        if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float))) or not 0 < dt_min < dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min < dt_max; got dt_min={dt_min!r}, "
                             f"dt_max={dt_max!r}")
        H, M = d_model, d_state // 2
        self.d_state, self.rank, self.bidirectional = d_state, rank, bidirectional
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        self.rate = rate

        legs = conjugate_half(nplr_legs(d_state))  # shared by all channels at init
        P = legs.P[:, None, :].expand(1, H, M)
        if rank > 1:
            P = torch.cat([P, 1e-3 * torch.randn(rank - 1, H, M, dtype=P.dtype)])
        self.log_dt = nn.Parameter(  # first parameter: real, so init_state reads the dtype from it
            torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.Lambda_log_neg_re = nn.Parameter(torch.log(-legs.Lambda.real).float().expand(H, M).clone())
        self.Lambda_im = nn.Parameter(legs.Lambda.imag.float().expand(H, M).clone())
        self.P = nn.Parameter(torch.view_as_real(P.to(torch.complex64)).clone())
        self.B = nn.Parameter(torch.view_as_real(legs.B.to(torch.complex64)).expand(H, M, 2).clone())
        # C ~ complex normal with variance 0.5 in each of the real and imaginary parts
        self.C = nn.Parameter(torch.randn(H, M, 2) * math.sqrt(0.5))
        self.C_backward = nn.Parameter(torch.randn(H, M, 2) * math.sqrt(0.5)) if bidirectional else None
        self.D = nn.Parameter(torch.randn(H))
        self.output_linear = nn.Linear(d_model, 2 * d_model)

    # ----------------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, rank={self.rank}, "
                f"bidirectional={self.bidirectional}, rate={self.rate}")

    def ssm_parameters(self) -> DPLRParameters:
        """(Lambda, P, B, C, dt) from the parameters, at the current ``rate``: the one source of the system
        for the convolution kernel and the recurrent matrices."""
        dt = torch.exp(to_core_dtype(self.log_dt)) * self.rate  # (H,)
        Lambda = torch.complex(-torch.exp(to_core_dtype(self.Lambda_log_neg_re)), to_core_dtype(self.Lambda_im))
        C = torch.view_as_complex(to_core_dtype(self.C))  # Lambda, C: (H, M)
        if self.bidirectional:
            C = torch.stack([C, torch.view_as_complex(to_core_dtype(self.C_backward))])
        return DPLRParameters(Lambda, torch.view_as_complex(to_core_dtype(self.P)),
                              torch.view_as_complex(to_core_dtype(self.B)), C, dt)

    def discrete_parameters(self) -> DiscreteDPLR:
        """Dense real (dA (H, N, N), dB (H, N), C (H, N)) of the recurrent form.

        Building dA costs a dense solve per channel, far more than one step, so without autograd (decoding)
        the result is kept until a parameter changes: the key holds every parameter's in-place version
        counter, storage and dtype, and the rate, so an optimiser step, ``load_state_dict`` or ``.to()``
        invalidates it. With autograd it is always rebuilt, so gradients reach the parameters.
        """
        if torch.is_grad_enabled():
            return discretize_dplr(*self.ssm_parameters())
        params = (self.log_dt, self.Lambda_log_neg_re, self.Lambda_im, self.P, self.B, self.C)
        key = (self._rate,) + tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        cached = self.__dict__.get("_discrete_cache")
        if cached is None or cached[0] != key:
            cached = (key, discretize_dplr(*self.ssm_parameters()))
            self.__dict__["_discrete_cache"] = cached
        return cached[1]

    def kernel(self, L: int) -> torch.Tensor:
        """The convolution kernel (H, L), or (2, H, L) (look-back, look-ahead) when bidirectional."""
        p = self.ssm_parameters()
        return kernel_dplr(p.Lambda, p.P, p.B, p.C, p.dt, L)

    # ----------------------------------------------------------------------------------------------
    def state_spec(self, batch_size: int):
        return {"h": ((batch_size, self.d_model, self.d_state), "real")}

    def _forward(self, x: torch.Tensor, state: Optional[State], return_state: bool):
        if state is not None:
            self._refuse_recurrence("an initial state")
        if return_state:
            self._refuse_recurrence("return_state")
        u = to_core_dtype(x).transpose(1, 2)  # (B, H, L); float32 in a half-precision model (see base)
        L = u.shape[-1]
        p = self.ssm_parameters()
        h0 = state[self.state_key("h")] if state is not None else None
        B = p.B
        if h0 is not None:
            # one kernel call: row 0 is the input's kernel, rows 1.. the free responses C dA^{k+1} h0
            B = torch.cat([B[None], dplr_state_input(p.Lambda, p.P, h0, p.dt)])
        K = kernel_dplr(p.Lambda, p.P, B, p.C, p.dt, L)  # (H, L), (2, H, L) or (1 + batch, H, L)
        s = fft_conv(u, K[0] if h0 is not None else K, D=to_core_dtype(self.D),
                     bidirectional=self.bidirectional)  # (B, H, L)
        if h0 is not None:
            s = s + K[1:]
        new_state = None
        if return_state:
            d = discretize_dplr(*p)
            new_state = {self.state_key("h"): final_state_dense(d.dA, d.dB, u, h0)}
        return self._output(s.transpose(1, 2).to(x.dtype)), new_state

    def _step(self, x_t: torch.Tensor, state: State):
        d = self.discrete_parameters()
        u = to_core_dtype(x_t)  # (B, H)
        h = (d.dA @ state[self.state_key("h")][..., None])[..., 0] + d.dB * u[..., None]  # (B, H, N)
        s = (d.C * h).sum(-1) + to_core_dtype(self.D) * u  # (B, H)
        return self._output(s.to(x_t.dtype)), {self.state_key("h"): h}
