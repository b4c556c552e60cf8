"""SSMModel: embedding -> N pre-norm residual blocks -> final norm -> head.

Parameter names follow transformers' Mamba/Mamba2 models (``backbone.embeddings``, ``backbone.layers.{i}.norm``,
``backbone.layers.{i}.mixer``, ``backbone.norm_f``, ``lm_head``) so that their checkpoints load by name.

    model = ssmkit.from_config(ModelConfig(d_model=256, n_layers=8, vocab_size=256, mixer="MMMAMMMM"))
    out = model(input_ids)                      # out.logits (B, L, V), out.aux_loss (MoE balance)
    out = model(input_ids, return_state=True)   # ... and out.state: one dict of tensors per layer
    logits, state = model.step(next_ids, out.state)
    model.save_pretrained("ckpt"); SSMModel.from_pretrained("ckpt")   # models/pretrained.py

Reverse-complement equivariance (``rc_equivariant``, DNA classifiers; Caduceus, Schiff et al. 2024, arXiv
2403.03234). Caduceus-PS splits the channels of every layer into two halves that share weights: one reads the
sequence, the other its reverse complement RC(x) (``complement_map`` of the flipped tokens), each in its own
direction. Without channel mixing between the halves, that is the same network run on x and on RC(x) side by
side; here the two are rows of one doubled batch (each strand has d_model channels), and the classifier reads
the mean of the two pooled features, so that logits(x) == logits(RC(x)) exactly: RC(RC(x)) == x, and the mean
of two numbers does not depend on their order. Stacking bidirectional layers (``bidirectional=True``) gives
Caduceus's BiMamba-and-RC classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.base import Mixer
from ..ops.lm_loss import lm_loss_chunked
from .blocks import Block, SharedBlock, make_norm
from .config import ModelConfig
from .generation import GenerationMixin
from .pretrained import PretrainedMixin

ModelState = List[Dict[str, torch.Tensor]]


@dataclass
class ModelOutput:
    """What a forward pass returns. ``logits``: (B, L, V) for LMs, (B, C) for classifiers, (B, L, out) for
    regression; ``loss`` when labels were given; ``aux_loss``: MoE load balancing (0 without MoE);
    ``state``: per-layer states when asked."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    state: Optional[ModelState] = None


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is not None:
            self.embeddings = nn.Embedding(config.padded_vocab_size, config.d_model)
        else:
            self.input_proj = nn.Linear(config.input_dim, config.d_model)
        spec = config.shared_block_spec()
        uses = {}
        if spec is not None:  # weights reused by several layers: use u of the block runs weight set u % num_blocks
            self.shared_blocks = nn.ModuleList(SharedBlock(config.d_model, spec, config.norm_eps)
                                               for _ in range(spec["num_blocks"]))
            uses = {layer: self.shared_blocks[u % spec["num_blocks"]] for u, layer in enumerate(spec["layers"])}
        self.layers = nn.ModuleList(Block(config, i, name, uses.get(i))
                                    for i, name in enumerate(config.layer_mixers()))
        self.norm_f = make_norm(config.norm, config.d_model, config.norm_eps, config.norm_weight_offset)


