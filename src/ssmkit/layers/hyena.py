"""Hyena: the Hyena operator of "Hyena Hierarchy" (Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon,
Re 2023, ICML, Sec. 3), with a constant-state distilled form ("Laughing Hyena Distillery", Massaroli et al.
2023).

    x^1 .. x^N, v = split(short_conv(x W_in))             (Sec. 3.1: N + 1 projections, each through a short
                                                            causal depthwise convolution, 3 taps)
    u = v;  for n = 1 .. N-1:  u <- h^n conv (x^{N+1-n} * u) + b^n (x^{N+1-n} * u)     (Def. 3.1, eq. 5-6)
    y = (x^1 * u) W_out

Implicit long filters (Sec. 3.3, eq. 7): h_t = Window(t) * FFN(PositionalEncoding(t)), with t in [0, 1]
over the maximal length ``l_max``, the FFN an MLP with sine activations (sin(omega x), omega trained) and
the window an exponential decay exp(-alpha_c t) whose rate alpha_c is spread over the channels (fast
channels forget within 30 % of ``l_max``, slow ones keep 1 / 150 of their weight at its end). The filter at
lag t is the same for every sequence length (positions t / (l_max - 1)), so chunked runs agree with whole
ones; sequences (with their history) are limited to ``l_max`` tokens.

Two recurrent forms:

* :class:`Hyena` (``constant_state = False``): the state keeps the input of every long convolution so far
  (``history``, (batch, N - 1, D, T), T growing like a KV cache) and the short convolution's last inputs;
  ``step`` computes each long convolution as an explicit sum over the history.
* :class:`DistilledHyena`, from :meth:`Hyena.distill`: each long filter is replaced by a diagonal SSM with
  n complex modes fitted to it (poles and residues, :func:`ssmkit.ops.hyena.fit_modal`), so the state is
  constant: z (batch, N - 1, D, n). :meth:`DistilledHyena.fitting_error` reports the fit.

Parameter names and initialisation follow the authors' ``HyenaOperator`` / ``HyenaFilter`` (HazyResearch/safari,
``src/models/sequence/hyena.py``, as we understand it; not read here): ``in_proj``, ``out_proj``,
``short_filter`` (depthwise ``nn.Conv1d``), ``filter_fn.pos_emb.z`` (trained positional encoding: t and
sinusoids), ``filter_fn.implicit_filter`` (Linear, Sin, [Linear, Sin] x num_inner_mlps, Linear without
bias), ``filter_fn.modulation.deltas`` (decay rates, a buffer) and ``filter_fn.bias`` (the skip terms b).

Glossary (code name: paper symbol):

=====================  ===============================================================================
``d_model``            D, width
``order``              N, the order of the recurrence (N gates x^n, N - 1 long filters h^n); 2 in the paper
``l_max``              L, the longest sequence the filters are defined for
``filter_order``       width of the filter FFN
``emb_dim``            size of the positional encoding (t, then (emb_dim - 1) / 2 sinusoid pairs)
``short_filter_order`` taps of the short convolution (3)
``w``                  initial frequency omega of the sine activations
``deltas``             alpha_c, decay rates of the window
``filter_fn.bias``     b^n, the skip term of each long convolution
=====================  ===============================================================================
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from .._checks import check_positive_int
from ..ops import causal_conv1d, causal_conv1d_update, fft_conv
from ..ops.hyena import fit_modal, hyena_recurrence
from ..ops.lti_kernels import final_state, initial_state_response, kernel_vandermonde
from .base import Mixer, State, ssm_core_precision, state_dtype, to_core_dtype
from .registry import register_mixer


class Sin(nn.Module):
    """sin(omega x) with a trained frequency per feature (Hyena Sec. 3.3: the FFN's activation)."""

    def __init__(self, dim: int, w: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    """(l_max, emb_dim) encoding of the positions: t in [0, 1] and (emb_dim - 1) / 2 sinusoid pairs
    exp(-i f 2 pi n / l_max) with frequencies f from 1e-4 to bands - 1 (Hyena Sec. 3.3, Appendix)."""

    def __init__(self, emb_dim: int, l_max: int):
        super().__init__()
        t = torch.linspace(0, 1, l_max)[:, None]  # (L, 1)
        bands = (emb_dim - 1) // 2
        angle = 2 * math.pi * torch.arange(l_max, dtype=torch.float32)[:, None] / l_max
        f = torch.linspace(1e-4, bands - 1, bands)[None, :]
        self.z = nn.Parameter(torch.cat([t, torch.cos(f * angle), -torch.sin(f * angle)], -1))  # (L, emb_dim)
        self.l_max = l_max

    def forward(self, L: int):
        """z[:L] (L, emb_dim) and the positions t (L, 1) in [0, 1], the latter in float32 for a half-precision
        model: they are constants, not parameters, and rounding them to 8 bits would shift the window."""
        t = torch.arange(L, device=self.z.device, dtype=to_core_dtype(self.z).dtype)[:, None] / (self.l_max - 1)
        return self.z[:L], t


class ExponentialModulation(nn.Module):
    """The window exp(-|alpha_c| t): rates spread linearly from log(target) / slow_decay_pct to
    log(target) / fast_decay_pct over the channels (a filter reaches ``target`` at that fraction of l_max)."""

    def __init__(self, channels: int, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                 target: float = 1e-2, shift: float = 0.0):
        super().__init__()
        self.shift = shift
        max_decay, min_decay = math.log(target) / fast_decay_pct, math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, channels)[None, :])

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h * (torch.exp(-t * self.deltas.abs()) + self.shift)


