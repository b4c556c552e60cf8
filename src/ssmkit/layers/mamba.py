"""Mamba: the selective state space block (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces", arXiv 2312.00752, Sec. 3 and Fig. 3).

One block, read top to bottom (x of (batch, L, d_model); inside, channel-first (batch, channels, L) as the
scan reads it):

    x, z     = in_proj(x).chunk(2)                     # (B, d_inner, L) each: the SSM branch and the gate
    x        = silu(conv1d(x))                         # causal depthwise conv, width d_conv (Sec. 3.4)
    dt, B, C = x_proj(x).split(dt_rank, N, N)          # the selection: Delta, B, C depend on the input
    dt, B, C = rms(dt), rms(B), rms(C)                  # only with dt_bc_rmsnorm (Jamba, Falcon-Mamba)
    Delta    = softplus(dt_proj(dt))                   # (B, d_inner, L), dt_proj's bias inside the softplus
    h_t      = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t   # selective scan (Algorithm 2, Eq. 2a-2b: ZOH on A,
    y_t      = C_t h_t + D x_t                         #   Euler on B), per channel, N states each
    out      = out_proj(y * silu(z))                   # (B, L, d_model)

The parameters carry the names and shapes of mamba_ssm's ``Mamba`` and transformers' ``MambaMixer``, so
their state dicts load unchanged, and are initialised as in the paper and its reference code: A = -(1..N) per
channel (S4D-Real), kept as ``A_log``; ``dt_proj.bias`` = softplus^-1 of Delta ~ logUniform[dt_min, dt_max];
D = 1.

Glossary (code name: paper symbol):

==================  ================================================================================
``d_model``         D, the model width
``d_inner``         E * D (``expand`` E = 2), the width of the SSM branch
``d_state``         N, states per channel (16)
``d_conv``          width of the causal convolution (4)
``dt_rank``         R, the rank of the Delta projection (ceil(D / 16) for "auto")
``A_log``           log(-A), (d_inner, N); A = -exp(A_log)
``D``               D, the skip connection (d_inner,)
``delta``           Delta before the softplus (x_proj then dt_proj without bias), (B, d_inner, L)
==================  ================================================================================

**RMS norms on dt, B and C** (``dt_bc_rmsnorm``): Jamba (Lieber et al. 2024, arXiv 2403.19887, Sec. 3.2:
"we add RMSNorm to internal activations") normalises the low-rank dt and the B and C of every token by their
root mean square with learned weights (``"weighted"``: ``dt_layernorm.weight`` (dt_rank,), ``b_layernorm.weight``
and ``c_layernorm.weight`` (N,)); Falcon-Mamba (Zuo et al. 2024, arXiv 2410.05355) does the same without
weights (``"weightless"``). Both stabilise training at scale; the scan is unchanged.

**State** ``{"mamba.conv": (batch, d_inner, d_conv - 1), "mamba.ssm": (batch, d_inner, d_state)}``. The conv
state is the last ``d_conv - 1`` inputs of the convolution (oldest first; see :mod:`ssmkit.ops.conv1d`): all
that decoding needs. mamba_ssm's and transformers' caches keep ``d_conv`` columns, the first of which is never
read again; ``cache[..., 1:]`` converts theirs to ours.

**Packed sequences.** ``forward`` also takes ``seq_idx`` (batch, L) or ``cu_seqlens`` (a batch of one); the
convolution and the scan restart at every boundary, so the result equals running each sequence alone. The
selective scan op has no per-step reset, so the scan runs the packed rows regrouped as one padded batch of
sequences (padding steps have Delta = 0: they neither decay nor feed the state, so a padded sequence ends in
its exact final state); that costs ``num_sequences * longest`` steps instead of ``batch * L``.
A ``state`` passed in continues the first sequence of each row, and the state returned is that of the last
one; the state holds no sequence ids, so when a piece of a packed stream starts with a new sequence, start
those rows from a zero state.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int
from ..ops.conv1d import causal_conv1d, causal_conv1d_update, packed_seq_idx
from ..ops.mamba import BACKENDS as SCAN_BACKENDS
from ..ops.mamba import selective_scan, selective_state_update
from .base import Mixer, State, check_recompute, ssm_core_precision, state_dtype, to_core_dtype
from .registry import register_mixer

DT_INITS = ("random", "constant")
DT_BC_RMSNORMS = ("weighted", "weightless")


class FeatureRMSNorm(nn.Module):
    """x / sqrt(mean(x^2 over ``dim``) + eps), times ``weight`` when it has one; in float32 for half inputs.

    Shapes: x (..., size, ...) with ``size`` features along ``dim`` -> the same shape.
    """

    def __init__(self, size: int, eps: float, learned: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size)) if learned else None

    def forward(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        x32 = x.float()
        out = (x32 * torch.rsqrt(x32.square().mean(dim, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is None:
            return out
        shape = [1] * x.dim()
        shape[dim] = -1
        return self.weight.view(shape) * out


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y, for y > 0, computed stably as y + log(-expm1(-y))."""
    return y + torch.log(-torch.expm1(-y))


