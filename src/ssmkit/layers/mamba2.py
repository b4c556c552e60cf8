"""Mamba-2: the SSD block (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", arXiv 2405.21060, Sec. 7, the Mamba-2 architecture).

One block, read top to bottom (shapes for x of (batch, L, d_model); H heads of P = headdim channels, G groups):

    z, xBC, dt = in_proj(x).split(d_inner, d_inner + 2 G N, H)   # one projection makes everything in parallel
    x, B, C    = silu(conv1d(xBC)).split(d_inner, G N, G N)       # causal depthwise conv over x, B and C
    Delta      = softplus(dt + dt_bias), clamped to dt_limit       # (B, L, H)
    h_t        = exp(Delta_t A) h_{t-1} + Delta_t x_t B_t^T        # SSD, per head: scalar A, state (P, N),
    y_t        = h_t C_t + D x_t                                   #   B and C shared by the H/G heads of a group
    y          = RMSNorm(y * silu(z))    (rmsnorm, norm_before_gate=False; no norm: y * silu(z))
    out        = out_proj(y)

The parameters carry the names and shapes of mamba_ssm's ``Mamba2`` and transformers' ``Mamba2Mixer``
(in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj), so their state dicts load unchanged; the
initialisation follows mamba_ssm: A = -U(A_init_range) per head (stored as ``A_log``), ``dt_bias`` =
softplus^-1 of Delta ~ logUniform[dt_min, dt_max] floored at ``dt_init_floor``, D = 1, norm weight = 1.

Glossary (code name: paper symbol):

==================  ================================================================================
``d_inner``         expand * d_model, the width of the SSM branch
``headdim``         P, channels per head;  ``nheads`` H = d_inner / P
``d_state``         N, the state size (per head the state is (P, N))
``ngroups``         G, groups of heads sharing B and C (like grouped-query attention)
``conv_dim``        d_inner + 2 G N, the channels that go through the convolution
``A_log``           log(-A), (H,); A = -exp(A_log)
``dt_bias``         the bias of Delta inside the softplus, (H,)
``D``               D, (H,), or (d_inner,) = (H * P,) with ``D_has_hdim``
``norm``            gated RMSNorm, normalising each of the G groups of d_inner / G channels
==================  ================================================================================

**State** ``{"mamba2.conv": (batch, conv_dim, d_conv - 1), "mamba2.ssm": (batch, nheads, headdim, d_state)}``,
the conv state being the last ``d_conv - 1`` convolution inputs (see :mod:`ssmkit.ops.conv1d`; mamba_ssm's and
transformers' caches keep ``d_conv`` columns, the first never read again: ``cache[..., 1:]`` converts).

**Packed sequences.** ``forward`` also takes ``seq_idx`` (batch, L) or ``cu_seqlens`` (a batch of one); the
convolution and the SSD scan both restart at every boundary, so the result equals running each sequence alone.
A ``state`` passed in continues the first sequence of each row, and the state returned is that of the last
one; the state holds no sequence ids, so when a piece of a packed stream starts with a new sequence, start
those rows from a zero state.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._checks import check_choice, check_positive_int
from ..ops.conv1d import causal_conv1d, causal_conv1d_update, packed_seq_idx
from ..ops.mamba2 import BACKENDS as SSD_BACKENDS
from ..ops.mamba2 import rmsnorm_gated, ssd, ssd_state_update
from .base import Mixer, State, check_recompute, ssm_core_precision, state_dtype, to_core_dtype
from .mamba import check_dt_range, inner_width, inverse_softplus, log_uniform_dt
from .registry import register_mixer


class RMSNormGated(nn.Module):
    """Gated RMSNorm of Mamba-2 (mamba_ssm's ``RMSNormGated``, transformers' ``MambaRMSNormGated``).

    norm_before_gate=False:  out = rmsnorm(x * silu(z)) * weight
    norm_before_gate=True:   out = rmsnorm(x) * weight * silu(z)

    where rmsnorm divides each group of ``group_size`` consecutive channels by its root mean square
    (sqrt(mean(v^2) + eps)). Shapes: x, z (..., hidden_size) -> (..., hidden_size).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, norm_before_gate: bool = False,
                 group_size: Optional[int] = None):
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.group_size = hidden_size if group_size is None else check_positive_int("group_size", group_size)
        if hidden_size % self.group_size:
            raise ValueError(f"group_size must divide hidden_size={hidden_size}; got {self.group_size}")
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        # half-precision inputs are normalised in float32 (as mamba_ssm's fused norm) and cast back; on CUDA
        # one fused Triton kernel (``ssmkit.ops.mamba2.rmsnorm_gated``)
        return rmsnorm_gated(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, group_size={self.group_size}, eps={self.eps}, "
                f"norm_before_gate={self.norm_before_gate}")