class HyenaFilter(nn.Module):
    """The implicit long filters h (order - 1 of them, D channels each) and their skip terms b."""

    def __init__(self, channels: int, l_max: int, emb_dim: int = 3, filter_order: int = 64,
                 num_inner_mlps: int = 2, w: float = 1.0):
        super().__init__()
        self.pos_emb = PositionalEmbedding(emb_dim, l_max)
        layers = [nn.Linear(emb_dim, filter_order), Sin(filter_order, w)]
        for _ in range(num_inner_mlps):
            layers += [nn.Linear(filter_order, filter_order), Sin(filter_order, w)]
        layers.append(nn.Linear(filter_order, channels, bias=False))
        self.implicit_filter = nn.Sequential(*layers)
        self.modulation = ExponentialModulation(channels)
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, L: int) -> torch.Tensor:
        """(L, channels): the filters at lags 0 .. L-1, in the dtype of the parameters."""
        z, t = self.pos_emb(L)
        return self.modulation(t.to(z.dtype), self.implicit_filter(z))

    def filter(self, L: int) -> torch.Tensor:
        """(L, channels): the filters at lags 0 .. L-1 as the long convolutions use them: computed in float32
        for a half-precision model (the kernels of the core; layers/base.py, Precision), by running
        :meth:`forward` on float32 copies of the parameters and buffers, so gradients reach the originals."""
        core = {name: to_core_dtype(tensor) for name, tensor in (*self.named_parameters(), *self.named_buffers())}
        return functional_call(self, core, (L,))


