"""The model configuration: one JSON-serialisable dataclass holding architecture only.

Execution choices (backends, threads, dtype at run time) are arguments of the functions that run a model,
never fields here, so a checkpoint describes a network and nothing about the machine that trained it.

Mixer per layer: ``mixer`` is a registry name applied to every layer ("mamba"), a list of names (one per
layer), or a pattern string of one letter per layer, e.g. Jamba's one attention layer in eight:
``"MMMAMMMM"``. Letters:

======  ==================  ======  ==================
``M``   mamba               ``A``   attention
``D``   mamba2 (SSD)        ``L``   linear_attention
``S``   s4d                 ``4``   s4
``5``   s5                  ``H``   hawk (RG-LRU block)
``R``   rwkv7 (time mix)    ``K``   rwkv7_channel_mix
``E``   mamba3
``U``   liquid_s4
======  ==================  ======  ==================

``mixer_kwargs`` maps a mixer name to its keyword arguments ({"mamba": {"d_state": 16}}); with a single mixer
a flat dict is accepted too.

A layer may have no mixer at all: ``"none"`` in a mixer list, ``-`` in a pattern. Such a layer is an MLP-only
residual block (Nemotron-H's ``-`` layers), so it needs an MLP.

MLP per layer: ``mlp`` is one kind for every layer or a list of kinds, one per layer (Jamba: a mixture of
experts every other layer, ``["gated", "moe", "gated", "moe"]``). Kinds: ``none``; ``gated``
(down(act(gate(x)) * up(x)), SwiGLU with act = silu); ``plain`` (down(act(up(x))), Nemotron-H's with act =
relu2); ``moe`` (top-k mixture of gated experts). ``mlp_activation`` is the act of all of them;
``moe_renormalize`` says whether the top-k router weights are renormalised to sum to 1 (Mixtral) or kept as
the softmax gave them (Jamba); ``mlp_bias`` gives every MLP projection a bias (RecurrentGemma);
``moe_shared_hidden`` adds a shared gated MLP of that width that every token
goes through beside its routed experts (DeepSeekMoE, Granite-4.0-H). ``moe_router="sigmoid"`` is
DeepSeek-V3's and Nemotron-H's router: sigmoid scores; experts chosen by score plus a per-expert bias (a buffer
that steers the load, never part of the weights) among the ``moe_topk_groups`` best of ``moe_groups`` groups
(a group's score: the sum of its two best); weights = the chosen scores (renormalised if ``moe_renormalize``)
times ``moe_scale``. ``moe_expert="plain"`` makes the experts and the shared expert ungated MLPs (Nemotron-H).

Shared block (Zamba, Glorioso et al. 2024, arXiv 2405.16712; Zamba2, arXiv 2411.15242): ``shared_block`` is a
dict describing one attention + MLP block whose weights are reused at several depths, ``layers`` (the uses,
in order); use u runs weight set u % ``num_blocks``. Its input is the layer's input concatenated with the
embeddings (``concat_embeddings``), each use adds its own low-rank adapters (``adapter_rank``: on the MLP's
gate and up projections, and on q, k, v with ``attention_adapters``) and its own output projection, and the
result is added to the input of that layer's mixer (before its norm). Keys: :data:`SHARED_BLOCK_REQUIRED` and
the defaults in :data:`SHARED_BLOCK_KEYS`.

Parallel mixers (Falcon-H1, Zuo et al. 2025, arXiv 2507.22448; Hymba, Dong et al. 2024, arXiv 2411.13676): a mixer
name joining registry names with ``+`` (``"mamba2+attention"``, in a mixer list) makes a layer that runs those
mixers side by side on the one normed input and combines their outputs into the layer's one residual update:
``parallel_combine`` "sum" (Falcon-H1) or "mean" (Hymba); with ``parallel_branch_norm`` each branch's output goes
through its own RMSNorm first (Hymba), whose weight is the branch's learned output scale. A constant scale on a
branch (Falcon-H1's multipliers) is a scale on its output projection, so it lives in that projection's weights.
The layer's state holds every branch's state (the keys are already prefixed by each mixer's name), so carried
state and one-token steps cover both. ``mixer_kwargs`` is then nested per mixer name.

Gemma-family options (RecurrentGemma uses all three): ``embedding_multiplier`` scales the embedding output
(Gemma: sqrt(d_model)); ``logit_softcap`` = c bounds the LM logits smoothly, logits = c tanh(logits / c);
``norm_weight_offset`` = 1 makes the RMS norms scale by (1 + weight), their weights stored as the difference
from 1 (zero at initialisation).

Scalar multipliers (Granite): ``embedding_multiplier`` (above), ``residual_multiplier`` each mixer and MLP
output before it joins the residual stream, ``logit_multiplier`` the logits; all 1 by default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from ..layers.registry import MIXERS, pattern_letters

MLP_KINDS = ("none", "gated", "plain", "moe")
MLP_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
#: the name and pattern letter of a layer without a mixer (an MLP-only block)
NO_MIXER, NO_MIXER_LETTER = "none", "-"
NORMS = ("rmsnorm", "layernorm")
HEADS = ("lm", "classifier", "regression")
POOLINGS = ("mean", "last")
#: the keys ModelConfig.shared_block must give, and the others with their defaults
SHARED_BLOCK_REQUIRED = ("layers", "n_heads", "mlp_hidden")
SHARED_BLOCK_KEYS = {"layers": None, "num_blocks": 1, "n_heads": None, "n_kv_heads": None, "head_dim": None,
                     "rope": False, "rope_base": 10000.0, "softmax_scale": None, "mlp_hidden": None,
                     "mlp_activation": "gelu", "adapter_rank": None, "attention_adapters": False,
                     "concat_embeddings": True}
#: mixer keyword arguments that choose how a layer runs, not what it computes: never kept in a config
#: (choose them with ``ssmkit.ops.use_backend`` or the layer's attribute at run time)
EXECUTION_KWARGS = ("backend", "recompute")
#: joins the mixers of a parallel layer in a mixer name ("mamba2+attention"); how their outputs combine
PARALLEL_SEP, PARALLEL_COMBINES = "+", ("sum", "mean")


def parallel_parts(name: str) -> List[str]:
    """The registry names a layer's mixer name runs: ["mamba2", "attention"] for "mamba2+attention", [name]
    for a single mixer."""
    return str(name).split(PARALLEL_SEP)


@dataclass
class ModelConfig:
    """Architecture of an ssmkit model (see the module docstring for ``mixer``)."""

    d_model: int = 256
    n_layers: int = 4
    vocab_size: Optional[int] = None  # token inputs (language models, token classifiers)
    input_dim: Optional[int] = None  # real-valued inputs (B, L, input_dim) instead of tokens
    mixer: Union[str, List[str]] = "mamba"
    mixer_kwargs: Dict[str, Any] = field(default_factory=dict)
    mlp: Union[str, List[str]] = "none"  # "none" | "gated" (SwiGLU) | "plain" | "moe", or one per layer
    mlp_hidden: Optional[int] = None  # default: 4 * d_model for "gated"/"plain", 2 * d_model per expert for "moe"
    num_experts: int = 8
    top_k: int = 2
    # act of every MLP kind: "silu" | "gelu" (exact) | "gelu_tanh" (tanh approximation) | "relu" | "relu2" (relu^2)
    mlp_activation: str = "silu"
    moe_renormalize: bool = True  # top-k router weights renormalised to sum to 1 (Mixtral); False: Jamba
    mlp_bias: bool = False  # biases in every MLP projection (RecurrentGemma)
    moe_shared_hidden: Optional[int] = None  # a shared gated MLP of this width beside the experts of "moe" layers
    moe_router: str = "softmax"  # "softmax" (Mixtral, Jamba, Granite) | "sigmoid" (DeepSeek-V3, Nemotron-H)
    moe_groups: int = 1  # sigmoid router: experts in this many groups ...
    moe_topk_groups: int = 1  # ... of which the best this many are chosen from
    moe_scale: float = 1.0  # the routed experts' weights times this (DeepSeek's routed_scaling_factor)
    moe_expert: str = "gated"  # "gated" (SwiGLU) | "plain" (up, act, down): the experts' and the shared expert's kind
    residual_multiplier: float = 1.0  # each mixer and MLP output times this before it joins the residual (Granite)
    logit_multiplier: float = 1.0  # the logits times this (Granite: 1 / logits_scaling)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_weight_offset: float = 0.0  # RMS norms scale by (norm_weight_offset + weight); Gemma: 1.0
    embedding_multiplier: float = 1.0  # the embedding output times this (Gemma: sqrt(d_model))
    logit_softcap: Optional[float] = None  # LM logits = cap * tanh(logits / cap) (Gemma 2, RecurrentGemma); None: off
    shared_block: Optional[Dict[str, Any]] = None  # attention + MLP reused at several layers (Zamba2); see above
    # parallel mixers: layers named "a+b" run mixers a and b on one normed input (Falcon-H1, Hymba); see above
    parallel_combine: str = "sum"  # "sum" of the branch outputs, or their "mean" (Hymba)
    parallel_branch_norm: bool = False  # each branch output through its own RMSNorm before combining (Hymba)
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 1
    head: str = "lm"  # "lm" | "classifier" | "regression"
    num_classes: Optional[int] = None
    output_dim: Optional[int] = None
    pooling: str = "mean"
    bidirectional: bool = False  # classifier only: each layer also reads the sequence backwards
    # classifier over DNA tokens only: the prediction is exactly the same for a sequence and its reverse complement
    # (Caduceus, Schiff et al. 2024, arXiv 2403.03234): see SSMModel's docstring
    rc_equivariant: bool = False
    complement_map: Optional[List[int]] = None  # token id -> id of its reverse complement (from the tokenizer)

    def __post_init__(self) -> None:
        self.mixer_kwargs = _without_execution_kwargs(self.mixer_kwargs)
        self.validate()

    # ------------------------------------------------------------------------------------------------
    def layer_mixers(self) -> List[str]:
        """The registry name of the mixer of each layer."""
        m = self.mixer
        if isinstance(m, str) and (m in MIXERS or PARALLEL_SEP in m):
            names = [m] * self.n_layers  # one mixer, or one parallel layer ("mamba2+attention"), in every layer
            m = names
        if isinstance(m, str):
            letters = dict(pattern_letters(), **{NO_MIXER_LETTER: NO_MIXER})  # each mixer class declares its own
            unknown = sorted({c for c in m if c not in letters})
            if unknown or len(m) != self.n_layers:
                close = difflib.get_close_matches(m, list(MIXERS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"mixer must be a registered name {sorted(MIXERS)}, a list of them, or a pattern of "
                    f"n_layers={self.n_layers} letters from {letters}; got {m!r}{hint}")
            return [letters[c] for c in m]
        names = list(m)
        if len(names) != self.n_layers:
            raise ValueError(f"mixer lists {len(names)} layers but n_layers={self.n_layers}")
        for name in names:
            if name == NO_MIXER:
                continue
            parts = parallel_parts(name)
            for part in parts:
                if part not in MIXERS:
                    close = difflib.get_close_matches(part, list(MIXERS), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ValueError(f"unknown mixer {part!r} in mixer list entry {name!r}: known mixers are "
                                     f"{sorted(MIXERS)}, or several joined by {PARALLEL_SEP!r} run in parallel{hint}")
            if len(set(parts)) != len(parts):
                raise ValueError(f"a parallel layer runs distinct mixers; got {name!r}")
        return names

    def layer_mlps(self) -> List[str]:
        """The MLP kind of each layer ("none", "gated", "plain" or "moe")."""
        kinds = [self.mlp] * self.n_layers if isinstance(self.mlp, str) else list(self.mlp)
        if len(kinds) != self.n_layers:
            raise ValueError(f"mlp lists {len(kinds)} layers but n_layers={self.n_layers}")
        for kind in kinds:
            if kind not in MLP_KINDS:
                raise ValueError(f"mlp must be one of {list(MLP_KINDS)} or a list of them, one per layer; got {kind!r}")
        return kinds

    def kwargs_for(self, mixer_name: str) -> Dict[str, Any]:
        """Keyword arguments for one mixer kind (nested per name, or flat when one kind is used)."""
        kw = self.mixer_kwargs or {}
        if any(k in MIXERS for k in kw):
            return dict(kw.get(mixer_name, {}))
        kinds = {part for name in set(self.layer_mixers()) - {NO_MIXER} for part in parallel_parts(name)}
        return dict(kw) if len(kinds) == 1 else {}

    @property
    def padded_vocab_size(self) -> Optional[int]:
        if self.vocab_size is None:
            return None
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "num_experts", "top_k", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if (self.vocab_size is None) == (self.input_dim is None):
            raise ValueError(f"give exactly one of vocab_size (token inputs) or input_dim (real-valued inputs); "
                             f"got vocab_size={self.vocab_size}, input_dim={self.input_dim}")
        for name, value, choices in (("mlp_activation", self.mlp_activation, MLP_ACTIVATIONS),
                                     ("norm", self.norm, NORMS),
                                     ("head", self.head, HEADS), ("pooling", self.pooling, POOLINGS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.head == "lm" and self.vocab_size is None:
            raise ValueError("head='lm' needs vocab_size")
        if self.head == "classifier" and not self.num_classes:
            raise ValueError("head='classifier' needs num_classes")
        if self.head == "regression" and not self.output_dim:
            raise ValueError("head='regression' needs output_dim")
        if self.bidirectional and self.head != "classifier":
            raise ValueError("bidirectional=True reads the future, so it is only allowed with head='classifier'")
        self._validate_reverse_complement()
        for name in ("moe_renormalize", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool; got {type(getattr(self, name)).__name__}")
        self._validate_scales()
        self._validate_shared_block()
        self._validate_parallel()
        if self.moe_shared_hidden is not None and (not isinstance(self.moe_shared_hidden, int)
                                                   or self.moe_shared_hidden < 1):
            raise ValueError(f"moe_shared_hidden must be a positive int or None; got {self.moe_shared_hidden!r}")
        self._validate_router()
        for name in ("residual_multiplier", "logit_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
        mlps = self.layer_mlps()
        for i, (mixer, mlp) in enumerate(zip(self.layer_mixers(), mlps)):
            if mixer == NO_MIXER and mlp == "none":
                raise ValueError(f"layer {i} has neither a mixer nor an MLP: a layer with mixer 'none' needs mlp "
                                 f"'gated', 'plain' or 'moe'; got mlp={self.mlp!r}")
        if self.bidirectional and NO_MIXER in self.layer_mixers():
            raise ValueError("bidirectional=True needs a mixer in every layer; got a mixer 'none'")

    def _validate_scales(self) -> None:
        for name in ("norm_weight_offset", "embedding_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
        if self.norm_weight_offset != 0 and self.norm != "rmsnorm":
            raise ValueError(f"norm_weight_offset scales RMS norms; it needs norm='rmsnorm', got norm={self.norm!r}")
        cap = self.logit_softcap
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (math.isfinite(cap) and cap > 0):
                raise ValueError(f"logit_softcap must be a positive finite number or None; got {cap!r}")
            if self.head != "lm":
                raise ValueError(f"logit_softcap caps language-model logits; it needs head='lm', got "
                                 f"head={self.head!r}")

    def _validate_parallel(self) -> None:
        if self.parallel_combine not in PARALLEL_COMBINES:
            raise ValueError(f"parallel_combine must be one of {list(PARALLEL_COMBINES)}; "
                             f"got {self.parallel_combine!r}")
        if not isinstance(self.parallel_branch_norm, bool):
            raise TypeError(f"parallel_branch_norm must be a bool; got {type(self.parallel_branch_norm).__name__}")
        parallel = any(PARALLEL_SEP in name for name in self.layer_mixers())
        if (self.parallel_combine != "sum" or self.parallel_branch_norm) and not parallel:
            raise ValueError(f"parallel_combine={self.parallel_combine!r} and parallel_branch_norm="
                             f"{self.parallel_branch_norm} describe parallel layers; this model has none (a mixer "
                             f"list entry such as 'mamba2+attention' makes one)")
        if parallel and self.bidirectional:
            raise ValueError("bidirectional=True does not cover parallel layers ('a+b' mixers)")

    def _validate_router(self) -> None:
        if self.moe_router not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_router must be 'softmax' or 'sigmoid'; got {self.moe_router!r}")
        if self.moe_expert not in ("gated", "plain"):
            raise ValueError(f"moe_expert must be 'gated' or 'plain'; got {self.moe_expert!r}")
        for name in ("moe_groups", "moe_topk_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.moe_topk_groups > self.moe_groups:
            raise ValueError(f"moe_topk_groups ({self.moe_topk_groups}) must be at most moe_groups ({self.moe_groups})")
        if self.moe_groups > 1:
            if self.moe_router != "sigmoid":
                raise ValueError(f"moe_groups > 1 needs moe_router='sigmoid'; got moe_router={self.moe_router!r}")
            if self.num_experts % self.moe_groups or self.num_experts // self.moe_groups < 2:
                raise ValueError(f"moe_groups={self.moe_groups} must split num_experts={self.num_experts} into "
                                 "groups of 2 or more experts (a group scores by its two best)")
        if isinstance(self.moe_scale, bool) or not isinstance(self.moe_scale, (int, float)) \
                or not math.isfinite(self.moe_scale) or self.moe_scale <= 0:
            raise ValueError(f"moe_scale must be a positive finite number; got {self.moe_scale!r}")

    def shared_block_spec(self) -> Optional[Dict[str, Any]]:
        """``shared_block`` with every default filled in, or None."""
        if self.shared_block is None:
            return None
        return {**SHARED_BLOCK_KEYS, **self.shared_block}

    def _validate_shared_block(self) -> None:
        spec = self.shared_block
        if spec is None:
            return
        if not isinstance(spec, dict):
            raise TypeError(f"shared_block must be a dict or None; got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(SHARED_BLOCK_KEYS))
        missing = sorted(k for k in SHARED_BLOCK_REQUIRED if k not in spec)
        if unknown or missing:
            raise ValueError(f"shared_block: unknown keys {unknown}, missing keys {missing}; its keys are "
                             f"{sorted(SHARED_BLOCK_KEYS)}")
        spec = self.shared_block_spec()
        layers = spec["layers"]
        if not isinstance(layers, (list, tuple)) or not layers or list(layers) != sorted(set(layers)) \
                or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers for i in layers):
            raise ValueError(f"shared_block['layers'] must be increasing layer indices in [0, "
                             f"n_layers={self.n_layers}); got {layers!r}")
        for key in ("num_blocks", "n_heads", "mlp_hidden"):
            value = spec[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"shared_block[{key!r}] must be a positive int; got {value!r}")
        rank = spec["adapter_rank"]
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"shared_block['adapter_rank'] must be a positive int or None; got {rank!r}")
        if spec["attention_adapters"] and rank is None:
            raise ValueError("shared_block['attention_adapters'] needs an adapter_rank")
        if spec["mlp_activation"] not in MLP_ACTIVATIONS:
            raise ValueError(f"shared_block['mlp_activation'] must be one of {list(MLP_ACTIVATIONS)}; "
                             f"got {spec['mlp_activation']!r}")
        if self.norm != "rmsnorm" or self.bidirectional:
            raise ValueError(f"shared_block needs norm='rmsnorm' and a causal model; got norm={self.norm!r}, "
                             f"bidirectional={self.bidirectional}")
        for i in layers:
            if self.layer_mixers()[i] == NO_MIXER:
                raise ValueError(f"shared_block: layer {i} has no mixer, whose input the shared block would feed")

    def _validate_reverse_complement(self) -> None:
        if self.complement_map is not None:
            cmap = list(self.complement_map)
            if self.vocab_size is None or len(cmap) != self.vocab_size:
                raise ValueError(f"complement_map must list one token id per token of vocab_size={self.vocab_size}; "
                                 f"got {len(cmap)} entries")
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < len(cmap) or cmap[t] != i
                   for i, t in enumerate(cmap)):
                raise ValueError("complement_map must be an involution of the token ids (complement_map[complement_map"
                                 f"[t]] == t for every t); got {cmap}")
        if self.rc_equivariant:
            if self.head != "classifier":
                raise ValueError(f"rc_equivariant=True is for head='classifier' (one label per sequence); got "
                                 f"head={self.head!r}")
            if self.complement_map is None:
                raise ValueError("rc_equivariant=True needs complement_map (the tokenizer's, e.g. "
                                 "NucleotideTokenizer(k).complement_map.tolist()); got None")

    # ------------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(names), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown ModelConfig fields: {', '.join(hints)}")
        return cls(**data)


def _without_execution_kwargs(mixer_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``mixer_kwargs`` without execution settings (older checkpoints saved a ``backend``): they are dropped
    with a note, so a checkpoint never pins the machine it was trained on."""
    if not isinstance(mixer_kwargs, dict):
        return mixer_kwargs
    nested = any(k in MIXERS for k in mixer_kwargs)
    groups = mixer_kwargs.items() if nested else [(None, mixer_kwargs)]
    dropped, cleaned = [], {}
    for name, kwargs in groups:
        if isinstance(kwargs, dict):
            kept = {k: v for k, v in kwargs.items() if k not in EXECUTION_KWARGS}
            dropped += [f"{name}.{k}" if name else k for k in kwargs if k in EXECUTION_KWARGS]
        else:
            kept = kwargs
        if name is None:
            return _note_dropped(dropped, kept)
        cleaned[name] = kept
    return _note_dropped(dropped, cleaned)


def _note_dropped(dropped: List[str], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    if dropped:
        warnings.warn(f"ModelConfig: ignoring execution setting(s) {dropped} in mixer_kwargs: a model config holds "
                      "architecture only; choose backends at run time with ssmkit.ops.use_backend(...) and "
                      "recomputation with ssmkit.models.set_recompute(model)",
                      UserWarning, stacklevel=4)
    return kwargs