@register_mixer("mamba2")
class Mamba2(Mixer):
    """Mamba-2 block (SSD mixer); see the module docstring for the equations.

    Args:
        d_model: model width.
        d_state: N, the state size of each head (per head the state is (headdim, N)).
        d_conv: width of the causal depthwise convolution over [x, B, C].
        expand: d_inner = int(expand * d_model), which ``headdim`` must divide.
        headdim: P, channels per head; nheads = d_inner / headdim.
        ngroups: G, groups of heads sharing B and C; must divide nheads.
        A_init_range: A = -U(A_init_range) per head, 0 < low <= high.
        D_has_hdim: one skip coefficient per channel (d_inner,) instead of per head (nheads,).
        rmsnorm: gated RMSNorm on the output; without it the output is y * silu(z).
        norm_before_gate: rmsnorm(y) * silu(z) instead of rmsnorm(y * silu(z)).
        dt_min, dt_max: range of the log-uniform initial Delta.
        dt_limit: Delta is clamped to this (min, max) after the softplus (not when it is (0, inf)).
        chunk_size: chunk length of the chunked SSD algorithm (execution only: results do not depend on it).
        conv_bias: bias in the convolution.
        bias: biases in in_proj and out_proj.
        backend: how the ops run ("auto", "triton", "torch", "reference"): applied to every op of the layer
            that has that backend (see :attr:`Mixer.backend`); execution only, not part of a saved
            configuration. After a forward, ``last_backend`` names the SSD backend that ran, ``last_backends``
            every op's.
        dt_init_floor: lower bound of the initial Delta (mamba_ssm's default 1e-4).
        recompute: keep only the in_proj output for the backward and recompute the rest of the block there
            (conv, SSD, gated norm, out_proj input); execution only, like ``backend`` (see
            :attr:`Mixer.recompute`).
        norm_eps: eps of the gated RMSNorm (mamba_ssm: 1e-5; checkpoints of hybrids set their own).
    """

    pattern_letter = "D"
    contract_config = dict(d_state=6, headdim=4, expand=2, ngroups=2, chunk_size=16)
    contract_backends = ("torch", "triton")
    inplace_step = True
    ssm_parameter_names = ("dt_bias", "A_log", "D")
    depth_scaled = ("out_proj.weight",)
    supports_packing = True
    main_op = "ssd"
    supports_recompute = True

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: Union[int, float] = 2,
                 headdim: int = 64, ngroups: int = 1, A_init_range: Sequence[float] = (1, 16),
                 D_has_hdim: bool = False, rmsnorm: bool = True, norm_before_gate: bool = False,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_limit: Tuple[float, float] = (0.0, float("inf")),
                 chunk_size: int = 256, conv_bias: bool = True, bias: bool = False, backend: str = "auto",
                 dt_init_floor: float = 1e-4, recompute: bool = False, norm_eps: float = 1e-5):
        super().__init__(d_model)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_conv = check_positive_int("d_conv", d_conv)
        self.expand = expand
        self.d_inner = inner_width(d_model, expand)
        self.headdim = check_positive_int("headdim", headdim)
        self.ngroups = check_positive_int("ngroups", ngroups)
        if self.d_inner % headdim:
            raise ValueError(f"d_model * expand = {d_model} * {expand} = {self.d_inner} must be divisible by "
                             f"headdim; got headdim={headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"ngroups must divide the number of heads nheads = d_inner / headdim = "
                             f"{self.nheads}; got ngroups={ngroups}")
        low, high = _check_range("A_init_range", A_init_range)
        check_dt_range(dt_min, dt_max, dt_init_floor)
        self.dt_limit = _check_dt_limit(dt_limit)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        check_choice("backend", backend, SSD_BACKENDS)
        self.backend = backend
        self.recompute = check_recompute(recompute)
        self.D_has_hdim = bool(D_has_hdim)
        self.rmsnorm = bool(rmsnorm)
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive number; got {norm_eps!r}")

        G, N, H = self.ngroups, self.d_state, self.nheads
        self.conv_dim = self.d_inner + 2 * G * N
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * G * N + H, bias=bias)  # [z, x, B, C, dt]
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias)  # only its parameters are used
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(self.d_inner if self.D_has_hdim else H))
        if self.rmsnorm:
            self.norm = RMSNormGated(self.d_inner, eps=float(norm_eps), norm_before_gate=norm_before_gate,
                                     group_size=self.d_inner // G)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        for p in (self.dt_bias, self.A_log, self.D):  # mamba_ssm recipes' mark; ssmkit reads ssm_parameter_names
            p._no_weight_decay = True
        self._init_ssm_parameters(low, high, dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_ssm_parameters(self, low, high, dt_min, dt_max, dt_init_floor) -> None:
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(low, high)))
        self.dt_bias.copy_(inverse_softplus(log_uniform_dt(self.nheads, dt_min, dt_max, dt_init_floor)))
        self.D.fill_(1.0)

    # ----------------------------------------------------------------------------------------------
    def state_spec(self, batch_size: int):
        return {"conv": ((batch_size, self.conv_dim, self.d_conv - 1), "cache"),
                "ssm": ((batch_size, self.nheads, self.headdim, self.d_state), "real")}

    def _skip(self) -> torch.Tensor:
        D = to_core_dtype(self.D)  # float32 in a half-precision model: SSD takes it so beside half activations
        return D.view(self.nheads, self.headdim) if self.D_has_hdim else D  # (H,) or (H, P)

    def _forward(self, x, state, return_state, seq_idx=None):
        conv_state = state[self.state_key("conv")] if state is not None else None
        ssm_state = state[self.state_key("ssm")] if state is not None else None

        zxbcdt = self.in_proj(x)                                             # (B, L, d_in_proj)
        y, conv_final, ssm_final = self._run_core(
            lambda zxbcdt, conv_state, ssm_state: self._core(x, zxbcdt, conv_state, ssm_state, return_state,
                                                             seq_idx),
            zxbcdt, conv_state, ssm_state)
        if not return_state:
            return y, None
        return y, {self.state_key("conv"): conv_final.to(state_dtype(x.dtype, "cache")),
                   self.state_key("ssm"): ssm_final.to(state_dtype(x.dtype))}

    def _core(self, x, zxbcdt, conv_state, ssm_state, return_state, seq_idx):
        """From the in_proj output (B, L, d_in_proj) to the block's output (B, L, d_model), with the final conv
        and SSD states (None unless ``return_state``): what ``recompute`` runs again in the backward."""
        batch, length, _ = x.shape
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        conv_final = None
        # The core (conv, SSD, gated norm) runs with autocast off. On CUDA it takes the activations as they
        # come (bf16 under autocast): its kernels accumulate in float32, as mamba_ssm's do, and a float32 copy
        # would hold the same values at twice the memory traffic and on the slow float32 tensor-core path.
        # Elsewhere it runs in the parameters' dtype: float32 under autocast, the model's own in a bf16/fp16
        # model (SSD computes in float32 inside and takes A, D, dt_bias and the states in float32).
        core_dtype = zxbcdt.dtype if zxbcdt.is_cuda else self.conv1d.weight.dtype
        with ssm_core_precision(x):
            z, xBC, dt = zxbcdt.to(core_dtype).split([self.d_inner, self.conv_dim, H], dim=-1)
            xBC = causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, conv_state, seq_idx,
                                "silu", return_final_state=return_state)
            if return_state:
                xBC, conv_final = xBC
            xs, B, C = xBC.transpose(1, 2).split([self.d_inner, G * N, G * N], dim=-1)  # (B, L, .)
            A = -torch.exp(to_core_dtype(self.A_log))                            # (H,)
            gate = None if self.rmsnorm else z.reshape(batch, length, H, P)
            out = ssd(xs.reshape(batch, length, H, P), dt, A, B.reshape(batch, length, G, N),
                      C.reshape(batch, length, G, N), self.chunk_size, D=self._skip(), z=gate,
                      dt_bias=to_core_dtype(self.dt_bias), dt_softplus=True, dt_limit=self.dt_limit, initial_states=ssm_state,
                      seq_idx=seq_idx, return_final_states=return_state)
            y, ssm_final = out if return_state else (out, None)
            y = y.reshape(batch, length, self.d_inner)
            if self.rmsnorm:
                y = self.norm(y, z)
        return self.out_proj(y.to(x.dtype)), conv_final, ssm_final

    def _step(self, x_t: torch.Tensor, state: State, inplace: bool = False) -> Tuple[torch.Tensor, State]:
        batch = x_t.shape[0]
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self.in_proj(x_t).split([self.d_inner, self.conv_dim, H], dim=-1)
        xBC, conv_state = causal_conv1d_update(xBC, state[self.state_key("conv")], self.conv1d.weight,
                                               self.conv1d.bias, activation="silu", inplace=inplace)
        xs, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        A = -torch.exp(to_core_dtype(self.A_log))
        gate = None if self.rmsnorm else z.reshape(batch, H, P)
        y, ssm_state = ssd_state_update(state[self.state_key("ssm")], xs.reshape(batch, H, P), dt, A,
                                        B.reshape(batch, G, N), C.reshape(batch, G, N), D=self._skip(), z=gate,
                                        dt_bias=to_core_dtype(self.dt_bias), dt_softplus=True,
                                        dt_limit=self.dt_limit, inplace=inplace)
        y = y.reshape(batch, self.d_inner)
        if self.rmsnorm:
            y = self.norm(y, z)
        return self.out_proj(y.to(x_t.dtype)), {self.state_key("conv"): conv_state,
                                                self.state_key("ssm"): ssm_state.to(state_dtype(x_t.dtype))}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, nheads={self.nheads}, headdim={self.headdim}, "
                f"d_state={self.d_state}, ngroups={self.ngroups}, chunk_size={self.chunk_size}, "
                f"backend={self.backend!r}")


def _check_range(name: str, value) -> Tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers (low, high); got {value!r}") from None
    if not (0 < low <= high) or math.isinf(high):
        raise ValueError(f"{name} must satisfy 0 < low <= high < inf; got {tuple(value)}")
    return low, high


def _check_dt_limit(value) -> Tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"dt_limit must be a pair of numbers (min, max); got {value!r}") from None
    if math.isnan(low) or math.isnan(high) or low < 0 or low > high:
        raise ValueError(f"dt_limit must satisfy 0 <= min <= max; got {tuple(value)}")
    return low, high