@register_mixer("hyena")
class Hyena(Mixer):
    """Hyena operator (module docstring); its state keeps the history of the long convolutions' inputs.

    Args:
        d_model: D.
        l_max: longest sequence (history included) the implicit filters are defined for.
        order: N >= 2 (N gates, N - 1 long convolutions).
        filter_order: width of the filter FFN.  emb_dim: positional encoding size (odd, >= 3).
        num_inner_mlps: hidden Linear + Sin pairs of the filter FFN after the first.
        short_filter_order: taps of the short depthwise convolution.  w: initial sine frequency.

    Shapes: forward x (batch, L, d_model) -> (batch, L, d_model), L plus the history length <= l_max;
    step x_t (batch, d_model).
    """

    pattern_letter = "Y"
    contract_config = dict(l_max=1024, order=3, filter_order=8)
    # the positional encoding and the sine frequencies: no weight decay, as the authors' optimiser hooks
    ssm_parameter_names = ("filter_fn.pos_emb.z",)
    depth_scaled = ("out_proj.weight",)
    constant_state = False  # the history of the long convolutions grows with the sequence

    def __init__(self, d_model: int, l_max: int = 2048, order: int = 2, filter_order: int = 64,
                 emb_dim: int = 3, num_inner_mlps: int = 2, short_filter_order: int = 3, w: float = 1.0):
        super().__init__(d_model)
        check_positive_int("l_max", l_max, minimum=2)
        check_positive_int("order", order, minimum=2)
        check_positive_int("filter_order", filter_order)
        check_positive_int("emb_dim", emb_dim, minimum=3)
        if emb_dim % 2 == 0:
            raise ValueError(f"emb_dim must be odd (t plus sinusoid pairs); got {emb_dim}")
        check_positive_int("num_inner_mlps", num_inner_mlps, minimum=0)
        check_positive_int("short_filter_order", short_filter_order)
        self.l_max, self.order, self.short_filter_order = l_max, order, short_filter_order
        inner = (order + 1) * d_model
        self.in_proj = nn.Linear(d_model, inner)
        self.out_proj = nn.Linear(d_model, d_model)
        self.short_filter = nn.Conv1d(inner, inner, short_filter_order, groups=inner,
                                      padding=short_filter_order - 1)
        self.filter_fn = HyenaFilter(d_model * (order - 1), l_max, emb_dim, filter_order, num_inner_mlps, w)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, order={self.order}, l_max={self.l_max}"

    # ----------------------------------------------------------------------------------------------
    def long_filters(self, L: int):
        """filters (order - 1, D, L) and skip terms (order - 1, D) of the long convolutions, in float32 for a
        half-precision model."""
        if L > self.l_max:
            raise ValueError(f"Hyena's filters are defined up to l_max={self.l_max} tokens (history included); "
                             f"got {L}")
        h = self.filter_fn.filter(L)  # (L, (order - 1) D), channel n D + d
        bias = to_core_dtype(self.filter_fn.bias).view(self.order - 1, self.d_model)
        return h.T.reshape(self.order - 1, self.d_model, L), bias

    def _gated_inputs(self, x: torch.Tensor, conv_state: Optional[torch.Tensor]):
        """x (B, L, D) -> gates (order, B, D, L), v (B, D, L), final short-conv state (B, inner, width-1).
        The convolution and everything after it run in float32 under autocast and in a half-precision model."""
        u = to_core_dtype(self.in_proj(x)).transpose(1, 2)  # (B, (order + 1) D, L)
        u, conv_final = causal_conv1d(u, *_short_filter_parameters(self.short_filter),
                                      None if conv_state is None else to_core_dtype(conv_state),
                                      return_final_state=True)
        *gates, v = u.split(self.d_model, dim=1)
        return torch.stack(gates), v, conv_final.to(state_dtype(x.dtype, "cache"))

    def state_spec(self, batch_size: int):
        # conv: the last inputs of the short convolution, kept exactly; history: products of gates computed
        # in the core's precision (float32 in a half-precision model), the inputs of the long convolutions
        return {"conv": ((batch_size, (self.order + 1) * self.d_model, self.short_filter_order - 1), "cache"),
                "history": ((batch_size, self.order - 1, self.d_model, None), "real")}

    def _forward(self, x: torch.Tensor, state: Optional[State], return_state: bool):
        conv0 = state[self.state_key("conv")] if state is not None else None
        history = state[self.state_key("history")] if state is not None else None
        with ssm_core_precision(x):  # short and long convolutions in float32 under autocast
            gates, v, conv_final = self._gated_inputs(x, conv0)
            past = 0 if history is None else history.shape[-1]
            filters, bias = self.long_filters(past + x.shape[1])
            filters, bias = filters.to(v.dtype), bias.to(v.dtype)
            if history is None or past == 0:
                y = hyena_recurrence(gates, v, filters, bias)
                inputs = None
                if return_state:  # the input of each long convolution, for the next call
                    inputs, u = [], v
                    for n in range(self.order - 1):
                        inputs.append(u * gates[self.order - 1 - n])
                        u = fft_conv(inputs[-1], filters[n], bias[n])
                    inputs = torch.stack(inputs, 1)
            else:  # continue: each long convolution runs over its history followed by the new inputs
                u, inputs = v, []
                for n in range(self.order - 1):
                    full = torch.cat([history[:, n], u * gates[self.order - 1 - n]], -1)  # (B, D, T + L)
                    inputs.append(full[..., past:])
                    u = fft_conv(full, filters[n], bias[n])[..., past:]
                y = u * gates[0]
                inputs = torch.stack(inputs, 1)
        new_state = None
        if return_state:
            new_history = inputs if history is None else torch.cat([history, inputs.to(history.dtype)], -1)
            new_state = {self.state_key("conv"): conv_final,
                         self.state_key("history"): new_history.to(state_dtype(x.dtype))}
        return self.out_proj(y.transpose(1, 2).to(x.dtype)), new_state

    def _step(self, x_t: torch.Tensor, state: State):
        history = state[self.state_key("history")]
        past = history.shape[-1]
        u_all = to_core_dtype(self.in_proj(x_t))  # (B, inner)
        with ssm_core_precision(x_t):  # as in forward: float32 under autocast and in a half-precision model
            u_all, conv = causal_conv1d_update(u_all, to_core_dtype(state[self.state_key("conv")]),
                                               *_short_filter_parameters(self.short_filter))
            *gates, v = u_all.split(self.d_model, dim=1)
            filters, bias = self.long_filters(past + 1)
            u, inputs = v, []
            for n in range(self.order - 1):
                w_t = u * gates[self.order - 1 - n]  # (B, D)
                inputs.append(w_t)
                full = torch.cat([history[:, n], w_t[..., None]], -1)  # (B, D, T + 1)
                u = (filters[n].flip(-1) * full).sum(-1) + bias[n] * w_t  # sum_s h_{T - s} w_s
            y = u * gates[0]
            new_history = torch.cat([history, torch.stack(inputs, 1)[..., None].to(history.dtype)], -1)
        return self.out_proj(y.to(x_t.dtype)), {self.state_key("conv"): conv.to(state_dtype(x_t.dtype, "cache")),
                                                self.state_key("history"): new_history}

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def distill(self, n_modes: int = 16, length: Optional[int] = None) -> "DistilledHyena":
        """A constant-state copy whose long filters are diagonal SSMs of ``n_modes`` complex modes fitted to
        this layer's filters over lags 0 .. length-1 (default l_max) (Laughing Hyena, Sec. 3). The copy shares
        this layer's projections, short convolution and skip terms; its filter beyond ``length`` continues
        the fitted modes. Check :meth:`DistilledHyena.fitting_error` before trusting it."""
        length = self.l_max if length is None else check_positive_int("length", length)
        filters, _ = self.long_filters(length)
        poles, residues, error = fit_modal(filters.reshape(-1, length), n_modes)
        return DistilledHyena(self, poles.view(self.order - 1, self.d_model, n_modes),
                              residues.view(self.order - 1, self.d_model, n_modes),
                              error.view(self.order - 1, self.d_model))


