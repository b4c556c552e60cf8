"""RWKV-7 "Goose": the time mix (generalised delta rule) and the channel mix, each a mixer.

Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution", arXiv 2503.14456, Sec. 4 (the
architecture: the time mix's weight preparation, the WKV state update, its output, and the channel mix, a
ReLU^2 MLP with token shift). Sub-section and equation numbers are not cited: they were not checked against
the paper here; the formulas below are those of the authors' code. An RWKV-7 layer is two
residual sub-blocks, x += time_mix(ln1(x)); x += channel_mix(ln2(x)), which in ssmkit is two layers of one
model, ``ModelConfig(mixer="RK" * n_layers, mlp="none")`` (``R`` = ``rwkv7``, ``K`` = ``rwkv7_channel_mix``,
whose class is in ``layers/rwkv7_channel_mix.py`` since each mixer has its own file).

Time mix, read top to bottom (x of (batch, L, C), heads of size N, H = C / N; x_{t-1} the token shift):

    x^s   = x_t + (x_{t-1} - x_t) * mu_s                for s in r, w, k, v, a, g          token shift (lerp)
    r     = W_r x^r,  k = W_k x^k,  v = W_v x^v                                             (B, L, C)
    d     = w0 + tanh(x^w A_w) B_w;   log w_t = -exp(-0.5 - softplus(-d))  in (-e^-0.5, 0)  decay
    alpha = sigmoid(a0 + x^a A_a B_a)                                    in-context learning rate
    g     = sigmoid(x^g A_g) B_g                                         output gate
    kappa_hat = normalize_per_head(k * xi)                               removal key (xi = ``k_k``)
    k~    = k * (1 + (alpha - 1) * ``k_a``)                              replacement key
    S_t   = S_{t-1} (diag(w_t) - kappa_hat_t^T (alpha_t * kappa_hat_t)) + v_t^T k~_t      (ops.rwkv7)
    y_t   = GroupNorm_H(S_t r_t) + (sum_n r_t k~_t rho)_head v_t         rho = ``r_k`` the bonus
    out   = W_o (y * g)

Channel mix: k = relu(W_k (x_t + (x_{t-1} - x_t) * mu_k))^2, out = W_v k (hidden 4 C).

Parameter names, shapes and initialisation are those of the authors' training code (BlinkDL/RWKV-LM,
RWKV-v7 ``RWKV_Tmix_x070`` / ``RWKV_CMix_x070``): ``x_r, x_w, x_k, x_v, x_a, x_g`` (1, 1, C), ``w0`` (1, 1, C),
``w1`` (C, D_w), ``w2`` (D_w, C), ``a0, a1, a2``, ``g1, g2``, ``k_k, k_a`` (1, 1, C), ``r_k`` (H, N),
``receptance, key, value, output`` (bias-free linears), ``ln_x`` (GroupNorm(H, C, eps=64e-5)); channel mix
``x_k``, ``key`` (C -> 4C), ``value`` (4C -> C). Their initialisation depends on the layer's depth, so both
classes take ``layer_id`` and ``n_layers`` (defaults: the first layer of one): token-shift mixes
1 - (i / C)^(p * (1 - layer_id / n_layers)); the decay bias w0 = -6 + 6 (i / (C-1))^(1 + (layer_id / (n_layers
- 1))^0.3) + 0.5 + 2.5 z|z| (z the position in the head scaled to [-1, 1]); the low-rank second factors
orthogonal with gain 0.1 (times sqrt(rows / cols) for tall ones), first factors zero; r ~ U(+-0.5/sqrt C),
k ~ U(+-0.05/sqrt C), v ~ U(+-0.5/sqrt C), output = 0; channel-mix key ~ U(+-0.5/sqrt C), value = 0.

Value residual (``value_residual=True``; the authors' layers 1 and up): each later time mix pulls its value
toward the first time mix's, per token and channel,

    v <- v + (v_first - v) * sigmoid(v0 + (x^v A_v) B_v)          ``v0`` (1, 1, C) = 1, ``v1`` = 0, ``v2`` ortho 0.1

where v_first is the value v of the model's first time mix at the same token. That is a path between layers:
the model passes a dict ``cross_layer`` through its layers (``Mixer.cross_layer``), into which a time mix
without the residual writes ``cross_layer["v_first"]`` and from which one with it reads. A model sets
``value_residual`` on every time mix after its first (``RWKV7.model_kwargs``). v_first is per token, so the
recurrent state holds nothing for it. Not here: the model builds every time mix with ``layer_id=0`` (the
depth-dependent initialisation of the other parameters is the authors' layer 0).

Glossary (code name: paper symbol):

=======================  =============================================================================
``d_model``              C (D in the paper), the model width
``head_size``            N, the head size (64 in the authors' models); ``n_heads`` H = C / N
``x_r .. x_g``           mu_r .. mu_g, the token-shift interpolation weights
``w0, w1, w2``           the decay's bias and low-rank pair; w_t = exp(-exp(-0.5 - softplus(-d_t)))
``a0, a1, a2``           the in-context learning rate alpha's bias and low-rank pair
``g1, g2``               the output gate's low-rank pair
``v0, v1, v2``           the value residual's bias and low-rank pair (layers after the first)
``k_k``                  xi, the removal key's scale (kappa = k * xi, normalised per head: kappa_hat)
``k_a``                  the replacement key's mix with alpha (k~ = k * (1 + (alpha - 1) * k_a))
``r_k``                  rho, the per-head "bonus" weights of the current token
``ln_x``                 the per-head GroupNorm of the WKV output
state ``wkv``            S, (batch, H, N, N) as (value, key), the authors' layout
state ``shift``          x_{t-1}, the previous token's input, (batch, C)
=======================  =============================================================================
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int
from ..ops.rwkv7 import BACKENDS as WKV7_BACKENDS
from ..ops.rwkv7 import wkv7, wkv7_step
from .base import Mixer, State, ssm_core_precision, state_dtype, to_core_dtype
from .registry import register_mixer

#: the GroupNorm epsilon of the authors' ln_x (1e-5 * head_size_divisor^2 with their divisor 8)
LN_X_EPS = 64e-5


def _low_rank_dim(d_model: int, factor: float, power: float) -> int:
    """The authors' suggested low-rank width: max(32, round(factor * C^power / 32) * 32)."""
    return max(32, int(round(factor * d_model ** power / 32) * 32))


