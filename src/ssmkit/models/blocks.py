"""Building blocks of a model: norms, MLPs (gated, plain, mixture of experts) and the pre-norm residual block.

Block (pre-norm residual, as in Mamba and transformers' MambaBlock):

    h = x + mixer(norm(x))              # the residual stream is kept in float32 when residual_in_fp32
    h = h + mlp(norm2(h))               # only when the layer has an MLP

A layer whose mixer is "none" (Nemotron-H's MLP-only layers) has only the second line, and an empty state.

The mixer's state passes through unchanged in shape, so a block runs in parallel (``forward``) or one token
at a time (``step``) exactly like its mixer.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.registry import build_mixer
from .config import NO_MIXER


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as transformers' MambaRMSNorm)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        x32 = F.rms_norm(x32, x32.shape[-1:], eps=self.eps)  # one fused kernel on CUDA
        return self.weight * x32.to(dtype)


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    return RMSNorm(d, eps) if kind == "rmsnorm" else nn.LayerNorm(d, eps=eps)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (So et al. 2021, "Primer", Sec. 4), Nemotron-H's MLP activation."""
    return torch.square(F.relu(x))


#: ModelConfig.mlp_activation -> function (gelu is the exact erf form)
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "relu2": relu_squared}


class GatedMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU (Shazeer 2020) with act = silu."""

    def __init__(self, d_model: int, hidden: int, activation: str = "silu"):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):
    """Two-layer MLP without a gate: down(act(up(x))) (Nemotron-H's, with act = relu2)."""

    def __init__(self, d_model: int, hidden: int, activation: str = "relu2"):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class MoE(nn.Module):
    """Mixture of gated-MLP experts with top-k routing (Switch/Mixtral style).

    Each token goes to its ``top_k`` experts, weighted by the router's softmax renormalised over them
    (``renormalize=True``, Mixtral) or as the softmax gave them (``renormalize=False``, Jamba).
    ``aux_loss`` after a forward is the load-balancing loss  E * sum_e f_e P_e  (Switch Transformer, eq. 4),
    f_e the fraction of routed slots given to expert e and P_e its mean router probability; it is 1 when the
    load is uniform. The model sums it over layers and returns it to the trainer.
    """

    def __init__(self, d_model: int, hidden: int, num_experts: int, top_k: int, activation: str = "silu",
                 renormalize: bool = True, shared_hidden: Optional[int] = None):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(GatedMLP(d_model, hidden, activation) for _ in range(num_experts))
        # a shared expert every token goes through beside its routed ones (DeepSeekMoE, Granite-4.0-H)
        self.shared_expert = GatedMLP(d_model, shared_hidden, activation) if shared_hidden else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (T, D)
        probs = torch.softmax(self.router(tokens).float(), dim=-1)  # (T, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (T, k)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot, None])
        load = F.one_hot(chosen, self.num_experts).float().sum((0, 1)) / chosen.numel()  # f_e
        aux = self.num_experts * (load * probs.mean(0)).sum()
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.reshape(shape), aux


class Block(nn.Module):
    """Pre-norm residual block around one mixer (and an optional MLP)."""

    def __init__(self, config, layer_idx: int, mixer_name: str):
        super().__init__()
        d = config.d_model
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.residual_multiplier = float(config.residual_multiplier)
        self.norm = self.mixer = self.mixer_bwd = None
        if mixer_name != NO_MIXER:
            self.norm = make_norm(config.norm, d, config.norm_eps)
            self.mixer = build_mixer(mixer_name, d, **config.kwargs_for(mixer_name))
            # bidirectional (classifiers only): a second mixer reads the sequence backwards
            if config.bidirectional:
                self.mixer_bwd = build_mixer(mixer_name, d, **config.kwargs_for(mixer_name))
        self.mlp = None
        kind = config.layer_mlps()[layer_idx]
        if kind != "none":
            self.norm2 = make_norm(config.norm, d, config.norm_eps)
            act = config.mlp_activation
            if kind == "gated":
                self.mlp = GatedMLP(d, config.mlp_hidden or 4 * d, act)
            elif kind == "plain":
                self.mlp = PlainMLP(d, config.mlp_hidden or 4 * d, act)
            else:
                self.mlp = MoE(d, config.mlp_hidden or 2 * d, config.num_experts, config.top_k, act,
                               config.moe_renormalize, config.moe_shared_hidden)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        """The mixer's zero state; an MLP-only layer has none ({})."""
        return {} if self.mixer is None else self.mixer.init_state(batch_size, device=device, dtype=dtype)

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if self.residual_in_fp32 and x.dtype in (torch.float16, torch.bfloat16) else x

    def _mlp(self, h: torch.Tensor, need_aux: bool = True):
        if self.mlp is None:
            return h, (h.new_zeros(()) if need_aux else None)
        out = self.mlp(self.norm2(h.to(self.norm2.weight.dtype)))
        if isinstance(out, tuple):
            out, aux = out
        else:
            aux = h.new_zeros(()) if need_aux else None
        return h + self._scaled(out), aux

    def _scaled(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.residual_multiplier == 1.0 else y * self.residual_multiplier

    def forward(self, x: torch.Tensor, state: Optional[dict] = None, return_state: bool = False, **mixer_kwargs):
        """x (B, L, D) -> (h (B, L, D), new_state or None, aux_loss scalar)."""
        if self.mixer is None:
            h, aux = self._mlp(self._residual(x))
            return h, ({} if return_state else None), aux
        normed = self.norm(x.to(self.norm.weight.dtype))
        if self.mixer_bwd is not None:
            if state is not None or return_state:
                raise ValueError("a bidirectional block reads the future and has no recurrent state")
            y = self.mixer(normed) + self.mixer_bwd(normed.flip(1)).flip(1)
            new_state = None
        elif return_state:
            y, new_state = self.mixer(normed, state, return_state=True, **mixer_kwargs)
        else:
            y, new_state = self.mixer(normed, state, **mixer_kwargs), None
        h, aux = self._mlp(self._residual(x) + self._scaled(y))
        return h, new_state, aux

    def step(self, x_t: torch.Tensor, state: dict):
        """x_t (B, D) -> (h_t (B, D), new_state)."""
        if self.mixer is None:
            return self._mlp(self._residual(x_t))[0], {}
        y, new_state = self.mixer.step(self.norm(x_t.to(self.norm.weight.dtype)), state)
        h, _ = self._mlp(self._residual(x_t) + self._scaled(y), need_aux=False)
        return h, new_state

    def step_inplace(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """``step`` writing the mixer's new state into ``state`` (see ``Mixer.step_inplace``): x_t -> h_t."""
        if self.mixer is None:
            return self._mlp(self._residual(x_t), need_aux=False)[0]
        y = self.mixer.step_inplace(self.norm(x_t.to(self.norm.weight.dtype)), state)
        h, _ = self._mlp(self._residual(x_t) + self._scaled(y), need_aux=False)
        return h