class DistilledHyena(Mixer):
    """Hyena with each long filter replaced by a fitted diagonal SSM (made by :meth:`Hyena.distill`).

    h^n_t ~ Re(sum_k R_k lambda_k^t): the recurrence z_t = lambda z_{t-1} + w_t, out_t = Re(R . z_t) + b w_t
    per channel and mode (w_t the gated input of that convolution); the parallel pass convolves with the
    modal kernel by FFT (:func:`ssmkit.ops.kernel_vandermonde` with Bbar = 1, C = R / 2). Not registered
    (it is made from a trained Hyena, not built from a config); its state keys start with "hyena_distilled.".

    State: ``conv`` (batch, (order + 1) D, width - 1) as Hyena's; ``z`` (batch, order - 1, D, n) complex.
    """

    name = "hyena_distilled"
    pattern_letter = None

    def __init__(self, source: Hyena, poles: torch.Tensor, residues: torch.Tensor, error: torch.Tensor):
        super().__init__(source.d_model)
        self.order, self.n_modes = source.order, poles.shape[-1]
        self.in_proj, self.out_proj, self.short_filter = source.in_proj, source.out_proj, source.short_filter
        self.bias = source.filter_fn.bias
        # float32 for a half-precision source (the fit ran on float32 filters, and lambda^t over thousands of
        # steps needs the precision); real views, so a later .to(dtype) converts them with the rest of the module
        dtype = to_core_dtype(source.filter_fn.bias).dtype
        self.register_buffer("log_poles", torch.view_as_real(torch.log(poles)).to(dtype))
        self.register_buffer("residues", torch.view_as_real(residues).to(dtype))
        self.register_buffer("error", error.to(dtype))

    def fitting_error(self) -> torch.Tensor:
        """(order - 1, D): relative L2 error ||h - h_fit|| / ||h|| of each fitted filter over the fit length."""
        return self.error

    def modes(self):
        """log lambda and R, each (order - 1, D, n) complex (complex64 for a half-precision model)."""
        return torch.view_as_complex(to_core_dtype(self.log_poles)), torch.view_as_complex(to_core_dtype(self.residues))

    def state_spec(self, batch_size: int):
        width = self.short_filter.weight.shape[-1]
        return {"conv": ((batch_size, (self.order + 1) * self.d_model, width - 1), "cache"),
                "z": ((batch_size, self.order - 1, self.d_model, self.n_modes), "complex")}

    def _forward(self, x: torch.Tensor, state: Optional[State], return_state: bool):
        conv0 = state[self.state_key("conv")] if state is not None else None
        z0 = state[self.state_key("z")] if state is not None else None
        u = to_core_dtype(self.in_proj(x)).transpose(1, 2)
        with ssm_core_precision(x):  # as Hyena: float32 under autocast and in a half-precision model
            u, conv_final = causal_conv1d(u, *_short_filter_parameters(self.short_filter),
                                          None if conv0 is None else to_core_dtype(conv0), return_final_state=True)
            *gates, v = u.split(self.d_model, dim=1)
            log_poles, residues = self.modes()
            bias = to_core_dtype(self.bias).view(self.order - 1, self.d_model)
            L = x.shape[1]
            u, finals = v, []
            for n in range(self.order - 1):
                w = u * gates[self.order - 1 - n]
                ones = torch.ones_like(residues[n])
                u = fft_conv(w, kernel_vandermonde(log_poles[n], ones, residues[n] / 2, L), bias[n])
                if z0 is not None:
                    u = u + initial_state_response(log_poles[n], residues[n] / 2, z0[:, n], L)
                if return_state:
                    finals.append(final_state(log_poles[n], ones, w, None if z0 is None else z0[:, n]))
            y = u * gates[0]
        new_state = None
        if return_state:
            new_state = {self.state_key("conv"): conv_final.to(state_dtype(x.dtype, "cache")),
                         self.state_key("z"): torch.stack(finals, 1).to(state_dtype(x.dtype, "complex"))}
        return self.out_proj(y.transpose(1, 2).to(x.dtype)), new_state

    def _step(self, x_t: torch.Tensor, state: State):
        u_all = to_core_dtype(self.in_proj(x_t))  # (B, inner)
        with ssm_core_precision(x_t):
            u_all, conv = causal_conv1d_update(u_all, to_core_dtype(state[self.state_key("conv")]),
                                               *_short_filter_parameters(self.short_filter))
            *gates, v = u_all.split(self.d_model, dim=1)
            log_poles, residues = self.modes()
            bias = to_core_dtype(self.bias).view(self.order - 1, self.d_model)
            z = state[self.state_key("z")]
            u, zs = v, []
            for n in range(self.order - 1):
                w = u * gates[self.order - 1 - n]
                z_n = torch.exp(log_poles[n]) * z[:, n] + w[..., None]
                zs.append(z_n)
                u = (residues[n] * z_n).sum(-1).real + bias[n] * w
            y = u * gates[0]
        return self.out_proj(y.to(x_t.dtype)), {self.state_key("conv"): conv.to(state_dtype(x_t.dtype, "cache")),
                                                self.state_key("z"): torch.stack(zs, 1)}


def _short_filter_parameters(conv: nn.Conv1d):
    """Weight and bias of the short depthwise convolution in the core's dtype (float32 for a half model)."""
    return to_core_dtype(conv.weight), None if conv.bias is None else to_core_dtype(conv.bias)
