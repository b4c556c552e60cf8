"""Fast one-token decoding: fused C++ kernels on the CPU, one CUDA graph per step on a GPU.

``model.step`` runs each layer's PyTorch step (a dozen small ops and three to five matrix products per layer,
each allocating its output). :class:`FusedDecoder` computes the same function with the fused kernels of
:mod:`ssmkit.ops.decode`: per layer, one C++ call runs the whole block (RMSNorm -> fused mixer step ->
residual add); then the final norm and the LM head through the same matrix-vector kernel. Intermediates live in buffers allocated once per batch size;
the recurrent state alternates between two preallocated sets (the state passed in is never written, so
generation can keep finished rows' states), and the logits between two buffers.

On a GPU, :class:`CUDAGraphDecoder` records the model's whole step (embedding, every layer's
``step_inplace`` with the Triton one-token kernels updating the states where they lie, final norm, LM head)
as one CUDA graph per batch size and replays it: one launch per token instead of ~10 per layer, which is what
decoding at small batch is bound by. The graph reads the token ids and states from buffers it owns, so a step
copies the incoming state in only when it is not already the decoder's (i.e. once, after the prompt).

Which path runs is an execution choice of ``generate(..., decode_backend=...)``, never part of a model config:

============  ==================================================================================
None          "cuda_graph" for a supported model on a GPU, else "module" (the default)
"module"      ``model.step`` (every layer's PyTorch step)
"fused"       :class:`FusedDecoder`; raises if the model is not supported here (see :func:`fused_support`)
              or the C++ kernels cannot be built
"packed"      :class:`PackedDecoder`: ``model.step`` with every linear map on the same C++ matrix-vector
              kernel (any CPU language model: hybrids, attention, MLPs); raises if not supported
              (:func:`packed_support`) or the kernels cannot be built
"cuda_graph"  :class:`CUDAGraphDecoder`; raises if the model is not supported (:func:`graph_support`) or
              its step cannot be captured
"auto"        "cuda_graph" on a GPU; on the CPU "fused" where supported, else "packed", where the kernels
              build; else "module"
============  ==================================================================================

``model.last_decode_backend`` and ``model.last_decode_backend_reason`` say which ran and why.

Fused (CPU): float32 models with a language-model head whose layers are all Mamba or Mamba-2 blocks without
MLP, not bidirectional; weights float32 or int8 (:func:`ssmkit.quantize`). CUDA graph: a CUDA model with a
language-model head whose mixers all have a state of constant size (no KV cache) and no MoE layer (its
routing is data-dependent); any dtype.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..layers.mamba import Mamba
from ..layers.mamba2 import Mamba2

DECODE_BACKENDS = ("module", "fused", "packed", "cuda_graph", "auto")


def _cpu_language_model_reason(model, decoder: str) -> Optional[str]:
    """What the CPU decoders ("fused", "packed") share: a token model with an LM head, recurrent, on the CPU."""
    cfg = model.config
    if cfg.head != "lm" or cfg.vocab_size is None:
        return f"the {decoder} decoder needs a token model with an LM head; head={cfg.head!r}"
    if cfg.bidirectional:
        return "a bidirectional model has no recurrent step"
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"the {decoder} decoder runs on the CPU; the model is on {device}"
    return None


def fused_support(model) -> Optional[str]:
    """None if :class:`FusedDecoder` handles ``model``, else the reason it does not."""
    reason = _cpu_language_model_reason(model, "fused")
    if reason is not None:
        return reason
    cfg = model.config
    if cfg.shared_block is not None:
        return "the model has a shared attention block (shared_block); the fused decoder covers mixer blocks only"
    for name in ("residual_multiplier", "logit_multiplier"):
        if getattr(cfg, name) != 1.0:
            return f"the fused decoder has no {name}; this model's is {getattr(cfg, name)}"
    for i, layer in enumerate(model.backbone.layers):
        if layer.mixer is None:
            return f"layer {i} is an MLP-only layer; the fused decoder covers mixer blocks only"
        if not isinstance(layer.mixer, (Mamba, Mamba2)):
            return f"layer {i} is a {type(layer.mixer).__name__}; the fused decoder covers Mamba and Mamba2 only"
        if getattr(layer.mixer, "dt_bc_rmsnorm", None) is not None:
            return f"layer {i} normalises dt, B and C (dt_bc_rmsnorm); the fused decoder does not"
        if layer.mlp is not None:
            return f"layer {i} has an MLP; the fused decoder covers mixer-only blocks"
    if cfg.norm != "rmsnorm" or cfg.norm_weight_offset != 0:
        return (f"the fused decoder covers RMSNorm blocks scaling by their weight; norm={cfg.norm!r}, "
                f"norm_weight_offset={cfg.norm_weight_offset}")
    for name, p in model.named_parameters():
        if p.dtype != torch.float32:
            return f"the fused decoder needs float32 parameters; {name} is {p.dtype}"
    return None


def _linear_args(ext, module: nn.Module) -> List[torch.Tensor]:
    """[weight panels (float32 or int8, the kernels' layout), scale (or empty), bias (or empty)]."""
    empty = torch.empty(0)
    bias = module.bias.detach().contiguous() if module.bias is not None else empty
    if hasattr(module, "weight_int8"):
        return [ext.pack_weight(module.weight_int8), module.weight_scale.contiguous(), bias]
    return [ext.pack_weight(module.weight.detach()), empty, bias]


def _weight_versions(model) -> tuple:
    """Addresses and in-place versions of every parameter and buffer: changes when any weight does."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


class _PackedWeights:
    """A decoder that holds packed copies of ``self.model``'s weights, taken when ``self._versions`` was set."""

    def stale(self) -> bool:
        """Whether a parameter or buffer of the model was replaced or changed in place since the decoder was
        built (its packed weights would then be out of date)."""
        return _weight_versions(self.model) != self._versions


class FusedDecoder(_PackedWeights):
    """``step(ids, state) -> (logits (B, V_padded), new_state)`` like ``SSMModel.step``, with fused kernels.

    A snapshot of the model's weights: every linear map's weight is copied once into the kernels' panel
    layout (``pack_weight``: 16 rows at a time, column-major, so each thread streams its weights in one
    sequential read), so the decoder holds a second copy of those weights (0.51 GB for the 130M shape in
    float32, 0.14 GB in int8); the small SSM parameters are referenced, with a few derived tensors such as
    A = -exp(A_log). ``stale()`` says whether a weight changed since; :func:`fused_decoder` keeps one decoder
    per model and rebuilds it when stale. The logits and state returned live in the decoder's buffers and are
    overwritten two steps later; clone them to keep them longer.
    """

    def __init__(self, model):
        from ..ops.decode import cpp

        reason = fused_support(model)
        if reason is not None:
            raise ValueError(reason)
        self.ext = cpp.extension()  # RuntimeError naming the build error where no compiler is available
        self.model = model
        self._versions = _weight_versions(model)
        ext = self.ext
        self.layers = []
        for layer in model.backbone.layers:
            m = layer.mixer
            conv_w = m.conv1d.weight.detach()[:, 0, :].contiguous()          # (channels, d_conv)
            conv_b = m.conv1d.bias.detach() if m.conv1d.bias is not None else torch.empty(0)
            if isinstance(m, Mamba):
                entry = dict(kind="mamba", in_proj=_linear_args(ext, m.in_proj), conv_w=conv_w, conv_b=conv_b,
                             x_proj=_linear_args(ext, m.x_proj), dt_proj=_linear_args(ext, m.dt_proj),
                             A=(-torch.exp(m.A_log.detach())).contiguous(), D=m.D.detach(),
                             out_proj=_linear_args(ext, m.out_proj))
            else:
                lo, hi = m.dt_limit
                norm_mode = 0 if not m.rmsnorm else (2 if m.norm.norm_before_gate else 1)
                entry = dict(kind="mamba2", in_proj=_linear_args(ext, m.in_proj), conv_w=conv_w, conv_b=conv_b,
                             dt_bias=m.dt_bias.detach(), A=(-torch.exp(m.A_log.detach())).contiguous(),
                             D=m.D.detach().reshape(-1), norm_w=m.norm.weight.detach() if m.rmsnorm else torch.empty(0),
                             norm_mode=norm_mode, norm_eps=float(m.norm.eps) if m.rmsnorm else 0.0,
                             norm_groups=(m.d_inner // m.norm.group_size) if m.rmsnorm else 1,
                             dt_min=lo, dt_max=hi, clamp=(lo, hi) != (0.0, float("inf")),
                             out_proj=_linear_args(ext, m.out_proj))
            entry.update(block=layer, mixer=m)
            self.layers.append(entry)
        self.head = _linear_args(ext, model.lm_head)
        self._batch = None

    def _allocate(self, batch: int) -> None:
        model = self.model
        d = model.config.d_model
        self._h = torch.empty(batch, d)
        self._normed = torch.empty(batch, d)
        self._y = torch.empty(batch, d)
        self._states = [[], []]
        self._buffers = []
        for entry in self.layers:
            m = entry["mixer"]
            spec = m.state_spec(batch)
            for s in self._states:
                s.append({m.state_key(k): torch.zeros(shape) for k, (shape, _) in spec.items()})
            if entry["kind"] == "mamba":
                self._buffers.append(dict(xz=torch.empty(batch, 2 * m.d_inner), u=torch.empty(batch, m.d_inner),
                                          x_dbl=torch.empty(batch, m.dt_rank + 2 * m.d_state),
                                          delta=torch.empty(batch, m.d_inner), y=torch.empty(batch, m.d_inner)))
            else:
                self._buffers.append(dict(zxbcdt=torch.empty(batch, m.in_proj.out_features),
                                          xbc=torch.empty(batch, m.conv_dim), y=torch.empty(batch, m.d_inner)))
        self._logits = [torch.empty(batch, model.lm_head.out_features) for _ in range(2)]
        # each layer's kernel call with everything but the state bound (the arguments before and after it)
        self._calls = []
        for entry, buffers in zip(self.layers, self._buffers):
            m, norm = entry["mixer"], entry["block"].norm
            head = (self._h, norm.weight.detach(), float(norm.eps), self._normed, entry["in_proj"], entry["conv_w"],
                    entry["conv_b"])
            if entry["kind"] == "mamba":
                call = (self.ext.mamba_step,
                        head + (entry["x_proj"], entry["dt_proj"], entry["A"], entry["D"], entry["out_proj"]),
                        (buffers["xz"], buffers["u"], buffers["x_dbl"], buffers["delta"], buffers["y"], self._y))
            else:
                call = (self.ext.mamba2_step,
                        head + (entry["dt_bias"], entry["A"], entry["D"], entry["norm_w"], entry["norm_mode"],
                                entry["norm_eps"], entry["norm_groups"], entry["dt_min"], entry["dt_max"],
                                entry["clamp"], entry["out_proj"], m.headdim, m.ngroups),
                        (buffers["zxbcdt"], buffers["xbc"], buffers["y"], self._y))
            self._calls.append(call + (m.state_key("conv"), m.state_key("ssm")))
        self._next = 0
        self._batch = batch

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, state: list) -> Tuple[torch.Tensor, list]:
        """input_ids (B,) -> (logits (B, V_padded) float32, new state); same contract as ``SSMModel.step``."""
        model = self.model
        model._check_model_state(state)
        batch = input_ids.shape[0]
        if batch != self._batch:
            self._allocate(batch)
        out_set = self._next
        first_key = next(iter(state[0])) if state[0] else None
        if first_key is not None and state[0][first_key].data_ptr() == self._states[out_set][0][first_key].data_ptr():
            out_set = 1 - out_set  # never overwrite the state we read
        self._next = 1 - out_set
        new_state = self._states[out_set]
        h = self._h
        h.copy_(model._embed(input_ids[:, None])[:, 0])
        for (kernel, before, after, conv_key, ssm_key), old, new in zip(self._calls, state, new_state):
            # h <- h + mixer(rmsnorm(h)), the state read from old and written to new
            kernel(*before, old[conv_key].float().contiguous(), old[ssm_key].float().contiguous(), new[conv_key],
                   new[ssm_key], *after)
        logits = self._logits[out_set]
        self.ext.linear_out(model.backbone.norm_f(h).contiguous(), *self.head, logits)
        if model.config.logit_softcap is not None:
            logits.copy_(model.cap_logits(logits))
        return logits, new_state


def packed_support(model) -> Optional[str]:
    """None if :class:`PackedDecoder` handles ``model``, else the reason it does not."""
    from .quantization import Int8Linear

    reason = _cpu_language_model_reason(model, "packed")
    if reason is not None:
        return reason
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module.weight.dtype != torch.float32:
            return f"the packed decoder needs float32 (or int8) linear maps; {name} is {module.weight.dtype}"
        if isinstance(module, Int8Linear) and module.bias is not None and module.bias.dtype != torch.float32:
            return f"the packed decoder needs float32 biases; {name}'s is {module.bias.dtype}"
    return None


class PackedDecoder(_PackedWeights):
    """``step(ids, state) -> (logits, new_state)``: the model's own ``step`` (any mixers, MLPs, MoE, attention
    with its KV cache), with every linear map (``nn.Linear``, :class:`~ssmkit.models.quantization.Int8Linear`)
    computed by the fused decoder's matrix-vector kernel on weights packed into its panels.

    For models :class:`FusedDecoder` does not cover (hybrids with attention or MLPs, other mixers): decoding a
    token reads every weight once, and ``torch``'s products of a few rows stream the weights at about half the
    rate of the panel kernel (measured: ~12-16 GB/s against ~29 GB/s at 2 threads). During a step each linear
    module's ``forward`` is replaced (an instance attribute) by the kernel for inputs of at most ``max_rows``
    rows, and restored when the step returns, so the model is unchanged outside ``step`` (a copy or pickle of
    it never sees the replacement); do not run the same model's forward in another thread during a step.
    Like :class:`FusedDecoder` it holds a packed copy of the weights and says when it is ``stale()``.
    """

    max_rows = 64

    def __init__(self, model):
        from ..ops.decode import cpp
        from .quantization import Int8Linear

        reason = packed_support(model)
        if reason is not None:
            raise ValueError(reason)
        self.ext = cpp.extension()
        self.model = model
        self._versions = _weight_versions(model)
        self._linears = [(module, _linear_args(self.ext, module), module.out_features)
                         for module in model.modules() if type(module) in (nn.Linear, Int8Linear)]

    def _linear(self, module, args, out_features, x):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if x.dtype != torch.float32 or not 0 < rows <= self.max_rows:  # (step runs without autograd)
            return type(module).forward(module, x)
        out = torch.empty(rows, out_features)
        self.ext.linear_out(x.reshape(rows, x.shape[-1]).contiguous(), *args, out)
        return out.view(*x.shape[:-1], out_features)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, state: list):
        """input_ids (B,) -> (logits (B, V_padded), new state); same contract as ``SSMModel.step``."""
        installed = []
        try:
            for module, args, out_features in self._linears:
                if "forward" in module.__dict__:  # already replaced by someone else: left as it is
                    continue
                module.forward = partial(self._linear, module, args, out_features)
                installed.append(module)
            return self.model.step(input_ids, state)
        finally:
            for module in installed:
                del module.forward


def graph_support(model, require_cuda: bool = True) -> Optional[str]:
    """None if :class:`CUDAGraphDecoder` handles ``model``, else the reason it does not."""
    from .blocks import MoE

    cfg = model.config
    if cfg.head != "lm" or cfg.vocab_size is None:
        return f"CUDA-graph decoding needs a token model with an LM head; head={cfg.head!r}"
    if cfg.bidirectional:
        return "a bidirectional model has no recurrent step"
    if cfg.shared_block is not None:
        return "the model's shared attention block (shared_block) keeps a growing KV cache"
    device = next(model.parameters()).device
    if require_cuda and device.type != "cuda":
        return f"CUDA-graph decoding needs a CUDA model; the model is on {device}"
    for i, layer in enumerate(model.backbone.layers):
        if layer.mixer is not None and not layer.mixer.constant_state:
            return (f"layer {i} ({type(layer.mixer).__name__}) keeps a growing cache; a CUDA graph replays fixed "
                    "shapes")
        if isinstance(layer.mlp, MoE):
            return f"layer {i} has an MoE MLP, whose routing is data-dependent (not capturable)"
    return None


def _parameter_addresses(model) -> tuple:
    return tuple(p.data_ptr() for p in model.parameters())


class CUDAGraphDecoder:
    """``step(ids, state) -> (logits (B, V_padded), state)`` like ``SSMModel.step``, replayed from a CUDA graph.

    One graph per batch size (the four most recent are kept), recorded at the first step of that size. The
    logits and state returned are the decoder's own buffers: the state is updated in place by the next step
    and the logits overwritten, so clone them to keep them. The graph holds the weights' addresses: changing
    weights in place is seen, replacing parameter tensors is not (``stale()`` tells; ``generate`` then builds
    a new decoder).
    """

    max_graphs = 4

    def __init__(self, model, capture: bool = True):
        """``capture=False`` runs the same in-place step eagerly instead of recording it (any device): the
        bookkeeping without the graph, for tests on machines without a GPU."""
        reason = graph_support(model, require_cuda=capture)
        if reason is not None:
            raise ValueError(reason)
        self.model = model
        self.capture = capture
        self.device = next(model.parameters()).device
        self._addresses = _parameter_addresses(model)
        self._graphs: "OrderedDict[int, tuple]" = OrderedDict()

    def stale(self) -> bool:
        """Whether a parameter tensor was replaced since the decoder was built."""
        return _parameter_addresses(self.model) != self._addresses

    def _one_token(self, ids: torch.Tensor, state: list) -> torch.Tensor:
        """The step that is recorded: ids (B,) -> logits (B, V), ``state`` updated in place."""
        model = self.model
        h = model.scale_embeddings(model.backbone.embeddings(ids[:, None])[:, 0])
        cross_layer = {}  # what a layer hands to later ones (blocks.py)
        for layer, layer_state in zip(model.backbone.layers, state):
            h = layer.step_inplace(h, layer_state, cross_layer=cross_layer)
        return model._head(h[:, None])[:, 0]

    def prepare(self, batch: int) -> tuple:
        """Record (or fetch) the graph for ``batch`` rows: (graph, ids buffer, state buffers, logits buffer)."""
        if batch in self._graphs:
            self._graphs.move_to_end(batch)
            return self._graphs[batch]
        ids = torch.zeros(batch, dtype=torch.long, device=self.device)
        state = self.model.init_state(batch, device=self.device)
        if not self.capture:
            self._graphs[batch] = (None, ids, state, None)
            return self._graphs[batch]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(side):  # compile the kernels and settle the allocator first
            for _ in range(2):
                self._one_token(ids, state)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            logits = self._one_token(ids, state)
        self._graphs[batch] = (graph, ids, state, logits)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return self._graphs[batch]

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, state: list) -> Tuple[torch.Tensor, list]:
        """input_ids (B,) -> (logits (B, V_padded), state); same contract as ``SSMModel.step`` except that the
        returned state is the decoder's buffer, updated in place at the next step."""
        graph, ids, own_state, logits = self.prepare(input_ids.shape[0])
        if state is not own_state:
            self.model._check_model_state(state)
            for given, own in zip(state, own_state):
                if set(given) != set(own):
                    raise ValueError(f"state has keys {sorted(given)}; this model's layer expects {sorted(own)}")
                for key, buffer in own.items():
                    buffer.copy_(given[key])
        ids.copy_(input_ids)
        if graph is None:
            return self._one_token(ids, own_state), own_state
        graph.replay()
        return logits, own_state


