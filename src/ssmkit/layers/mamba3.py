"""Mamba-3 (Lahoti et al. 2026, "Mamba-3: Improved Sequence Modeling using State Space Principles",
arXiv 2603.15569): Mamba-2's block without the short convolution, with three changes to the SSM (Sec. 3):
the exponential-trapezoidal discretisation, a complex-valued state written as data-dependent rotations of B and
C, and the multi-input multi-output (MIMO) update; plus RMS norms and learned biases on B and C.

One block, read top to bottom (u of (batch, L, d_model); H heads of P = headdim channels, N = d_state,
R = mimo_rank (1 for SISO), G = ngroups of B and C, S = rotation angles):

    z, x, B, C, dd_dt, dd_A, trap, angles = split(in_proj(u))             the authors' order
    A      = min(-f(dd_A), -A_floor),  f(a) = 1 + a (a >= 0), 1 / (1 - a) (a < 0)   heavy-tail activation
    Delta  = softplus(dd_dt + dt_bias),  lambda = sigmoid(trap)            (B, L, H)
    B, C   = RMSNorm(B) + B_bias, RMSNorm(C) + C_bias                      (B, L, R, H, N), groups repeated
    rates  = pi tanh(angles)                                               (B, L, H, S), shared by the heads
    y^r    = Mamba-3 SSM (ssmkit.ops.mamba3, equations there) on v^r = x * mimo_x[r] (SISO: v = x)
    y      = sum_r mimo_o[r] * (y^r * silu(z * mimo_z[r]))  (SISO: y * silu(z))        gate, MIMO down-projection
             or, with is_outproj_norm, a per-head gated RMSNorm (norm before the gate) in place of the gate
    out    = out_proj(y)

Parameter names and shapes are mamba_ssm's ``Mamba3`` (state-spaces/mamba ``mamba_ssm/modules/mamba3.py``):
``in_proj``, ``dt_bias`` (H,), ``B_bias``, ``C_bias`` (H, R, N), ``B_norm.weight``, ``C_norm.weight`` (N,),
``mimo_x``, ``mimo_z``, ``mimo_o`` (H, R, P; MIMO only), ``D`` (H,), ``norm.weight`` (d_inner; with
is_outproj_norm), ``out_proj`` (both linears bias-free), and the initialisation is theirs: Delta ~ log-uniform
on [dt_min, dt_max] floored at dt_init_floor with dt_bias its inverse softplus; B_bias = C_bias = 1; D = 1;
mimo_x = mimo_o = 1 / R, mimo_z = 1; norm weights 1; linears PyTorch's default.
The rotations pair state channels as the authors' kernels do: adjacent pairs for SISO, (i, i + N/2) for MIMO.

Glossary (code name: paper symbol):

===================  ===================================================================================
``d_state``          N, the state size per head
``headdim``          P; ``nheads`` H = d_inner / P, d_inner = expand * d_model
``ngroups``          G, heads of B and C (each shared by H / G SSM heads)
``mimo_rank``        R, the MIMO rank (is_mimo); 1 for SISO
``rope_fraction``    the fraction of state channels rotated (0.5 or 1): S = N * fraction / 2 angles
``dt_bias``          the bias of Delta (before softplus)
``A_floor``          the largest A allowed (A <= -A_floor)
``trap`` (lambda)    the trapezoid weight; lambda = 1 is Mamba-2's exponential-Euler update
``B_bias, C_bias``   learned biases added to the normalised B and C
state ``angle``      theta, the cumulative rotation angles (batch, H, S), kept modulo 2 pi
state ``ssm``        the SSM state (batch, H, P, N)
state ``k``          the previous token's rotated B per rank (batch, R, H, N)
state ``v``          the previous token's x (batch, H, P) (the trapezoid's left end point reads both)
===================  ===================================================================================

Packed sequences (seq_idx / cu_seqlens) are not taken (``supports_packing = False``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int
from ..ops.mamba3 import BACKENDS as MAMBA3_BACKENDS
from ..ops.mamba3 import mamba3_ssm, mamba3_ssm_step
from .base import Mixer, State, ssm_core_precision, state_dtype, to_core_dtype
from .registry import register_mixer


def heavy_tail_activation(a: torch.Tensor) -> torch.Tensor:
    """f(a) = 1 + a for a >= 0 and 1 / (1 - a) for a < 0: positive, C^1 at 0, with a heavy tail towards 0."""
    return a.clamp_min(0) + torch.reciprocal(1 - a.clamp_max(0))


class RMSNorm(nn.Module):
    """RMS norm over the last dim, optionally gated after the norm (mamba_ssm's ``RMSNormGated`` with
    norm_before_gate=True), per group of ``group_size`` channels: x / rms(x) * weight (* silu(z))."""

    def __init__(self, d: int, eps: float = 1e-5, group_size: Optional[int] = None):
        super().__init__()
        self.eps, self.group_size = eps, group_size or d
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        groups = x.unflatten(-1, (-1, self.group_size))
        normed = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)
        out = normed.flatten(-2) * self.weight
        return out if z is None else out * F.silu(z)


@register_mixer("mamba3")
class Mamba3(Mixer):
    """The Mamba-3 block (module docstring for the equations).

    Args:
        d_model: model width.
        d_state: N (128 in the authors' default).
        expand: d_inner = expand * d_model.
        headdim: P; None: the authors' 64, or d_inner if smaller.
        ngroups: G, heads of B and C (must divide the number of heads).
        rope_fraction: 0.5 or 1.0, the fraction of state channels rotated.
        dt_min, dt_max, dt_init_floor: the initial range of Delta.
        A_floor: A <= -A_floor.
        is_outproj_norm: a per-head gated RMSNorm before out_proj instead of the plain gate.
        is_mimo, mimo_rank: the MIMO variant and its rank R.
        chunk_size: the chunk length of the chunked core (execution only).
        backend: "auto", "chunked" or "reference" for the core; execution only, never saved in a model config.

    Shapes: forward x (batch, L, d_model) -> (batch, L, d_model); step x_t (batch, d_model).
    """

    pattern_letter = "E"
    # the MIMO variant with the output norm (rank, halves pairing, norm and MIMO projections all exercised);
    # tests/layers/test_mamba3.py runs SISO through the same checks
    contract_config = dict(d_state=8, headdim=4, ngroups=2, is_mimo=True, mimo_rank=2, is_outproj_norm=True,
                           chunk_size=8)
    contract_backends = ("chunked", "reference")
    ssm_parameter_names = ("dt_bias", "D")
    depth_scaled = ("out_proj.weight",)
    main_op = "mamba3_ssm"

    def __init__(self, d_model: int, d_state: int = 128, expand: int = 2, headdim: Optional[int] = None,
                 ngroups: int = 1, rope_fraction: float = 0.5, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, A_floor: float = 1e-4, is_outproj_norm: bool = False,
                 is_mimo: bool = False, mimo_rank: int = 4, chunk_size: int = 32, backend: Optional[str] = "auto"):
        super().__init__(d_model)
        self.d_state = check_positive_int("d_state", d_state)
        self.expand = check_positive_int("expand", expand)
        self.d_inner = expand * d_model
        self.headdim = min(64, self.d_inner) if headdim is None else check_positive_int("headdim", headdim)
        if self.d_inner % self.headdim:
            raise ValueError(f"headdim must divide d_inner = expand * d_model = {self.d_inner}; got {self.headdim}")
        self.nheads = self.d_inner // self.headdim
        self.ngroups = check_positive_int("ngroups", ngroups)
        if self.nheads % ngroups:
            raise ValueError(f"ngroups must divide the number of heads {self.nheads}; got {ngroups}")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction must be 0.5 or 1.0; got {rope_fraction!r}")
        rotated = int(d_state * rope_fraction)
        rotated -= rotated % 2
        if rotated < 2:
            raise ValueError(f"d_state * rope_fraction must hold at least one pair of channels; got d_state={d_state}, "
                             f"rope_fraction={rope_fraction}")
        if d_state % 2:
            raise ValueError(f"d_state must be even (its channels rotate in pairs); got {d_state}")
        self.rope_fraction, self.num_rope_angles = rope_fraction, rotated // 2
        for name, value in (("is_outproj_norm", is_outproj_norm), ("is_mimo", is_mimo)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool; got {value!r}")
        for name, value in (("dt_min", dt_min), ("dt_max", dt_max), ("dt_init_floor", dt_init_floor),
                            ("A_floor", A_floor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number; got {value!r}")
        if dt_min > dt_max:
            raise ValueError(f"dt_min must be <= dt_max; got dt_min={dt_min}, dt_max={dt_max}")
        self.is_outproj_norm, self.is_mimo = is_outproj_norm, is_mimo
        self.mimo_rank = check_positive_int("mimo_rank", mimo_rank) if is_mimo else 1
        self.A_floor = float(A_floor)
        self.dt_min, self.dt_max, self.dt_init_floor = float(dt_min), float(dt_max), float(dt_init_floor)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        if backend is not None:
            check_choice("backend", backend, MAMBA3_BACKENDS)
        self.backend = backend

        H, R, N, P = self.nheads, self.mimo_rank, d_state, self.headdim
        bc_width = N * self.ngroups * R
        self.split_sizes = [self.d_inner, self.d_inner, bc_width, bc_width, H, H, H, self.num_rope_angles]
        self.in_proj = nn.Linear(d_model, sum(self.split_sizes), bias=False)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.B_bias = nn.Parameter(torch.empty(H, R, N))
        self.C_bias = nn.Parameter(torch.empty(H, R, N))
        self.B_norm = RMSNorm(N)
        self.C_norm = RMSNorm(N)
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.empty(H, R, P))
            self.mimo_z = nn.Parameter(torch.empty(H, R, P))
            self.mimo_o = nn.Parameter(torch.empty(H, R, P))
        self.D = nn.Parameter(torch.empty(H))
        if is_outproj_norm:
            self.norm = RMSNorm(self.d_inner, group_size=P)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation (module docstring); the linears keep PyTorch's default."""
        dt = torch.exp(torch.rand(self.nheads) * (math.log(self.dt_max) - math.log(self.dt_min))
                       + math.log(self.dt_min)).clamp_min(self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))                      # softplus^-1(dt)
        self.B_bias.fill_(1.0)
        self.C_bias.fill_(1.0)
        self.D.fill_(1.0)
        if self.is_mimo:
            self.mimo_x.fill_(1.0 / self.mimo_rank)
            self.mimo_z.fill_(1.0)
            self.mimo_o.fill_(1.0 / self.mimo_rank)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, is_mimo={self.is_mimo}, mimo_rank={self.mimo_rank}, "
                f"is_outproj_norm={self.is_outproj_norm}, backend={self.backend!r}")

    def state_spec(self, batch_size: int):
        return {"angle": ((batch_size, self.nheads, self.num_rope_angles), "real"),
                "ssm": ((batch_size, self.nheads, self.headdim, self.d_state), "real"),
                "k": ((batch_size, self.mimo_rank, self.nheads, self.d_state), "real"),
                "v": ((batch_size, self.nheads, self.headdim), "real")}

    @property
    def rotary_pairs(self) -> str:
        return "halves" if self.is_mimo else "adjacent"

    # ----------------------------------------------------------------------------------------------
    def _prepare(self, u: torch.Tensor):
        """u (B, L, d_model) -> z (B, L, H, P) and the core's inputs (q, k, v, adt, dt, trap, rates) in the core
        dtype, plus x (B, L, H, P) for the state."""
        batch, length, _ = u.shape
        H, R, G, N, P = self.nheads, self.mimo_rank, self.ngroups, self.d_state, self.headdim
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(self.in_proj(u), self.split_sizes, dim=-1)
        z = z.unflatten(-1, (H, P))
        with ssm_core_precision(u):
            x = to_core_dtype(x).unflatten(-1, (H, P))                                   # (B, L, H, P)
            A = torch.clamp(-heavy_tail_activation(to_core_dtype(dd_A)), max=-self.A_floor)
            dt = F.softplus(to_core_dtype(dd_dt) + to_core_dtype(self.dt_bias))      # (B, L, H)
            rates = (math.pi * torch.tanh(to_core_dtype(angles))).unsqueeze(2).expand(batch, length, H,
                                                                                      self.num_rope_angles)

            def bc(t, norm, bias):                           # (B, L, R*G*N) -> (B, L, R, H, N), + bias
                t = to_core_dtype(t).unflatten(-1, (R, G, N))
                t = t * torch.rsqrt(t.square().mean(-1, keepdim=True) + norm.eps) * to_core_dtype(norm.weight)
                return t.repeat_interleave(H // G, dim=3) + to_core_dtype(bias).permute(1, 0, 2)

            q, k = bc(C, self.C_norm, self.C_bias), bc(B, self.B_norm, self.B_bias)
            v = self._up(x)
            trap = torch.sigmoid(to_core_dtype(trap))
        return z, (q, k, v, A * dt, dt, trap, rates), x

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., H, P) -> v (..., R, H, P): the MIMO up-projection x * mimo_x[r] (SISO: R = 1)."""
        if not self.is_mimo:
            return x.unsqueeze(-3)
        return x.unsqueeze(-3) * to_core_dtype(self.mimo_x).transpose(0, 1)

    def _output(self, y: torch.Tensor, z: torch.Tensor, dtype) -> torch.Tensor:
        """Core output y (..., R, H, P) and z (..., H, P) -> out_proj input (..., d_inner) -> (..., d_model)."""
        with ssm_core_precision(z):
            z = to_core_dtype(z)
            z = z.unsqueeze(-3) * to_core_dtype(self.mimo_z).transpose(0, 1) if self.is_mimo else z.unsqueeze(-3)
            if self.is_outproj_norm:
                y = self.norm(y.flatten(-2), z.flatten(-2)).unflatten(-1, (self.nheads, self.headdim))
            else:
                y = y * F.silu(z)
            y = (y * to_core_dtype(self.mimo_o).transpose(0, 1)).sum(-3) if self.is_mimo else y.squeeze(-3)
        return self.out_proj(y.flatten(-2).to(dtype))

    def _core_state(self, state: State):
        angle, ssm, k, v = (state[self.state_key(n)] for n in ("angle", "ssm", "k", "v"))
        return (to_core_dtype(angle), to_core_dtype(ssm), to_core_dtype(k), self._up(to_core_dtype(v)))

    def _forward(self, x, state, return_state):
        z, core_in, x_heads = self._prepare(x)
        initial = None if state is None else self._core_state(state)
        with ssm_core_precision(x):
            y, (angle, ssm, k, _) = mamba3_ssm(*core_in, to_core_dtype(self.D), initial, True, self.rotary_pairs,
                                              chunk_size=self.chunk_size)
        out = self._output(y, z, x.dtype)
        if not return_state:
            return out, None
        dtype = state_dtype(x.dtype)
        return out, {self.state_key("angle"): angle.to(dtype), self.state_key("ssm"): ssm.to(dtype),
                     self.state_key("k"): k.to(dtype), self.state_key("v"): x_heads[:, -1].to(dtype)}

    def _step(self, x_t: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        z, core_in, x_heads = self._prepare(x_t.unsqueeze(1))
        with ssm_core_precision(x_t):
            y, (angle, ssm, k, _) = mamba3_ssm_step(*(t[:, 0] for t in core_in), to_core_dtype(self.D),
                                                    self._core_state(state), self.rotary_pairs)
        out = self._output(y, z[:, 0], x_t.dtype)
        dtype = state_dtype(x_t.dtype)
        return out, {self.state_key("angle"): angle.to(dtype), self.state_key("ssm"): ssm.to(dtype),
                     self.state_key("k"): k.to(dtype), self.state_key("v"): x_heads[:, 0].to(dtype)}
