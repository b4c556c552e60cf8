"""H3: Hungry Hungry Hippos (Fu, Dao, Saab, Thomas, Rudra, Re 2023, ICLR, Sec. 3 and Algorithm 1).

Two SSMs and two multiplicative interactions, built to recall a value seen after a key (associative recall):

    q, k, v = x W_Q, x W_K, x W_V                                         (Sec. 3.1, linear projections)
    kbar    = SSM_shift(k)      A = S (shift matrix), B = e_1: a short causal convolution over the last N k's
    per head h (d = head_dim channels):  kv_t = kbar_t v_t^T  (d x d)      (the outer product of Algorithm 1)
    s       = SSM_diag(kv)      S4D-style diagonal SSM, one per head, applied to every entry of kv
    y_t     = q_t^T s_t  (per head: y_{t, j} = sum_i q_{t, i} s_{t, i, j}),   out = y W_O

The parallel pass runs both SSMs as FFT convolutions (:func:`ssmkit.ops.h3.h3_fft`); ``step`` advances the
shift register and the diagonal state one token (:func:`ssmkit.ops.h3.h3_step`, the specification that
:func:`ssmkit.ops.h3.h3_ref` loops). Both read the systems from :meth:`H3.discrete_parameters` only.

Parameter names and initialisation follow the authors' module ``H3`` (HazyResearch/H3,
``src/models/ssm/h3.py``): ``q_proj``, ``k_proj``, ``v_proj`` and ``output_linear`` (their name for the
output projection) are ``nn.Linear`` with bias; ``ssm_k_D`` and ``D`` are standard normal; the shift SSM
starts at B = e_1 with C uniform in +-1/sqrt(N) (their ``torch.nn.Conv1d``-style init), and B stays
trainable as in their ``SSKernelShift``. The diagonal SSM uses their default measure, S4D-Lin
(A_n = -1/2 + i pi n), log-uniform dt in [dt_min, dt_max], complex normal C and B = 1; its kernel is
parametrised like :class:`ssmkit.layers.S4D` (``log_dt``, ``A_log_re``, ``A_im``, ``B``, ``C`` stored as
real views), not as their ``ssm_k_kernel`` / ``kernel`` sub-modules, so their checkpoints need a key map.

State (keys prefixed ``"h3."``): ``shift`` (batch, d_model, N) the shift register of K (newest tap first);
``kv`` (batch, H, d, d, N/2) complex: the diagonal SSM's state for each entry of each head's outer product.

Glossary (code name: paper symbol):

=================  ===================================================================================
``d_model``        model width (the paper's d)
``head_dim``       d_h, channels per head (1 in most of the paper's models); ``n_heads`` = H = d_model / d_h
``d_state``        N: taps of the shift SSM and real state size of the diagonal SSM (N/2 complex modes)
``ssm_k_B/C/D``    B, C, D of the shift SSM on K (d_model, N), (d_model, N), (d_model,)
``log_dt``         log Delta (H,) of the diagonal SSM
``A_log_re``       log(-Re A) (H, N/2); ``A_im`` Im A (H, N/2)
``B``, ``C``       B, C (H, N/2) complex of the diagonal SSM, stored as real views (H, N/2, 2)
``D``              D (H,), skip term of the diagonal SSM
=================  ===================================================================================
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._checks import check_positive_int
from ..ops.discretize import discretize_diag
from ..ops.h3 import H3System, h3_fft, h3_step
from ..ops.hippo_operators import s4d_init
from .base import Mixer, State, ssm_core_precision, to_core_dtype
from .registry import register_mixer


@register_mixer("h3")
class H3(Mixer):
    """H3 layer (module docstring).

    Args:
        d_model: model width.
        d_state: N, shift-register taps and diagonal state size (even, >= 2). The authors use 64.
        head_dim: channels per head (divides d_model); the state per head is a head_dim x head_dim outer
            product. The authors' default is 1.
        dt_min, dt_max: range of the log-uniform initial step of the diagonal SSM.

    Shapes: forward x (batch, L, d_model) -> (batch, L, d_model); step x_t (batch, d_model).
    """

    pattern_letter = "3"
    contract_config = dict(d_state=4, head_dim=2)
    ssm_parameter_names = ("ssm_k_B", "log_dt", "A_log_re", "A_im", "B")
    depth_scaled = ("output_linear.weight",)

    def __init__(self, d_model: int, d_state: int = 64, head_dim: int = 1, dt_min: float = 1e-3,
                 dt_max: float = 1e-1):
        super().__init__(d_model)
        check_positive_int("d_state", d_state, minimum=2)
        if d_state % 2:
            raise ValueError(f"d_state must be even (conjugate pairs of modes); got {d_state}")
        check_positive_int("head_dim", head_dim)
        if d_model % head_dim:
            raise ValueError(f"head_dim must divide d_model; got head_dim={head_dim}, d_model={d_model}")
        if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float))) or not 0 < dt_min < dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min < dt_max; got dt_min={dt_min!r}, "
                             f"dt_max={dt_max!r}")
        self.d_state, self.head_dim = d_state, head_dim
        self.n_heads = H = d_model // head_dim
        N2 = d_state // 2

        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        # shift SSM on K: B = e_1 (the register holds the last N k's), C like a Conv1d's weight (fan_in N)
        shift_B = torch.zeros(d_model, d_state)
        shift_B[:, 0] = 1.0
        self.ssm_k_B = nn.Parameter(shift_B)
        self.ssm_k_C = nn.Parameter(torch.empty(d_model, d_state).uniform_(-1, 1) / math.sqrt(d_state))
        self.ssm_k_D = nn.Parameter(torch.randn(d_model))
        # diagonal SSM on the K V^T products: S4D-Lin, one SSM per head
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        A = s4d_init("lin", d_state).expand(H, N2)
        self.A_log_re = nn.Parameter(torch.log(-A.real).float())
        self.A_im = nn.Parameter(A.imag.float().clone())
        self.B = nn.Parameter(torch.view_as_real(torch.ones(H, N2, dtype=torch.complex64)).clone())
        self.C = nn.Parameter(torch.view_as_real(torch.randn(H, N2, dtype=torch.complex64)).clone())
        self.D = nn.Parameter(torch.randn(H))
        self.output_linear = nn.Linear(d_model, d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, head_dim={self.head_dim}, n_heads={self.n_heads}"

    def discrete_parameters(self) -> H3System:
        """The discrete shift and diagonal (ZOH) systems; the one source for the FFT pass and the step. Computed
        in float32 (complex64) for a half-precision model: there is no complex bfloat16, and the FFT
        convolutions and the recurrence run in float32 (layers/base.py, Precision)."""
        dt = torch.exp(to_core_dtype(self.log_dt))  # (H,)
        A = torch.complex(-torch.exp(to_core_dtype(self.A_log_re)), to_core_dtype(self.A_im))  # (H, N2)
        _, Bbar = discretize_diag(A, torch.view_as_complex(to_core_dtype(self.B)), dt, "zoh")
        shift_B, shift_C, shift_D = (to_core_dtype(p) for p in (self.ssm_k_B, self.ssm_k_C, self.ssm_k_D))
        C = torch.view_as_complex(to_core_dtype(self.C))
        return H3System(shift_B, shift_C, shift_D, dt[:, None] * A, Bbar, C, to_core_dtype(self.D))

    def state_spec(self, batch_size: int):
        d = self.head_dim
        return {"shift": ((batch_size, self.d_model, self.d_state), "real"),
                "kv": ((batch_size, self.n_heads, d, d, self.d_state // 2), "complex")}

    def _forward(self, x: torch.Tensor, state: Optional[State], return_state: bool):
        q, k, v = (proj(x) for proj in (self.q_proj, self.k_proj, self.v_proj))
        with ssm_core_precision(x):  # kernels and FFTs in float32 under autocast
            q, k, v = (to_core_dtype(t).transpose(1, 2) for t in (q, k, v))  # (B, d_model, L)
            shift0 = kv0 = None
            if state is not None:
                shift0, kv0 = state[self.state_key("shift")], state[self.state_key("kv")]
            y, final = h3_fft(q, k, v, self.discrete_parameters(), self.head_dim, shift0, kv0, return_state)
        new_state = None
        if return_state:
            new_state = {self.state_key("shift"): final[0], self.state_key("kv"): final[1]}
        return self.output_linear(y.transpose(1, 2).to(x.dtype)), new_state

    def _step(self, x_t: torch.Tensor, state: State):
        q, k, v = (proj(x_t) for proj in (self.q_proj, self.k_proj, self.v_proj))
        with ssm_core_precision(x_t):  # in float32 under autocast and in a half-precision model
            y, shift, kv = h3_step(*(to_core_dtype(t) for t in (q, k, v)), self.discrete_parameters(),
                                   self.head_dim, state[self.state_key("shift")], state[self.state_key("kv")])
        return self.output_linear(y.to(x_t.dtype)), {self.state_key("shift"): shift, self.state_key("kv"): kv}
