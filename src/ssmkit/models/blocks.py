"""Building blocks of a model: norms, MLPs (gated, plain, mixture of experts) and the pre-norm residual block.

Block (pre-norm residual, as in Mamba and transformers' MambaBlock):

    h = x + mixer(norm(x))              # the residual stream is kept in float32 when residual_in_fp32
    h = h + mlp(norm2(h))               # only when the layer has an MLP

A layer whose mixer is "none" (Nemotron-H's MLP-only layers) has only the second line, and an empty state.

A layer that reads the shared block (``ModelConfig.shared_block``; Zamba2) feeds its mixer with more:

    s = out_proj_u(SharedBlock(concat(x, e); adapters_u))     # e: the embeddings, u: this use
    h = x + mixer(norm(x + s))

    SharedBlock(z) = mlp(norm2(attention(norm_in(z))))        # no residual inside; weights shared by its uses

Its attention's KV cache is part of the layer's state, under keys prefixed "shared.".

Values one layer hands to later ones (RWKV-7's first-layer value): a mixer with ``cross_layer`` takes the
dict ``cross_layer`` that the model passes to every block of one forward or step, and a mixer kind's
``model_kwargs(position, count)`` adds to its constructor kwargs by its position among the model's mixers
of that kind.

The mixer's state passes through unchanged in shape, so a block runs in parallel (``forward``) or one token
at a time (``step``) exactly like its mixer.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention import Attention
from ..layers.registry import MIXERS, build_mixer
from .config import NO_MIXER, PARALLEL_SEP, parallel_parts

SHARED_STATE_PREFIX = "shared."


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (weight_offset + weight), computed in float32 (as transformers'
    MambaRMSNorm). ``weight_offset=1`` is Gemma's norm, whose weights are stored as their difference from 1
    (zeros at initialisation) and whose scale multiplies in float32 before rounding to x's dtype."""

    def __init__(self, d: int, eps: float = 1e-5, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.weight_offset = float(weight_offset)
        self.weight = nn.Parameter(torch.full((d,), 1.0 - self.weight_offset))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (f", weight_offset={self.weight_offset}"
                                                            if self.weight_offset else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        x32 = F.rms_norm(x32, x32.shape[-1:], eps=self.eps)  # one fused kernel on CUDA
        if self.weight_offset:
            return (x32 * (self.weight_offset + self.weight.to(x32.dtype))).to(dtype)
        return self.weight * x32.to(dtype)


def make_norm(kind: str, d: int, eps: float, weight_offset: float = 0.0) -> nn.Module:
    return RMSNorm(d, eps, weight_offset) if kind == "rmsnorm" else nn.LayerNorm(d, eps=eps)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (So et al. 2021, "Primer", Sec. 4), Nemotron-H's MLP activation."""
    return torch.square(F.relu(x))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GeLU by its tanh approximation (Hendrycks & Gimpel 2016, Sec. 2), Gemma's and RecurrentGemma's."""
    return F.gelu(x, approximate="tanh")


#: ModelConfig.mlp_activation -> function ("gelu" is the exact erf form)
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu": F.relu, "relu2": relu_squared}


class GatedMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU (Shazeer 2020) with act = silu."""

    def __init__(self, d_model: int, hidden: int, activation: str = "silu", bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):
    """Two-layer MLP without a gate: down(act(up(x))) (Nemotron-H's, with act = relu2)."""

    def __init__(self, d_model: int, hidden: int, activation: str = "relu2", bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

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
                 renormalize: bool = True, bias: bool = False, shared_hidden: Optional[int] = None,
                 router: str = "softmax", groups: int = 1, topk_groups: int = 1, scale: float = 1.0,
                 expert: str = "gated"):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.router_kind, self.groups, self.topk_groups, self.scale = router, groups, topk_groups, float(scale)
        self.router = nn.Linear(d_model, num_experts, bias=False)
        mlp = GatedMLP if expert == "gated" else PlainMLP
        self.experts = nn.ModuleList(mlp(d_model, hidden, activation, bias) for _ in range(num_experts))
        # a shared expert every token goes through beside its routed ones (DeepSeekMoE, Granite-4.0-H)
        self.shared_expert = mlp(d_model, shared_hidden, activation, bias) if shared_hidden else None
        if router == "sigmoid":  # added to the scores only to choose experts (DeepSeek-V3's load balancing)
            self.register_buffer("score_bias", torch.zeros(num_experts))

    def _route(self, logits: torch.Tensor):
        """Router logits (T, E) float32 -> (weights (T, k), chosen (T, k), probabilities (T, E) for aux)."""
        if self.router_kind == "softmax":
            probs = torch.softmax(logits, dim=-1)
            weights, chosen = probs.topk(self.top_k, dim=-1)
            if self.renormalize:
                weights = weights / weights.sum(-1, keepdim=True)
            return weights * self.scale, chosen, probs
        scores = logits.sigmoid()
        choice = scores + self.score_bias.float()
        if self.groups > 1:  # keep the topk_groups groups whose two best experts score highest
            T = choice.shape[0]
            grouped = choice.view(T, self.groups, -1)
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(self.topk_groups, dim=-1).indices  # (T, g)
            keep = torch.zeros(T, self.groups, dtype=torch.bool, device=choice.device).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, -1)
        chosen = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scale, chosen, scores / scores.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (T, D)
        weights, chosen, probs = self._route(self.router(tokens).float())  # (T, k), (T, k), (T, E)
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


class SharedBlock(nn.Module):
    """The weights an attention + MLP block shares across its uses (Zamba2's shared transformer block):
    norm over the input (d_model, or 2 d_model with the embeddings concatenated), attention writing d_model,
    norm2, gated MLP. No residual inside: its use adds the result to a mixer's input (:class:`SharedUse`)."""

    def __init__(self, d_model: int, spec: dict, norm_eps: float):
        super().__init__()
        width = 2 * d_model if spec["concat_embeddings"] else d_model
        self.norm = RMSNorm(width, norm_eps)
        self.attention = Attention(width, n_heads=spec["n_heads"], n_kv_heads=spec["n_kv_heads"],
                                   head_dim=spec["head_dim"], rope=spec["rope"], rope_base=spec["rope_base"],
                                   softmax_scale=spec["softmax_scale"], out_dim=d_model)
        self.norm2 = RMSNorm(d_model, norm_eps)
        self.mlp = GatedMLP(d_model, spec["mlp_hidden"], spec["mlp_activation"])


def _low_rank(d_in: int, rank: int, d_out: int) -> nn.Sequential:
    """x -> B (A x): a rank-``rank`` adapter (LoRA, Hu et al. 2021), B starting at zero."""
    adapter = nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=False))
    nn.init.zeros_(adapter[1].weight)
    return adapter