class SSMModel(PretrainedMixin, GenerationMixin, nn.Module):
    """A stack of mixer blocks with an LM, classification or regression head (see the module docstring)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig; got {type(config).__name__}")
        self.config = config
        self.backbone = Backbone(config)
        d = config.d_model
        if config.head == "lm":
            self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.backbone.embeddings.weight
        elif config.head == "classifier":
            self.classifier = nn.Linear(d, config.num_classes)
        else:
            self.regressor = nn.Linear(d, config.output_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.config.vocab_size is not None:
            nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
        # GPT-2/Mamba style: scale output projections of residual branches by 1/sqrt(2 n_layers). Each mixer
        # class names its own (``depth_scaled``); the MLPs' is ``down_proj``.
        scaled = {}
        for module in self.modules():
            if isinstance(module, Mixer):
                for path in module.depth_scaled:
                    param = module.get_parameter(path)
                    scaled[id(param)] = param
        for name, p in self.named_parameters():
            if name.endswith("down_proj.weight"):
                scaled[id(p)] = p
        with torch.no_grad():
            for p in scaled.values():
                p /= (2 * self.config.n_layers) ** 0.5

    # ------------------------------------------------------------------------------------------------
    def _embed(self, inputs: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.vocab_size is not None:
            if not isinstance(inputs, torch.Tensor) or inputs.dtype not in (torch.int64, torch.int32):
                got = inputs.dtype if isinstance(inputs, torch.Tensor) else type(inputs).__name__
                raise TypeError(f"input_ids must be an integer tensor (batch, length); got {got}")
            if inputs.dim() != 2:
                raise ValueError(f"input_ids must be (batch, length); got {tuple(inputs.shape)}")
            if inputs.numel() == 0:
                raise ValueError(f"input_ids must hold at least one token; got shape {tuple(inputs.shape)}")
            lo, hi = int(inputs.min()), int(inputs.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={cfg.vocab_size}); got values in [{lo}, {hi}]")
            return self.scale_embeddings(self.backbone.embeddings(inputs))
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            raise TypeError("inputs must be a floating-point tensor (batch, length, input_dim)")
        if inputs.dim() != 3 or inputs.shape[-1] != cfg.input_dim or inputs.shape[1] == 0:
            raise ValueError(f"inputs must be (batch, length >= 1, input_dim={cfg.input_dim}); got {tuple(inputs.shape)}")
        return self.backbone.input_proj(inputs.to(self.backbone.input_proj.weight.dtype))

    def scale_embeddings(self, embedded: torch.Tensor) -> torch.Tensor:
        """The embedding output times ``config.embedding_multiplier`` (Gemma's sqrt(d_model)); unchanged at 1."""
        m = self.config.embedding_multiplier
        return embedded if m == 1 else embedded * m

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The LM head's output times ``config.logit_multiplier`` (Granite), then cap * tanh(logits / cap) with
        cap = ``config.logit_softcap`` (Gemma 2, RecurrentGemma); unchanged at 1 without a cap. Every path that
        computes LM logits goes through here."""
        m, cap = self.config.logit_multiplier, self.config.logit_softcap
        logits = logits if m == 1 else logits * m
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _head(self, h: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.config
        h = self.backbone.norm_f(h.to(self.backbone.norm_f.weight.dtype))
        if cfg.head == "lm":
            return self.cap_logits(self.lm_head(h))
        if cfg.head == "regression":
            return self.regressor(h)
        if cfg.pooling == "mean":
            if lengths is None:
                pooled = h.mean(1)
            else:
                mask = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]
                pooled = (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        else:
            idx = (lengths - 1) if lengths is not None else torch.full((h.shape[0],), h.shape[1] - 1, device=h.device)
            pooled = h[torch.arange(h.shape[0], device=h.device), idx]
        if cfg.rc_equivariant:  # rows [0, B) read the sequences, rows [B, 2B) their reverse complements
            half = pooled.shape[0] // 2
            pooled = (pooled[:half] + pooled[half:]) / 2
        return self.classifier(pooled)

    def _with_reverse_complement(self, input_ids: torch.Tensor, lengths: Optional[torch.Tensor]):
        """input_ids (B, L) -> (2B, L): the rows, then the reverse complement of each row's first ``lengths[b]``
        tokens (right padding stays where it is); lengths (B,) -> (2B,) or None."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32) \
                or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise TypeError(f"an rc_equivariant model takes input_ids: integer tokens (batch, length); got {got}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}); got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        complement = torch.tensor(self.config.complement_map, dtype=torch.int64, device=input_ids.device)
        if lengths is None:
            reverse = complement[input_ids.flip(1)]
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            valid = positions < lengths[:, None]
            source = torch.where(valid, lengths[:, None] - 1 - positions, positions)
            picked = input_ids.gather(1, source)
            reverse = torch.where(valid, complement[picked], picked)
        return torch.cat([input_ids, reverse.to(input_ids.dtype)]), (None if lengths is None else lengths.repeat(2))

    def forward(self, input_ids: Optional[torch.Tensor] = None, *, inputs: Optional[torch.Tensor] = None,
                state: Optional[ModelState] = None, return_state: bool = False,
                labels: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None,
                context: Any = None, loss_chunk_size: Optional[int] = None, logits_to_keep: Optional[int] = None,
                targets: Optional[torch.Tensor] = None, **mixer_kwargs: Any) -> ModelOutput:
        """Run the whole sequence in parallel.

        Args:
            input_ids: (B, L) token ids (token models), or ``inputs`` (B, L, input_dim) for real-valued models.
            state: per-layer states to continue from (from ``init_state``, ``step`` or an earlier forward).
            return_state: also return the per-layer states after the last token.
            labels: LM: (B, L) next-token targets are ``labels`` shifted left by one (-100 ignored);
                classifier: (B,) classes; regression: (B, L, output_dim) targets (MSE).
            lengths: (B,) valid lengths for pooling of right-padded classifier inputs.
            context: context parallelism (:class:`ssmkit.parallel.ContextParallel`): the inputs are this rank's
                slice of the sequence, and each layer starts from the state that ``context.receive(i, layer, h)``
                returns and hands its final state to ``context.send_state(i, h, state)``. Not with ``state``.
            loss_chunk_size: with LM ``labels``, compute the loss this many tokens of logits at a time and never
                hold the full (B, L, V) logits or their gradient (execution only; ``logits`` is then None).
            logits_to_keep: LM only: compute the logits of the last this-many positions only (1 for reading a
                prompt: the (B, L, V) logits of a long batch are many GB), as transformers' argument of that name.
            targets: LM only, instead of ``labels``: (B, L) targets already aligned with the positions (what the
                model must output at position t, -100 ignored; the trainer's tasks give them so); every position
                is scored. With ``loss_chunk_size`` the loss never holds the (B, L, V) logits.
            mixer_kwargs: passed to every mixer (e.g. ``seq_idx`` / ``cu_seqlens`` for packed Mamba batches).
        """
        if logits_to_keep is not None:
            if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 1:
                raise ValueError(f"logits_to_keep must be a positive int or None; got {logits_to_keep!r}")
            if self.config.head != "lm" or labels is not None:
                raise ValueError("logits_to_keep is for language-model inference (head 'lm', no labels)")
        if loss_chunk_size is not None and self.config.logit_softcap is not None:
            raise ValueError(f"loss_chunk_size computes the loss from uncapped logits; this model has logit_softcap="
                             f"{self.config.logit_softcap}: pass loss_chunk_size=None")
        if targets is not None:
            if labels is not None or self.config.head != "lm":
                raise ValueError("targets (aligned LM targets) is for head 'lm' and excludes labels")
            if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
                raise ValueError(f"targets must be a (batch, length) tensor; got "
                                 f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets)}")
        if self.config.rc_equivariant:
            if state is not None or return_state or context is not None:
                raise ValueError("an rc_equivariant model reads both strands of the whole sequence: state, "
                                 "return_state and context are not available")
            input_ids, lengths = self._with_reverse_complement(input_ids, lengths)
        x = self._embed(input_ids if input_ids is not None else inputs)
        if state is not None:
            self._check_model_state(state)
            if context is not None:
                raise ValueError("state and context cannot be combined: under context parallelism each layer's "
                                 "incoming state comes from the previous rank")
        new_states: ModelState = []
        aux = x.new_zeros((), dtype=torch.float32)
        h = x
        shared = {} if self.config.shared_block is None else {"embeddings": x}
        if shared and context is not None:
            raise ValueError("context parallelism does not cover models with a shared block (shared_block)")
        cross_layer = {}  # what a layer hands to later ones (blocks.py), for this forward only
        for i, layer in enumerate(self.backbone.layers):
            layer_state = None if state is None else state[i]
            if context is None:
                h, layer_state, layer_aux = layer(h, layer_state, return_state, **shared, cross_layer=cross_layer,
                                                  **mixer_kwargs)
            else:
                h, layer_state = context.receive(i, layer, h)
                h, layer_state, layer_aux = layer(h, layer_state, return_state or context.sends_state,
                                                  cross_layer=cross_layer, **mixer_kwargs)
                h = context.send_state(i, h, layer_state)
            new_states.append(layer_state)
            aux = aux + layer_aux.float()
        if loss_chunk_size is not None and labels is not None and self.config.head == "lm":
            # the loss without the (B, L, V) logits (ops.lm_loss): logits=None in the output
            normed = self.backbone.norm_f(h.to(self.backbone.norm_f.weight.dtype))[:, :-1]
            loss = lm_loss_chunked(normed.reshape(-1, normed.shape[-1]), self.lm_head.weight,
                                   labels[:, 1:].reshape(-1), chunk_size=loss_chunk_size)
            return ModelOutput(logits=None, loss=loss, aux_loss=aux, state=new_states if return_state else None)
        if targets is not None:
            if targets.shape != h.shape[:2]:
                raise ValueError(f"targets must be (batch, length) = {tuple(h.shape[:2])}; got {tuple(targets.shape)}")
            if loss_chunk_size is not None:
                normed = self.backbone.norm_f(h.to(self.backbone.norm_f.weight.dtype))
                loss = lm_loss_chunked(normed.reshape(-1, normed.shape[-1]), self.lm_head.weight,
                                       targets.reshape(-1), chunk_size=loss_chunk_size)
                return ModelOutput(logits=None, loss=loss, aux_loss=aux,
                                   state=new_states if return_state else None)
            logits = self._head(h, lengths)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=-100)
            return ModelOutput(logits=logits, loss=loss, aux_loss=aux, state=new_states if return_state else None)
        logits = self._head(h if logits_to_keep is None else h[:, -logits_to_keep:], lengths)
        loss = self._loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux, state=new_states if return_state else None)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        head = self.config.head
        if head == "lm":
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        if head == "classifier":
            return F.cross_entropy(logits.float(), labels)
        return F.mse_loss(logits.float(), labels.float())

    # ------------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        """Zero states for every layer."""
        if self.config.bidirectional or self.config.rc_equivariant:
            raise ValueError("a bidirectional or rc_equivariant model reads the future and has no recurrent state")
        return [layer.init_state(batch_size, device=device, dtype=dtype) for layer in self.backbone.layers]

    def step(self, input_ids: torch.Tensor, state: ModelState):
        """One token per row: input_ids (B,) (or inputs (B, input_dim)) -> (logits (B, V), new state)."""
        if self.config.bidirectional or self.config.rc_equivariant:
            raise ValueError("a bidirectional or rc_equivariant model reads the future and has no recurrent form")
        self._check_model_state(state)
        h = self._embed(input_ids[:, None] if self.config.vocab_size is not None else input_ids[:, None, :])[:, 0]
        new_states: ModelState = []
        shared = {} if self.config.shared_block is None else {"embeddings": h}
        cross_layer = {}  # this token's values a layer hands to later ones
        for i, layer in enumerate(self.backbone.layers):
            h, layer_state = layer.step(h, state[i], **shared, cross_layer=cross_layer)
            new_states.append(layer_state)
        return self._head(h[:, None])[:, 0] if self.config.head != "classifier" else self._head(h[:, None]), new_states

    def _check_model_state(self, state) -> None:
        n = len(self.backbone.layers)
        if not isinstance(state, (list, tuple)) or len(state) != n:
            got = f"{type(state).__name__} of length {len(state)}" if isinstance(state, (list, tuple)) else type(state).__name__
            raise ValueError(f"state must be a list of {n} per-layer states (model.init_state); got {got}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def set_recompute(model: nn.Module, enabled: bool = True) -> List[str]:
    """Turn recomputation (:attr:`ssmkit.layers.base.Mixer.recompute`) on or off in every mixer of ``model``
    that supports it (Mamba, Mamba-2): an execution choice, never saved with the model. Returns the names of
    the mixers set, so that a model where none supports it is visible to the caller."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False; got {enabled!r}")
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Mixer) and module.supports_recompute:
            module.recompute = enabled
            names.append(name)
    return names