def log_uniform_dt(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """n time steps drawn log-uniformly in [dt_min, dt_max], then floored at ``floor`` (mamba_ssm's dt init)."""
    log_dt = torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    return torch.exp(log_dt).clamp(min=floor)


def check_dt_range(dt_min, dt_max, dt_init_floor) -> None:
    for name, value in (("dt_min", dt_min), ("dt_max", dt_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number; got {value!r}")
    if dt_min > dt_max:
        raise ValueError(f"dt_min must be <= dt_max; got dt_min={dt_min}, dt_max={dt_max}")
    if isinstance(dt_init_floor, bool) or not isinstance(dt_init_floor, (int, float)) or dt_init_floor < 0:
        raise ValueError(f"dt_init_floor must be a number >= 0; got {dt_init_floor!r}")


def inner_width(d_model: int, expand) -> int:
    """d_inner = int(expand * d_model), as mamba_ssm computes it; expand may be a float."""
    if isinstance(expand, bool) or not isinstance(expand, (int, float)) or not expand > 0:
        raise ValueError(f"expand must be a positive number; got {expand!r}")
    d_inner = int(expand * d_model)
    if d_inner < 1:
        raise ValueError(f"expand * d_model must be >= 1; got {expand} * {d_model}")
    return d_inner


def project(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (out, in) applied over the channels of x (B, in, L) -> (B, out, L), in x's memory layout: for a
    channel-last x (a transposed view of (B, L, in) memory) as ``F.linear`` on that memory, so the product
    reads and writes without transposing copies; otherwise as ``weight @ x``, contiguous (B, out, L)."""
    if x.shape[2] > 1 and x.stride(1) < x.stride(2):
        return F.linear(x.transpose(1, 2), weight).transpose(1, 2)
    return torch.matmul(weight, x)


@register_mixer("mamba")
class Mamba(Mixer):
    """Mamba block (selective SSM mixer); see the module docstring for the equations.

    Args:
        d_model: model width D.
        d_state: N, states per channel.
        d_conv: width of the causal depthwise convolution.
        expand: d_inner = int(expand * d_model).
        dt_rank: rank of the Delta projection, an int or "auto" (ceil(d_model / 16)).
        dt_min, dt_max: range of the log-uniform initial Delta.
        dt_init: "random" (dt_proj.weight ~ U(+-dt_rank^-0.5 * dt_scale)) or "constant" (that value).
        dt_scale: scales the dt_proj.weight initialisation.
        dt_init_floor: lower bound of the initial Delta.
        conv_bias: bias in the convolution.
        bias: biases in in_proj and out_proj.
        dt_bc_rmsnorm: None, or RMS-normalise dt (before dt_proj), B and C of each token: "weighted" (Jamba)
            or "weightless" (Falcon-Mamba); see the module docstring.
        dt_bc_rmsnorm_eps: the eps of those norms.
        backend: how the ops run ("auto", "cpp", "triton", "torch", "reference"): applied to every op of
            the layer that has that backend (see :attr:`Mixer.backend`); execution only, the numbers do not
            depend on it, and it is not part of a saved configuration. After a forward, ``last_backend``
            names the selective-scan backend that ran, ``last_backends`` every op's.
        recompute: keep only the in_proj output for the backward and recompute the rest of the block there
            (conv, x_proj/dt_proj, scan, out_proj input), as mamba_ssm does; execution only, like ``backend``
            (see :attr:`Mixer.recompute`).
    """

    pattern_letter = "M"
    contract_config = dict(d_state=4, d_conv=4, expand=2)
    contract_backends = ("cpp", "torch", "triton")
    inplace_step = True
    # dt_proj.bias is the counterpart of Mamba-2's dt_bias (the step's offset before softplus)
    ssm_parameter_names = ("A_log", "D", "dt_proj.bias")
    depth_scaled = ("out_proj.weight",)
    supports_packing = True
    main_op = "selective_scan"
    supports_recompute = True

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: Union[int, float] = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, backend: Optional[str] = "auto",
                 recompute: bool = False, dt_bc_rmsnorm: Optional[str] = None,
                 dt_bc_rmsnorm_eps: float = 1e-6):
        super().__init__(d_model)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_conv = check_positive_int("d_conv", d_conv)
        self.expand = expand
        self.d_inner = inner_width(d_model, expand)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif isinstance(dt_rank, str):
            raise ValueError(f"dt_rank must be a positive int or 'auto'; got {dt_rank!r}")
        self.dt_rank = check_positive_int("dt_rank", dt_rank)
        check_dt_range(dt_min, dt_max, dt_init_floor)
        check_choice("dt_init", dt_init, DT_INITS)
        if backend is not None:
            check_choice("backend", backend, SCAN_BACKENDS)
        self.backend = backend
        self.recompute = check_recompute(recompute)
        if dt_bc_rmsnorm is not None:
            check_choice("dt_bc_rmsnorm", dt_bc_rmsnorm, DT_BC_RMSNORMS)
        if isinstance(dt_bc_rmsnorm_eps, bool) or not isinstance(dt_bc_rmsnorm_eps, (int, float)) \
                or not dt_bc_rmsnorm_eps > 0:
            raise ValueError(f"dt_bc_rmsnorm_eps must be a positive number; got {dt_bc_rmsnorm_eps!r}")
        self.dt_bc_rmsnorm = dt_bc_rmsnorm

        d_inner, N = self.d_inner, self.d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner, padding=d_conv - 1,
                                bias=conv_bias)  # only its parameters are used (by ops.conv1d)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, N))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        if dt_bc_rmsnorm is not None:
            learned = dt_bc_rmsnorm == "weighted"
            self.dt_layernorm = FeatureRMSNorm(self.dt_rank, dt_bc_rmsnorm_eps, learned)
            self.b_layernorm = FeatureRMSNorm(N, dt_bc_rmsnorm_eps, learned)
            self.c_layernorm = FeatureRMSNorm(N, dt_bc_rmsnorm_eps, learned)
        # for optimiser recipes written for mamba_ssm, which look for this mark; ssmkit.train reads ssm_parameter_names
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self._init_ssm_parameters(dt_min, dt_max, dt_init, dt_scale, dt_init_floor)

    @torch.no_grad()
    def _init_ssm_parameters(self, dt_min, dt_max, dt_init, dt_scale, dt_init_floor) -> None:
        """Paper initialisation of A_log, D and dt_proj (the linear maps keep PyTorch's default)."""
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            self.dt_proj.weight.fill_(std)
        else:
            self.dt_proj.weight.uniform_(-std, std)
        dt = log_uniform_dt(self.d_inner, dt_min, dt_max, dt_init_floor)
        self.dt_proj.bias.copy_(inverse_softplus(dt))

    # ----------------------------------------------------------------------------------------------
    def state_spec(self, batch_size: int):
        return {"conv": ((batch_size, self.d_inner, self.d_conv - 1), "cache"),
                "ssm": ((batch_size, self.d_inner, self.d_state), "real")}

    def _ssm_parameters(self):
        """A (d_inner, N), D and the Delta bias (d_inner,), in float32 for a half-precision model: the scan
        takes them so beside half-precision activations and computes in float32 (base module, Precision)."""
        return -torch.exp(to_core_dtype(self.A_log)), to_core_dtype(self.D), to_core_dtype(self.dt_proj.bias)

    def _forward(self, x, state, return_state, seq_idx=None):
        conv_state = state[self.state_key("conv")] if state is not None else None
        ssm_state = state[self.state_key("ssm")] if state is not None else None

        # Channel-first (B, channels, L) throughout, as mamba_ssm does: the scan reads (B, d_inner, L) rows
        # contiguously, and the in_proj product is made with time fastest (_in_proj_time_fastest: one
        # W @ x^T product, no copy; project() follows whatever layout xz has). Channel-last activations (F.linear
        # on (B, L, .) memory, the C++ scan reading strided rows) were measured slower on the 2-core CPU at
        # d_model 768, L 1024, 2 threads: forward 88 ms vs 69 ms, as each strided row read touches L different
        # pages. torch.matmul(W, x^T) computed x W^T and then copied it to channel-first (8.6 ms of a 60 ms
        # forward); the single product is 60.4 -> 53.4 ms forward, 165 -> 155 ms forward + backward (batch 1;
        # 263 -> 229 and 731 -> 648 ms at batch 4), measured 2026-12-04, 2 threads.
        xz = self._in_proj_time_fastest(x)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        y, conv_final, ssm_final = self._run_core(
            lambda xz, conv_state, ssm_state: self._core(x, xz, conv_state, ssm_state, return_state, seq_idx),
            xz, conv_state, ssm_state)
        if not return_state:
            return y, None
        return y, {self.state_key("conv"): conv_final.to(state_dtype(x.dtype, "cache")),
                   self.state_key("ssm"): ssm_final.to(state_dtype(x.dtype))}

    def _core(self, x, xz, conv_state, ssm_state, return_state, seq_idx):
        """From the in_proj output xz (B, 2 d_inner, L) to the block's output (B, L, d_model), with the final
        conv and scan states (None unless ``return_state``): what ``recompute`` runs again in the backward."""
        conv_final = None
        # The core (conv, projections to dt/B/C, scan) runs with autocast off, in the parameters' dtype:
        # float32 under autocast, the model's own in a bf16/fp16 model. (Feeding the bf16 autocast activations
        # to the Triton scan instead, as Mamba2 does with its SSD, made the H200 forward 30% faster but the
        # forward+backward 20% slower: 54.8 -> 66.0 ms at d_model 1024, batch 8, L 8k; not kept.)
        with ssm_core_precision(x):
            u, z = xz.to(self.conv1d.weight.dtype).chunk(2, dim=1)      # (B, d_inner, L) each
            u = causal_conv1d(u, self.conv1d.weight, self.conv1d.bias, conv_state, seq_idx, "silu",
                              return_final_state=return_state)
            if return_state:
                u, conv_final = u
            x_dbl = project(self.x_proj.weight.to(u.dtype), u)         # (B, dt_rank + 2N, L)
            dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)  # B, C: (B, N, L)
            if self.dt_bc_rmsnorm is not None:
                dt, B, C = self.dt_layernorm(dt, 1), self.b_layernorm(B, 1), self.c_layernorm(C, 1)
            delta = project(self.dt_proj.weight.to(u.dtype), dt)       # (B, d_inner, L); bias added in the scan
            A, D, delta_bias = self._ssm_parameters()
            # a half-precision model's state is float32: the scan takes it beside the half activations and
            # returns its last state in float32

            if seq_idx is not None and bool((seq_idx[:, 1:] != seq_idx[:, :-1]).any()):
                y, ssm_final = self._scan_packed(u, delta, A, B, C, z, D, delta_bias, ssm_state, seq_idx,
                                                 return_state)
            else:
                out = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                     delta_softplus=True, return_last_state=return_state, initial_state=ssm_state)
                y, ssm_final = out if return_state else (out, None)
        return self.out_proj(y.to(x.dtype).transpose(1, 2)), conv_final, ssm_final   # (B, L, d_model)

    def _in_proj_time_fastest(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model) -> in_proj(x) as (B, 2 d_inner, L) with time the fastest axis (stride 1).

        One (2 d_inner, d_model) x (d_model, B L) product, viewed per batch row (mamba_ssm's layout). On the
        CPU it saves the copy that ``torch.matmul(W, x^T)`` makes of its channel-last result. On a
        GPU this matters: ``torch.matmul(W, x^T)`` returns the product channel-last (time strided by
        2 d_inner), so the scan's loads along time, of u and z here and of everything projected from u
        after, are uncoalesced; with time fastest the later x_proj / dt_proj products keep it so (batched
        products, no copies).
        """
        batch, length, _ = x.shape
        xz = torch.matmul(self.in_proj.weight, x.reshape(batch * length, -1).t())  # (2 d_inner, B L)
        return xz.view(-1, batch, length).transpose(0, 1)

    def _scan_packed(self, u, delta, A, B, C, z, D, delta_bias, ssm_state, seq_idx, return_state):
        """The selective scan restarted at every change of ``seq_idx``, by running the packed sequences as
        rows of one padded batch. Padding steps get Delta = 0 (after the softplus), so exp(Delta A) = 1 and
        Delta B u = 0: they leave the state exactly as it was and a sequence's last state survives to the end.
        """
        batch, d_inner, length = u.shape
        ids = seq_idx.cpu()
        starts_per_row = [[0] + ((ids[b, 1:] != ids[b, :-1]).nonzero()[:, 0] + 1).tolist() for b in range(batch)]
        rows, starts, lengths, first, last = [], [], [], [], []
        for b, row_starts in enumerate(starts_per_row):
            ends = row_starts[1:] + [length]
            for i, (s, e) in enumerate(zip(row_starts, ends)):
                rows.append(b), starts.append(s), lengths.append(e - s)
                first.append(i == 0), last.append(i == len(row_starts) - 1)
        n_seq, longest = len(rows), max(lengths)
        device = u.device
        steps = torch.arange(longest, device=device)
        valid = steps[None, :] < torch.tensor(lengths, device=device)[:, None]          # (n_seq, longest)
        flat_pos = (torch.tensor(rows, device=device) * length + torch.tensor(starts, device=device))[:, None]
        gather = torch.where(valid, flat_pos + steps[None, :], torch.zeros((), dtype=torch.long, device=device))

        def regroup(t):  # (batch, C, L) -> (n_seq, C, longest), zeros at padding
            flat = t.transpose(1, 2).reshape(batch * length, t.shape[1])
            return (flat[gather] * valid[..., None].to(t.dtype)).transpose(1, 2)

        # softplus here (not in the op) so that padding can be an exact Delta = 0
        delta = F.softplus(delta + delta_bias[:, None]).to(u.dtype)
        init = None
        if ssm_state is not None:
            first_t = torch.tensor(first, device=device)
            init = ssm_state[torch.tensor(rows, device=device)] * first_t[:, None, None].to(ssm_state.dtype)
        out = selective_scan(regroup(u), regroup(delta), A, regroup(B), regroup(C), D=D, z=regroup(z),
                             delta_bias=None, delta_softplus=False, return_last_state=return_state,
                             initial_state=init)
        y_seq, last_states = out if return_state else (out, None)
        y = y_seq.transpose(1, 2)[valid].reshape(batch, length, d_inner).transpose(1, 2)  # back to (B, d, L)
        final = last_states[torch.tensor(last, device=device)] if return_state else None
        return y, final

    def _step(self, x_t: torch.Tensor, state: State, inplace: bool = False) -> Tuple[torch.Tensor, State]:
        u, z = self.in_proj(x_t).chunk(2, dim=-1)                    # (B, d_inner) each
        u, conv_state = causal_conv1d_update(u, state[self.state_key("conv")], self.conv1d.weight,
                                             self.conv1d.bias, activation="silu", inplace=inplace)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.dt_bc_rmsnorm is not None:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        delta = F.linear(dt, self.dt_proj.weight)                    # (B, d_inner)
        # the update takes half-precision activations beside the float32 state and computes in float32 (as
        # mamba_ssm's); D and the bias go in their own dtype, so a decoding step launches no cast kernels
        A = -torch.exp(to_core_dtype(self.A_log))
        y, ssm_state = selective_state_update(state[self.state_key("ssm")], u, delta, A, B, C, D=self.D, z=z,
                                              dt_bias=self.dt_proj.bias, dt_softplus=True, inplace=inplace)
        return self.out_proj(y.to(x_t.dtype)), {self.state_key("conv"): conv_state, self.state_key("ssm"): ssm_state}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, backend={self.backend!r}"
                + (f", dt_bc_rmsnorm={self.dt_bc_rmsnorm!r}" if self.dt_bc_rmsnorm else ""))