class SharedUse(nn.Module):
    """One use of a :class:`SharedBlock`: its own adapters (q, k, v and the MLP's gate and up, each low rank)
    and its own output projection. ``forward(block, x, e, state)``: x, e (B, L, D) -> (s (B, L, D), state)."""

    def __init__(self, d_model: int, spec: dict):
        super().__init__()
        self.concat_embeddings = spec["concat_embeddings"]
        width = 2 * d_model if self.concat_embeddings else d_model
        rank = spec["adapter_rank"]
        self.q_adapter = self.k_adapter = self.v_adapter = self.mlp_adapter = None
        if rank is not None:
            self.mlp_adapter = _low_rank(d_model, rank, 2 * spec["mlp_hidden"])  # gate, then up
            if spec["attention_adapters"]:
                heads = spec["n_heads"]
                head_dim = spec["head_dim"] or width // heads
                kv = (spec["n_kv_heads"] or heads) * head_dim
                self.q_adapter = _low_rank(width, rank, heads * head_dim)
                self.k_adapter = _low_rank(width, rank, kv)
                self.v_adapter = _low_rank(width, rank, kv)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, block: SharedBlock, x: torch.Tensor, embeddings: torch.Tensor, state: Optional[dict],
                return_state: bool):
        z = torch.cat([x, embeddings.to(x.dtype)], dim=-1) if self.concat_embeddings else x
        z = block.norm(z.to(block.norm.weight.dtype))                                    # (B, L, 2D)
        deltas = None
        if self.q_adapter is not None:
            deltas = (self.q_adapter(z), self.k_adapter(z), self.v_adapter(z))
        y, new_state = block.attention._forward(z, state, return_state, deltas)          # (B, L, D)
        y = block.norm2(y)
        mlp = block.mlp
        gate, up = mlp.gate_proj(y), mlp.up_proj(y)
        if self.mlp_adapter is not None:
            delta_gate, delta_up = self.mlp_adapter(y).chunk(2, dim=-1)
            gate, up = gate + delta_gate, up + delta_up
        return self.out_proj(mlp.down_proj(mlp.act(gate) * up)), new_state


