"""S5: one multi-input, multi-output diagonal SSM per layer (Smith, Warrington, Linderman, ICLR 2023).

Where S4 runs ``H`` independent single-input SSMs, S5 runs one SSM with ``H`` inputs, ``P`` states and
``H`` outputs. Its state matrix is diagonalised once at initialisation (the eigenvalues of HiPPO-N, the
normal part of HiPPO-LegS), so the recurrence is elementwise and runs as a parallel scan
(:func:`ssmkit.ops.scan.linear_recurrence`).

Continuous system, in the eigenbasis ``V`` of the state matrix (S5, diagonalised dynamics):
``x'(t) = Lambda x(t) + B~ u(t)``, ``y(t) = C~ x(t) + D u(t)``, with ``B~ = V^{-1} B`` and ``C~ = C V``.
Discretised per state with its own step ``Delta_p = exp(log_dt_p) * rate`` (ZOH or bilinear, as in S5):
``x_k = Lambda_bar x_{k-1} + B_bar u_k``, ``y_k = Re(C~ x_k) + D u_k`` (``2 Re`` with conjugate symmetry).

Glossary (code name = S5 symbol):

================  ==========================================================================================
``d_model``       H, the number of input and output features
``d_state``       P, the number of states of the real system
``blocks``        J, the number of HiPPO-N blocks on the diagonal of the initial state matrix
``n_modes``       the complex states actually stored: P/2 with ``conj_sym`` (one of each conjugate pair), else P
``Lambda``        the diagonal state matrix, ``Lambda_re + i Lambda_im`` (n_modes,)
``B_re, B_im``    B~ (n_modes, H), the input matrix in the eigenbasis
``C_re, C_im``    C~ (H, n_modes), the output matrix in the eigenbasis (``C_rev_*``: the backward scan's C~)
``D``             (H,) feedthrough
``log_dt``        log Delta (n_modes,), one timescale per state
``rate``          S5's ``step_rescale``: multiplies every Delta (e.g. 0.5 for data sampled twice as densely)
``h``             the state x_k (batch, n_modes), complex
================  ==========================================================================================

The layer output follows S5's ``SequenceLayer``: the SSM output ``z = y`` goes through an activation,
by default ``half_glu1`` = ``GELU(z) * sigmoid(W GELU(z))`` (a weighted sigmoid gated unit; ``gelu``,
``half_glu2``, ``full_glu`` and ``none`` are the alternatives, see :data:`ACTIVATIONS`). The residual
connection and the norm of that ``SequenceLayer`` are the block's job in ssmkit (``models/``), not the
mixer's, so they are not applied here.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int
from ..ops.discretize import discretize_diag
from ..ops.hippo_operators import conjugate_half, nplr_legs
from ..ops.scan import linear_recurrence
from .base import Mixer, RateMixin, State, ssm_core_precision, to_core_dtype
from .registry import register_mixer

DISCRETIZATIONS = ("zoh", "bilinear")

#: activation applied to the SSM output z (S5 code's names):
#: gelu: GELU(z); half_glu1: g * sigmoid(W g) with g = GELU(z); half_glu2: z * sigmoid(W g);
#: full_glu: (W1 g) * sigmoid(W2 g); none: z (the linear SSM alone)
ACTIVATIONS = ("gelu", "half_glu1", "half_glu2", "full_glu", "none")


def _lecun_normal_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Truncated normal (at 2 std) scaled to variance 1/fan_in, as JAX's ``lecun_normal``."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


def hippo_n_diagonal(d_state: int, blocks: int, conj_sym: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the block-diagonal HiPPO-N initial state matrix (S5's initialisation).

    Each of the ``blocks`` diagonal blocks is HiPPO-N of size ``d_state / blocks`` (the normal part
    ``A + P P^T`` of HiPPO-LegS, :func:`ssmkit.ops.hippo_operators.nplr_legs`), diagonalised as ``V Lambda V^*``.
    With ``conj_sym`` only one eigenvalue of each conjugate pair is kept (:func:`~ssmkit.ops.hippo_operators.conjugate_half`).

    Returns:
        Lambda (n_modes,) complex128 and V (d_state, n_modes) complex128 (block diagonal; its columns are
        orthonormal, so ``V^*`` is the inverse used for ``B~ = V^{-1} B``).
    """
    size = d_state // blocks
    nplr = nplr_legs(size)
    if conj_sym:
        nplr = conjugate_half(nplr)
    Lambda = nplr.Lambda.repeat(blocks)
    V = torch.block_diag(*([nplr.V] * blocks))
    return Lambda, V