def _cached_decoder(model, key: str, make):
    """The decoder kept in ``model.__dict__[key]`` (left out of copies and pickles: GenerationMixin), built
    again with ``make(model)`` when there is none or it is ``stale()``."""
    decoder = model.__dict__.get(key)
    if decoder is None or decoder.stale():
        model.__dict__.pop(key, None)  # free the old decoder (packed weights, graphs) before building the new one
        decoder = make(model)
        model.__dict__[key] = decoder
    return decoder


def fused_decoder(model) -> FusedDecoder:
    """The model's cached :class:`FusedDecoder` (a new one when a weight changed since it was built)."""
    return _cached_decoder(model, "_fused_decoder", FusedDecoder)


def packed_decoder(model) -> PackedDecoder:
    """The model's cached :class:`PackedDecoder` (a new one when a weight changed since it was built)."""
    return _cached_decoder(model, "_packed_decoder", PackedDecoder)


def graph_decoder(model) -> CUDAGraphDecoder:
    """The model's cached :class:`CUDAGraphDecoder` (a new one when the parameters were replaced)."""
    return _cached_decoder(model, "_cuda_graph_decoder", CUDAGraphDecoder)


def resolve_decode_backend(model, decode_backend: Optional[str]) -> Tuple[str, str]:
    """(backend that will run, why) for ``generate``'s ``decode_backend`` argument (see the module docstring)."""
    if decode_backend is not None and decode_backend not in DECODE_BACKENDS:
        raise ValueError(f"decode_backend must be one of {list(DECODE_BACKENDS)} or None; got {decode_backend!r}")
    on_cuda = next(model.parameters()).device.type == "cuda"
    if decode_backend is None:
        graph_reason = graph_support(model) if on_cuda else "the model is not on a GPU"
        if graph_reason is None:
            return "cuda_graph", "the default on a GPU"
        return "module", f"the default ({graph_reason})" if on_cuda else "the default"
    choice = decode_backend
    if choice == "module":
        return "module", "requested"
    if choice == "cuda_graph":
        reason = graph_support(model)
        if reason is not None:
            raise ValueError(f"decode_backend='cuda_graph': {reason}")
        return "cuda_graph", "requested"
    if choice == "auto" and on_cuda:
        reason = graph_support(model)
        return ("module", f"auto: {reason}") if reason is not None else ("cuda_graph", "auto: a GPU model")
    reason = fused_support(model)
    if choice == "fused":
        if reason is not None:
            raise ValueError(f"decode_backend='fused': {reason}")
        return "fused", "requested"
    packed_reason = packed_support(model)
    if choice == "packed":
        if packed_reason is not None:
            raise ValueError(f"decode_backend='packed': {packed_reason}")
        return "packed", "requested"
    if reason is not None and packed_reason is not None:
        return "module", f"auto: {reason}; {packed_reason}"
    from ..ops.decode import cpp

    if not cpp.is_available():
        return "module", f"auto: the C++ decoding kernels could not be built ({cpp.build_error()})"
    if reason is None:
        return "fused", "auto: supported model and the C++ kernels built"
    return "packed", f"auto: every linear map on the C++ kernels (not fused: {reason})"