class ParallelMixers(nn.Module):
    """Several registry mixers run side by side on one input, their outputs combined: summed ("sum",
    Falcon-H1) or averaged ("mean", Hymba), each optionally through its own RMSNorm first (``branch_norm``,
    Hymba). Falcon-H1's constant per-branch scales are scales on the branches' output projections: an importer
    folds them into those weights. A drop-in for one mixer in a :class:`Block`: the same forward / step /
    step_inplace / init_state, its state the union of the branches' (each mixer's keys carry its own name, so
    they cannot collide). Parameters: ``branches.<mixer name>.*``, and ``norms.<mixer name>.weight`` with branch norms.
    """

    def __init__(self, name: str, d_model: int, kwargs_for, combine: str = "sum", branch_norm: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.name, self.d_model, self.combine = name, d_model, combine
        self.branches = nn.ModuleDict((part, build_mixer(part, d_model, **kwargs_for(part)))
                                      for part in parallel_parts(name))
        self.norms = None
        if branch_norm:
            self.norms = nn.ModuleDict((part, RMSNorm(d_model, norm_eps)) for part in self.branches)
        self.constant_state = all(m.constant_state for m in self.branches.values())
        if any(m.cross_layer for m in self.branches.values()):
            raise ValueError(f"mixer {name!r}: a mixer that reads other layers' values (cross_layer, e.g. RWKV-7's "
                             "value residual) cannot be a parallel branch")

    #: the layers' cross-layer dict is not passed into parallel branches (refused above)
    cross_layer = False

    def _combine(self, outputs) -> torch.Tensor:
        if self.norms is not None:
            outputs = [self.norms[part](y.to(self.norms[part].weight.dtype)).to(y.dtype)
                       for part, y in zip(self.branches, outputs)]
        total = outputs[0]
        for y in outputs[1:]:
            total = total + y
        return total / len(outputs) if self.combine == "mean" else total

    def _split(self, state: Optional[dict]):
        """Each branch's part of a layer state (None stays None)."""
        if state is None:
            return {part: None for part in self.branches}
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of tensors from init_state(); got {type(state).__name__}")
        return {part: {k: v for k, v in state.items() if k.startswith(part + ".")} for part in self.branches}

    def state_spec(self, batch_size: int) -> dict:
        return {f"{part}.{k}": v for part, m in self.branches.items() for k, v in m.state_spec(batch_size).items()}

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        state = {}
        for m in self.branches.values():
            state.update(m.init_state(batch_size, device=device, dtype=dtype))
        return state

    def forward(self, x: torch.Tensor, state: Optional[dict] = None, return_state: bool = False, **kwargs):
        parts = self._split(state)
        outputs, new_state = [], {}
        for part, mixer in self.branches.items():
            if return_state:
                y, s = mixer(x, parts[part], return_state=True, **kwargs)
                new_state.update(s)
            else:
                y = mixer(x, parts[part], **kwargs)
            outputs.append(y)
        y = self._combine(outputs)
        return (y, new_state) if return_state else y

    def step(self, x_t: torch.Tensor, state: dict):
        parts = self._split(state)
        outputs, new_state = [], {}
        for part, mixer in self.branches.items():
            y, s = mixer.step(x_t, parts[part])
            outputs.append(y)
            new_state.update(s)
        return self._combine(outputs), new_state

    def step_inplace(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        parts = self._split(state)  # the same tensors: each branch writes its own in place
        return self._combine([mixer.step_inplace(x_t, parts[part]) for part, mixer in self.branches.items()])

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}, branch_norm={self.norms is not None}"


def _build_layer_mixer(config, name: str, d: int, layer_idx: int):
    """The mixer of one layer: a registry mixer (with the arguments its kind derives from its position among
    the model's mixers of that kind, ``Mixer.model_kwargs``, under the config's own), or :class:`ParallelMixers`
    for a name "a+b"."""
    if PARALLEL_SEP in name:
        return ParallelMixers(name, d, config.kwargs_for, config.parallel_combine, config.parallel_branch_norm,
                              config.norm_eps)
    names = config.layer_mixers()
    kwargs = {**MIXERS[name].model_kwargs(names[:layer_idx].count(name), names.count(name)),
              **config.kwargs_for(name)}
    return build_mixer(name, d, **kwargs)


class Block(nn.Module):
    """Pre-norm residual block around one mixer (and an optional MLP, and optionally a use of the shared
    block feeding the mixer's input)."""

    def __init__(self, config, layer_idx: int, mixer_name: str, shared_block: Optional[SharedBlock] = None):
        super().__init__()
        d = config.d_model
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.shared = None
        self._shared_block = ()  # a tuple, so the backbone alone registers the shared weights
        if shared_block is not None:
            self.shared = SharedUse(d, config.shared_block_spec())
            self._shared_block = (shared_block,)
        self.residual_multiplier = float(config.residual_multiplier)
        self.norm = self.mixer = self.mixer_bwd = None
        if mixer_name != NO_MIXER:
            self.norm = make_norm(config.norm, d, config.norm_eps, config.norm_weight_offset)
            self.mixer = _build_layer_mixer(config, mixer_name, d, layer_idx)
            # bidirectional (classifiers only): a second mixer reads the sequence backwards
            if config.bidirectional:
                self.mixer_bwd = _build_layer_mixer(config, mixer_name, d, layer_idx)
        self.mlp = None
        kind = config.layer_mlps()[layer_idx]
        if kind != "none":
            self.norm2 = make_norm(config.norm, d, config.norm_eps, config.norm_weight_offset)
            act, bias = config.mlp_activation, config.mlp_bias
            if kind == "gated":
                self.mlp = GatedMLP(d, config.mlp_hidden or 4 * d, act, bias)
            elif kind == "plain":
                self.mlp = PlainMLP(d, config.mlp_hidden or 4 * d, act, bias)
            else:
                self.mlp = MoE(d, config.mlp_hidden or 2 * d, config.num_experts, config.top_k, act,
                               config.moe_renormalize, bias, config.moe_shared_hidden, config.moe_router,
                               config.moe_groups, config.moe_topk_groups, config.moe_scale, config.moe_expert)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        """The mixer's zero state (and the shared block's empty KV cache); an MLP-only layer has none ({})."""
        state = {} if self.mixer is None else self.mixer.init_state(batch_size, device=device, dtype=dtype)
        if self.shared is not None:
            attention = self._shared_block[0].attention
            for key, value in attention.init_state(batch_size, device=device, dtype=dtype).items():
                state[SHARED_STATE_PREFIX + key] = value
        return state

    def _split_state(self, state: Optional[dict]):
        """(the mixer's state, the shared block's) from this layer's state."""
        if state is None or self.shared is None:
            return state, None
        n = len(SHARED_STATE_PREFIX)
        return ({k: v for k, v in state.items() if not k.startswith(SHARED_STATE_PREFIX)},
                {k[n:]: v for k, v in state.items() if k.startswith(SHARED_STATE_PREFIX)})

    def _mixer_input(self, x: torch.Tensor, embeddings, shared_state, return_state: bool):
        """x plus this layer's use of the shared block (x unchanged without one); and the block's new state."""
        if self.shared is None:
            return x, None
        if embeddings is None:
            raise ValueError(f"layer {self.layer_idx} reads the shared block, which needs the embeddings: pass "
                             "embeddings= (the model's forward and step do)")
        s, new_state = self.shared(self._shared_block[0], x, embeddings, shared_state, return_state)
        return x + s.to(x.dtype), new_state

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

    def _cross(self, cross_layer: Optional[dict]) -> dict:
        """The mixer's ``cross_layer`` kwarg: only for a mixer that takes it."""
        return {"cross_layer": cross_layer} if cross_layer is not None and self.mixer.cross_layer else {}

    def forward(self, x: torch.Tensor, state: Optional[dict] = None, return_state: bool = False,
                embeddings: Optional[torch.Tensor] = None, cross_layer: Optional[dict] = None, **mixer_kwargs):
        """x (B, L, D) -> (h (B, L, D), new_state or None, aux_loss scalar). ``embeddings`` (B, L, D): the
        model's embedding output, which a layer that reads the shared block needs; ``cross_layer``: the dict
        the model passes through its layers (module docstring)."""
        if self.mixer is None:
            h, aux = self._mlp(self._residual(x))
            return h, ({} if return_state else None), aux
        state, shared_state = self._split_state(state)
        mixer_in, shared_state = self._mixer_input(x, embeddings, shared_state, return_state)
        normed = self.norm(mixer_in.to(self.norm.weight.dtype))
        if self.mixer_bwd is not None:
            if state is not None or return_state:
                raise ValueError("a bidirectional block reads the future and has no recurrent state")
            y = self.mixer(normed) + self.mixer_bwd(normed.flip(1)).flip(1)
            new_state = None
        elif return_state:
            y, new_state = self.mixer(normed, state, return_state=True, **self._cross(cross_layer), **mixer_kwargs)
        else:
            y, new_state = self.mixer(normed, state, **self._cross(cross_layer), **mixer_kwargs), None
        h, aux = self._mlp(self._residual(x) + self._scaled(y))
        if shared_state is not None and new_state is not None:
            new_state = {**new_state, **{SHARED_STATE_PREFIX + k: v for k, v in shared_state.items()}}
        return h, new_state, aux

    def step(self, x_t: torch.Tensor, state: dict, embeddings: Optional[torch.Tensor] = None,
             cross_layer: Optional[dict] = None):
        """x_t (B, D) -> (h_t (B, D), new_state); ``embeddings`` (B, D) and ``cross_layer`` as in forward."""
        if self.mixer is None:
            return self._mlp(self._residual(x_t))[0], {}
        state, shared_state = self._split_state(state)
        mixer_in = x_t
        if self.shared is not None:
            one = None if embeddings is None else embeddings[:, None]
            mixer_in, shared_state = self._mixer_input(x_t[:, None], one, shared_state, True)
            mixer_in = mixer_in[:, 0]
        y, new_state = self.mixer.step(self.norm(mixer_in.to(self.norm.weight.dtype)), state,
                                       **self._cross(cross_layer))
        h, _ = self._mlp(self._residual(x_t) + self._scaled(y), need_aux=False)
        if shared_state is not None:
            new_state = {**new_state, **{SHARED_STATE_PREFIX + k: v for k, v in shared_state.items()}}
        return h, new_state

    def step_inplace(self, x_t: torch.Tensor, state: dict, cross_layer: Optional[dict] = None) -> torch.Tensor:
        """``step`` writing the mixer's new state into ``state`` (see ``Mixer.step_inplace``): x_t -> h_t."""
        if self.shared is not None:
            raise ValueError(f"layer {self.layer_idx} reads the shared block, whose KV cache grows: no in-place step")
        if self.mixer is None:
            return self._mlp(self._residual(x_t), need_aux=False)[0]
        y = self.mixer.step_inplace(self.norm(x_t.to(self.norm.weight.dtype)), state, **self._cross(cross_layer))
        h, _ = self._mlp(self._residual(x_t) + self._scaled(y), need_aux=False)
        return h