@register_mixer("s5")
class S5(RateMixin, Mixer):
    """The S5 layer: a MIMO diagonal SSM (parallel scan) followed by S5's output activation.

    Args:
        d_model: H, input and output features.
        d_state: P, states of the real system (``conj_sym`` stores P/2 complex modes).
        blocks: J, HiPPO-N blocks of size P/J on the initial diagonal (P/J even with ``conj_sym``).
        dt_min, dt_max: range of the log-uniform initial timescales Delta.
        discretization: ``"zoh"`` or ``"bilinear"`` (:func:`ssmkit.ops.discretize.discretize_diag`).
        conj_sym: keep one mode of each conjugate pair and read out ``2 Re(C~ h)`` (S5's conjugate symmetry).
        bidirectional: add a scan backwards in time with its own C~ (non-causal; no state or ``step``).
        rate: multiplies every step, ``Delta = exp(log_dt) * rate``; a settable attribute too.
        activation: one of :data:`ACTIVATIONS`, applied to the SSM output (default: S5's ``half_glu1``).
        clip_eigs: clamp Re(Lambda) <= -1e-4 when discretising (S5's option for unbounded lengths).

    Execution (not architecture): ``backend`` (attribute, one of :data:`ssmkit.ops.scan.BACKENDS`, or None
    for the :func:`ssmkit.ops.use_backend` context, else "associative") picks the scan used by ``forward``;
    all give the same numbers.
    """

    pattern_letter = "5"
    contract_config = dict(d_state=8)
    contract_backends = ("associative", "chunked")
    ssm_parameter_names = ("log_dt", "Lambda_re", "Lambda_im", "B_re", "B_im")  # diagonal Lambda, B~, Delta
    main_op = "linear_recurrence"

    def __init__(self, d_model: int, d_state: int = 64, blocks: int = 1, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, discretization: str = "zoh", conj_sym: bool = True,
                 bidirectional: bool = False, rate: float = 1.0, activation: str = "half_glu1",
                 clip_eigs: bool = False):
        super().__init__(d_model)
        check_positive_int("d_state", d_state)
        check_positive_int("blocks", blocks)
        if d_state % blocks:
            raise ValueError(f"d_state (P={d_state}) must be divisible by blocks (J={blocks}); "
                             f"got P mod J = {d_state % blocks}")
        if conj_sym and (d_state // blocks) % 2:
            raise ValueError(f"conj_sym=True needs an even block size d_state / blocks; got {d_state} / {blocks} "
                             f"= {d_state // blocks} (use an even size or conj_sym=False)")
        if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float)) and 0 < dt_min <= dt_max):
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; got dt_min={dt_min}, "
                             f"dt_max={dt_max}")
        self.discretization = check_choice("discretization", discretization, DISCRETIZATIONS)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.d_state, self.blocks = d_state, blocks
        self.conj_sym, self.bidirectional, self.clip_eigs = bool(conj_sym), bool(bidirectional), bool(clip_eigs)
        self.rate = rate
        H = d_model

        Lambda, V = hippo_n_diagonal(d_state, blocks, self.conj_sym)
        self.n_modes = n = Lambda.shape[0]
        dtype = torch.get_default_dtype()
        self.Lambda_re = nn.Parameter(Lambda.real.to(dtype))
        self.Lambda_im = nn.Parameter(Lambda.imag.to(dtype))
        # B~ = V^{-1} B from a real lecun-normal B (P, H); V has orthonormal columns so V^{-1} = V^*
        B = _lecun_normal_(torch.empty(d_state, H, dtype=torch.float64), fan_in=H)
        B_tilde = V.conj().T @ B.to(torch.complex128)  # (n, H)
        self.B_re = nn.Parameter(B_tilde.real.to(dtype))
        self.B_im = nn.Parameter(B_tilde.imag.to(dtype))
        C_tilde = self._init_C_tilde(V)  # (H, n)
        self.C_re = nn.Parameter(C_tilde.real.to(dtype))
        self.C_im = nn.Parameter(C_tilde.imag.to(dtype))
        if self.bidirectional:
            C_tilde = self._init_C_tilde(V)
            self.C_rev_re = nn.Parameter(C_tilde.real.to(dtype))
            self.C_rev_im = nn.Parameter(C_tilde.imag.to(dtype))
        self.D = nn.Parameter(torch.randn(H, dtype=dtype))
        log_dt = torch.rand(n, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt.to(dtype))

        if self.activation == "full_glu":
            self.out_value = nn.Linear(H, H)
        if self.activation in ("half_glu1", "half_glu2", "full_glu"):
            self.out_gate = nn.Linear(H, H)

    def _init_C_tilde(self, V: torch.Tensor) -> torch.Tensor:
        """C~ = C V from a real lecun-normal C (H, P)."""
        C = _lecun_normal_(torch.empty(self.d_model, self.d_state, dtype=torch.float64), fan_in=self.d_state)
        return C.to(torch.complex128) @ V

    # ----------------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, blocks={self.blocks}, "
                f"n_modes={self.n_modes}, discretization={self.discretization!r}, conj_sym={self.conj_sym}, "
                f"bidirectional={self.bidirectional}, rate={self.rate}, activation={self.activation!r}")

    def state_spec(self, batch_size: int) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
        return {"h": ((batch_size, self.n_modes), "complex")}

    # ----------------------------------------------------------------------------------------------
    # The discretised system: shared by the parallel forward and the recurrent step
    # ----------------------------------------------------------------------------------------------
    def discretized(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(Lambda_bar (n_modes,), B_bar (n_modes, H)), complex, with Delta = exp(log_dt) * rate."""
        Lambda_re = to_core_dtype(self.Lambda_re)  # float32 (complex64) for a half-precision model
        Lambda_re = Lambda_re.clamp(max=-1e-4) if self.clip_eigs else Lambda_re
        Lambda = torch.complex(Lambda_re, to_core_dtype(self.Lambda_im))
        B_tilde = torch.complex(to_core_dtype(self.B_re), to_core_dtype(self.B_im))
        dt = torch.exp(to_core_dtype(self.log_dt)) * self.rate
        # every state has its own step: the state index is a batch dimension of a 1-state system
        Lambda_bar, B_bar = discretize_diag(Lambda[:, None], B_tilde, dt, self.discretization)
        return Lambda_bar[:, 0], B_bar

    def _read_out(self, h: torch.Tensor, C_re: torch.Tensor, C_im: torch.Tensor) -> torch.Tensor:
        """Re(C~ h) (doubled with conjugate symmetry): h (..., n_modes) complex -> (..., H) real, in h's precision."""
        y = h.real @ to_core_dtype(C_re).T - h.imag @ to_core_dtype(C_im).T
        return 2 * y if self.conj_sym else y

    @staticmethod
    def _project_input(u: torch.Tensor, B_bar: torch.Tensor) -> torch.Tensor:
        """B_bar u for real u (..., H) -> (..., n_modes) complex, as two real matmuls."""
        return torch.complex(u @ B_bar.real.T, u @ B_bar.imag.T)

    def _activate(self, z: torch.Tensor) -> torch.Tensor:
        if self.activation == "none":
            return z
        g = F.gelu(z)
        if self.activation == "gelu":
            return g
        if self.activation == "half_glu1":
            return g * torch.sigmoid(self.out_gate(g))
        if self.activation == "half_glu2":
            return z * torch.sigmoid(self.out_gate(g))
        return self.out_value(g) * torch.sigmoid(self.out_gate(g))  # full_glu

    # ----------------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, state: Optional[State], return_state: bool):
        if self.bidirectional and (state is not None or return_state):
            raise ValueError("S5 with bidirectional=True reads the future, so it has no recurrent state: "
                             "state and return_state are not available (use bidirectional=False)")
        with ssm_core_precision(x):  # the complex scan in float32 under autocast
            u = to_core_dtype(x)
            Lambda_bar, B_bar = self.discretized()
            Bu = self._project_input(u, B_bar)  # (B, L, n)
            h0 = None if state is None else state[self.state_key("h")]
            h = linear_recurrence(Lambda_bar, Bu, h0, dim=1)  # (B, L, n)
            y = self._read_out(h, self.C_re, self.C_im)  # (B, L, H)
            if self.bidirectional:
                h_rev = linear_recurrence(Lambda_bar, Bu, None, dim=1, reverse=True)
                y = y + self._read_out(h_rev, self.C_rev_re, self.C_rev_im)
            y = y + to_core_dtype(self.D) * u
        y = self._activate(y.to(x.dtype))
        return y, ({self.state_key("h"): h[:, -1]} if return_state else None)

    def _step(self, x_t: torch.Tensor, state: State):
        if self.bidirectional:
            raise ValueError("S5 with bidirectional=True reads the future and cannot run step by step "
                             "(use bidirectional=False)")
        Lambda_bar, B_bar = self.discretized()
        u = to_core_dtype(x_t)  # (B, H)
        h = Lambda_bar * state[self.state_key("h")] + self._project_input(u, B_bar)  # (B, n)
        y = self._activate((self._read_out(h, self.C_re, self.C_im) + to_core_dtype(self.D) * u).to(x_t.dtype))
        return y, {self.state_key("h"): h}