def _orthogonal_(weight: torch.Tensor, scale: float) -> None:
    """The authors' ``ortho_init``: orthogonal, gain scale * sqrt(rows / cols) for tall matrices."""
    rows, cols = weight.shape
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    nn.init.orthogonal_(weight, gain=gain * scale)


def _channel_fraction(d_model: int) -> torch.Tensor:
    """i / C for channel i, shaped (1, 1, C) like the authors' token-shift parameters."""
    return (torch.arange(d_model, dtype=torch.float64) / d_model).reshape(1, 1, d_model)


def _shifted(x: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
    """x_{t-1} for every t of x (B, L, C): the previous token, the state's last token (zeros) at t = 0."""
    first = torch.zeros_like(x[:, :1]) if previous is None else previous.to(x.dtype).unsqueeze(1)
    return torch.cat([first, x[:, :-1]], dim=1)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {value!r}")
    return value


def _check_depth(layer_id, n_layers) -> Tuple[int, int]:
    n_layers = check_positive_int("n_layers", n_layers)
    layer_id = check_positive_int("layer_id", layer_id, minimum=0)
    if layer_id >= n_layers:
        raise ValueError(f"layer_id must be < n_layers={n_layers}; got {layer_id}")
    return layer_id, n_layers


@register_mixer("rwkv7")
class RWKV7(Mixer):
    """RWKV-7 time mix (module docstring for the equations).

    Args:
        d_model: C.
        head_size: N (must divide d_model); H = C / N heads. None: the authors' 64, or d_model if smaller.
        layer_id, n_layers: the layer's depth, which only the initialisation reads (as the authors').
        decay_low_rank_dim, a_low_rank_dim, gate_low_rank_dim: widths of the low-rank pairs; None = the
            authors' suggestions max(32, round(2.5 sqrt C / 32) 32), the same, max(32, round(5 C^0.8 / 32) 32).
        zero_init_output: the authors' zero ``output`` weight (True), or U(+-0.5 / sqrt C) like ``receptance``.
        value_residual: mix v with the first time mix's (module docstring): adds ``v0, v1, v2``, and
            forward and step then need ``cross_layer`` holding ``"v_first"`` (a model passes it).
        value_low_rank_dim: width of ``v1, v2``; None = the authors' max(32, round(1.7 sqrt C / 32) 32).
        chunk_size: the chunk length of the chunked WKV backend (execution only).
        backend: "auto", "chunked" or "reference" for the WKV core; execution only, not saved in a model
            configuration. ``last_backend`` names the one that ran.

    Shapes: forward x (batch, L, d_model) -> (batch, L, d_model); step x_t (batch, d_model).
    """

    pattern_letter = "R"
    # zero_init_output=False: the suite's thresholds (an output that moves by > 1e-3, gradients within a few
    # half-precision roundoffs of their own scale) need a mixer whose output is not zero at initialisation
    contract_config = dict(head_size=4, decay_low_rank_dim=4, a_low_rank_dim=3, gate_low_rank_dim=5,
                           zero_init_output=False)
    contract_backends = ("chunked", "reference")
    ssm_parameter_names = ("w0", "w1", "w2", "a0", "a1", "a2")
    depth_scaled = ("output.weight",)
    main_op = "wkv7"
    cross_layer = True

    @classmethod
    def model_kwargs(cls, position: int, count: int):
        """The value residual on every time mix of a model after its first (the authors' layers >= 1)."""
        return {"value_residual": position > 0}

    def __init__(self, d_model: int, head_size: Optional[int] = None, layer_id: int = 0, n_layers: int = 1,
                 decay_low_rank_dim: Optional[int] = None, a_low_rank_dim: Optional[int] = None,
                 gate_low_rank_dim: Optional[int] = None, zero_init_output: bool = True, chunk_size: int = 16,
                 backend: Optional[str] = "auto", value_residual: bool = False,
                 value_low_rank_dim: Optional[int] = None):
        super().__init__(d_model)
        # the authors' 64, or the whole width in a model narrower than that
        self.head_size = min(64, d_model) if head_size is None else check_positive_int("head_size", head_size)
        if d_model % self.head_size:
            raise ValueError(f"head_size must divide d_model; got d_model={d_model}, head_size={self.head_size}")
        self.n_heads = d_model // self.head_size
        self.layer_id, self.n_layers = _check_depth(layer_id, n_layers)
        self.zero_init_output = _check_bool("zero_init_output", zero_init_output)
        self.value_residual = _check_bool("value_residual", value_residual)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        if backend is not None:
            check_choice("backend", backend, WKV7_BACKENDS)
        self.backend = backend
        C, H, N = d_model, self.n_heads, self.head_size
        dims = {}
        for name, value, factor, power in (("decay_low_rank_dim", decay_low_rank_dim, 2.5, 0.5),
                                           ("a_low_rank_dim", a_low_rank_dim, 2.5, 0.5),
                                           ("gate_low_rank_dim", gate_low_rank_dim, 5.0, 0.8)):
            dims[name] = _low_rank_dim(C, factor, power) if value is None else check_positive_int(name, value)
        self.decay_low_rank_dim, self.a_low_rank_dim, self.gate_low_rank_dim = dims.values()
        self.value_low_rank_dim = None
        if self.value_residual:
            self.value_low_rank_dim = (_low_rank_dim(C, 1.7, 0.5) if value_low_rank_dim is None
                                       else check_positive_int("value_low_rank_dim", value_low_rank_dim))
            self.v0 = nn.Parameter(torch.empty(1, 1, C))
            self.v1 = nn.Parameter(torch.empty(C, self.value_low_rank_dim))
            self.v2 = nn.Parameter(torch.empty(self.value_low_rank_dim, C))
        elif value_low_rank_dim is not None:
            raise ValueError(f"value_low_rank_dim is for value_residual=True; got {value_low_rank_dim!r} with "
                             "value_residual=False")

        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.w1 = nn.Parameter(torch.empty(C, self.decay_low_rank_dim))
        self.w2 = nn.Parameter(torch.empty(self.decay_low_rank_dim, C))
        self.a1 = nn.Parameter(torch.empty(C, self.a_low_rank_dim))
        self.a2 = nn.Parameter(torch.empty(self.a_low_rank_dim, C))
        self.g1 = nn.Parameter(torch.empty(C, self.gate_low_rank_dim))
        self.g2 = nn.Parameter(torch.empty(self.gate_low_rank_dim, C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation (module docstring), for this layer's depth."""
        C, N = self.d_model, self.head_size
        ratio_0_to_1 = self.layer_id / max(self.n_layers - 1, 1)
        ratio_1_to_almost_0 = 1.0 - self.layer_id / self.n_layers
        fraction = _channel_fraction(C)
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(self, name).copy_(1.0 - fraction ** (power * ratio_1_to_almost_0))
        channel = torch.arange(C, dtype=torch.float64)
        linear = channel / max(C - 1, 1) - 0.5                                      # -0.5 .. 0.5 over channels
        zigzag = ((channel % N) - (N - 1) / 2) / max((N - 1) / 2, 1e-12)            # -1 .. 1 inside each head
        zigzag = zigzag * zigzag.abs()
        decay_speed = -6 + 6 * (channel / max(C - 1, 1)) ** (1 + ratio_0_to_1 ** 0.3)
        self.w0.copy_((decay_speed + 0.5 + 2.5 * zigzag).reshape(1, 1, C))          # 0.5: softplus(0)'s share
        self.a0.copy_((-0.19 + 0.3 * zigzag + 0.4 * linear).reshape(1, 1, C))
        self.k_k.copy_((0.71 - 0.1 * linear).reshape(1, 1, C))
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        pairs = [(self.w1, self.w2), (self.a1, self.a2), (self.g1, self.g2)]
        if self.value_residual:
            self.v0.fill_(1.0)
            pairs.append((self.v1, self.v2))
        for first, second in pairs:
            first.zero_()
            _orthogonal_(second, 0.1)
        bound = 1.0 / math.sqrt(C)
        self.receptance.weight.uniform_(-0.5 * bound, 0.5 * bound)
        self.key.weight.uniform_(-0.05 * bound, 0.05 * bound)
        self.value.weight.uniform_(-0.5 * bound, 0.5 * bound)
        if self.zero_init_output:
            self.output.weight.zero_()
        else:
            self.output.weight.uniform_(-0.5 * bound, 0.5 * bound)
        self.ln_x.reset_parameters()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, head_size={self.head_size}, n_heads={self.n_heads}, "
                f"layer_id={self.layer_id}, n_layers={self.n_layers}, value_residual={self.value_residual}, "
                f"backend={self.backend!r}")

    def state_spec(self, batch_size: int):
        return {"shift": ((batch_size, self.d_model), "cache"),
                "wkv": ((batch_size, self.n_heads, self.head_size, self.head_size), "real")}

    # ----------------------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor, x_prev: torch.Tensor, cross_layer: Optional[dict]):
        """x, x_{t-1} (B, L, C) -> the WKV inputs r, log w, k~, v, a = -kappa_hat, b = kappa_hat * alpha, each
        (B, L, H, N), and the gate g (B, L, C). Writes or reads ``cross_layer["v_first"]`` (B, L, C)."""
        batch, length, _ = x.shape
        heads = (batch, length, self.n_heads, self.head_size)
        shift = x_prev - x
        x_r, x_k, x_v, x_a, x_g = (x + shift * mu for mu in (self.x_r, self.x_k, self.x_v, self.x_a, self.x_g))
        r = self.receptance(x_r)
        with ssm_core_precision(x):
            # The decay in float32 from float32 copies of its parameters in a half-precision model: a decay near
            # 1 is resolved to ~5e-4 in float16 (a horizon error of 50% at w = 0.999), and the gradients of this
            # low-rank path (through zero-initialised w1) fall below float16's normal range.
            x_w = to_core_dtype(x) + to_core_dtype(shift) * to_core_dtype(self.x_w)
            d = to_core_dtype(self.w0) + torch.tanh(x_w @ to_core_dtype(self.w1)) @ to_core_dtype(self.w2)
            # soft-clamped to (-inf, -0.5): each step's decay w = exp(-exp(.)) stays in (exp(-e^-0.5), 1)
            log_w = -torch.exp(-F.softplus(-d) - 0.5)                              # log w_t, (B, L, C)
        k = self.key(x_k)
        v = self._value_residual(self.value(x_v), x_v, cross_layer)
        alpha = torch.sigmoid(self.a0 + (x_a @ self.a1) @ self.a2)                 # in-context learning rate
        g = torch.sigmoid(x_g @ self.g1) @ self.g2
        kappa_hat = F.normalize((k * self.k_k).view(heads), dim=-1, p=2.0)         # (B, L, H, N)
        k = k * (1 + (alpha - 1) * self.k_a)                                       # replacement key k~
        wkv_in = (r.view(heads), log_w.view(heads), k.view(heads), v.view(heads), -kappa_hat,
                  kappa_hat * alpha.view(heads))
        return wkv_in, g

    def _value_residual(self, v: torch.Tensor, x_v: torch.Tensor, cross_layer: Optional[dict]) -> torch.Tensor:
        """v -> v + (v_first - v) sigmoid(v0 + x^v A_v B_v) with the residual; without it, v, written to
        ``cross_layer`` as the first layer's value."""
        if not self.value_residual:
            if cross_layer is not None:
                cross_layer["v_first"] = v
            return v
        v_first = None if cross_layer is None else cross_layer.get("v_first")
        if v_first is None:
            raise ValueError("a time mix with value_residual=True needs the first time mix's value: pass "
                             "cross_layer={'v_first': v_first} (an SSMModel passes it from its first RWKV-7 layer)")
        if v_first.shape != v.shape:
            raise ValueError(f"cross_layer['v_first'] must have the shape of this layer's v, {tuple(v.shape)}; "
                             f"got {tuple(v_first.shape)}")
        return v + (v_first.to(v.dtype) - v) * torch.sigmoid(self.v0 + (x_v @ self.v1) @ self.v2)

    def _output(self, y: torch.Tensor, r, k, v, g) -> torch.Tensor:
        """WKV output y (B, L, H, N) -> (B, L, C): per-head GroupNorm, the current token's bonus, gate, W_o."""
        batch, length = y.shape[:2]
        y = self.ln_x(y.reshape(batch * length, self.d_model)).view(batch, length, self.d_model)
        bonus = (r * k * self.r_k).sum(dim=-1, keepdim=True) * v                  # (B, L, H, N)
        return self.output((y + bonus.reshape(batch, length, self.d_model)) * g)

    def _forward(self, x, state, return_state, cross_layer: Optional[dict] = None):
        previous = None if state is None else state[self.state_key("shift")]
        wkv0 = None if state is None else state[self.state_key("wkv")]
        (r, log_w, k, v, a, b), g = self._prepare(x, _shifted(x, previous), cross_layer)
        with ssm_core_precision(x):
            y, wkv_final = wkv7(*(to_core_dtype(t) for t in (r, log_w, k, v, a, b)), initial_state=wkv0,
                                return_final_state=True, chunk_size=self.chunk_size)
        out = self._output(y.to(x.dtype), r, k, v, g)
        if not return_state:
            return out, None
        return out, {self.state_key("shift"): x[:, -1].to(state_dtype(x.dtype, "cache")),
                     self.state_key("wkv"): wkv_final.to(state_dtype(x.dtype))}

    def _step(self, x_t: torch.Tensor, state: State, cross_layer: Optional[dict] = None
              ) -> Tuple[torch.Tensor, State]:
        x = x_t.unsqueeze(1)                                                       # (B, 1, C)
        # a step's cross_layer["v_first"] is (B, C); _prepare reads and writes it as (B, 1, C)
        one = None
        if cross_layer is not None:
            one = {k: t.unsqueeze(1) for k, t in cross_layer.items() if k == "v_first"}
        (r, log_w, k, v, a, b), g = self._prepare(x, state[self.state_key("shift")].to(x.dtype).unsqueeze(1), one)
        if one is not None and "v_first" in one:
            cross_layer["v_first"] = one["v_first"][:, 0]
        with ssm_core_precision(x_t):
            y_t, wkv = wkv7_step(*(to_core_dtype(t[:, 0]) for t in (r, log_w, k, v, a, b)),
                                 state[self.state_key("wkv")])
        out = self._output(y_t.to(x_t.dtype).unsqueeze(1), r, k, v, g)[:, 0]
        return out, {self.state_key("shift"): x_t.to(state_dtype(x_t.dtype, "cache")),
                     self.state_key("wkv"): wkv.to(state_dtype(x_t.dtype))}
