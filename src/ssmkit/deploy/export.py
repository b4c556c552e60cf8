"""Export the recurrence of a model: the one-token step and the chunked prefill, as ONNX or ``.pt2`` programs.

Both programs are pure functions of tensors, so any runtime can drive a stream with them:

    step:     (inputs, *state)  -> (outputs, *new_state)
              inputs (B,) int64 token ids, or (B, input_dim) features; outputs (B, V) logits or (B, output_dim)
    prefill:  (inputs, *state)  -> (outputs of the last position, *new_state)
              inputs (B, C) ids or (B, C, input_dim), C = the fixed chunk length written in the manifest;
              a prompt is read in chunks of C, and its remainder (< C tokens) with the step

The state tensors are the model's per-layer states (``model.init_state``) flattened in layer order, each named
``state.{layer}.{key}`` (``state.0.mamba.ssm``); their shapes and dtypes are listed in ``manifest.json``. ONNX
has no complex arithmetic in its runtimes, so a complex state (S4D, S5) is exported as its real view with a
trailing axis of 2 (real, imaginary), and everything computed from the parameters alone (S4D's Abar =
exp(dt A), Mamba's A = -exp(A_log), ...) is evaluated once at export time and stored as a constant
(:func:`fold_parameter_subgraphs`).

S4, S4D and S5 prefills compute in complex numbers from the inputs, which the ONNX exporter cannot lower: their
ONNX exports hold the step only and prompts are read token by token (``manifest["not_exported"]``); their pt2
exports have both programs.

What cannot be exported: a state that grows with the sequence (attention's KV cache: a stream would need a
fixed maximum length, which the attention mixer does not offer, so those models are refused), bidirectional
models and classifier heads (they read the whole sequence; there is no recurrence to export).

    from ssmkit.deploy.export import export_recurrence, ExportedRecurrence
    export_recurrence(model, "out/onnx", format="onnx")
    runner = ExportedRecurrence("out/onnx")
    tokens = runner.generate(prompt_ids, max_new_tokens=50)      # greedy, prompt (B, L) -> (B, 50)
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..utils.process import process_settings
from . import require

FORMATS = ("onnx", "pt2")
MANIFEST = "manifest.json"


@dataclass
class StateEntry:
    """One state tensor of the exported programs: ``name`` (the graph input/output name), the ``layer`` and
    ``key`` of ``model.init_state``, its ``shape`` and ``dtype`` (as torch names it, e.g. "complex64")."""

    name: str
    layer: int
    key: str
    shape: List[int]
    dtype: str


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_exportable(model) -> None:
    """Raise ValueError naming what cannot be exported (growing states, bidirectional, classifier heads)."""
    config = model.config
    if config.bidirectional:
        raise ValueError("a bidirectional model reads the future and has no recurrence to export")
    if config.head == "classifier":
        raise ValueError("a classifier head pools over the whole sequence; export needs head='lm' or 'regression'")
    if config.shared_block is not None:
        raise ValueError("the model's shared attention block (shared_block) keeps a KV cache that grows with the "
                         "sequence; only mixers with a constant-size state can be exported")
    for i, layer in enumerate(model.backbone.layers):
        if layer.mixer is None:  # an MLP-only layer keeps no state
            continue
        for key, (shape, _kind) in layer.mixer.state_spec(1).items():
            if None in shape:
                raise ValueError(
                    f"layer {i} ({layer.mixer.name}) keeps a state that grows with the sequence "
                    f"({layer.mixer.name}.{key}, a KV cache); only mixers with a constant-size state can be exported "
                    f"(mamba, mamba2, s4, s4d, s5, linear_attention)")


def state_layout(model, batch_size: int = 1) -> List[StateEntry]:
    """The flattened state of the exported programs, in their input (and output) order."""
    dtype = next(model.parameters()).dtype
    entries = []
    for i, layer_state in enumerate(model.init_state(batch_size, device="cpu", dtype=dtype)):
        for key, value in layer_state.items():
            entries.append(StateEntry(f"state.{i}.{key}", i, key, list(value.shape), _dtype_name(value.dtype)))
    return entries


def _embed(model, inputs: torch.Tensor) -> torch.Tensor:
    backbone = model.backbone
    if model.config.vocab_size is not None:
        return model.scale_embeddings(backbone.embeddings(inputs))
    return backbone.input_proj(inputs.to(backbone.input_proj.weight.dtype))


def _head(model, h: torch.Tensor) -> torch.Tensor:
    h = model.backbone.norm_f(h.to(model.backbone.norm_f.weight.dtype))
    return model.cap_logits(model.lm_head(h)) if model.config.head == "lm" else model.regressor(h)


class _Recurrence(nn.Module):
    """Shared by the step and the prefill: flat state tensors <-> the model's per-layer dicts.

    Ids are not range-checked inside the program (a data-dependent check does not trace); the server and the
    runners check them before calling.
    """

    def __init__(self, model, layout: Sequence[StateEntry]):
        super().__init__()
        check_exportable(model)
        self.model = model
        self.layout = list(layout)

    def _unflatten(self, flat: Tuple[torch.Tensor, ...]) -> list:
        states = [dict() for _ in self.model.backbone.layers]
        for entry, value in zip(self.layout, flat):
            states[entry.layer][entry.key] = value
        return states

    def _flatten(self, states: list) -> Tuple[torch.Tensor, ...]:
        return tuple(states[entry.layer][entry.key] for entry in self.layout)


class RecurrentStep(_Recurrence):
    """(inputs (B,) ids or (B, input_dim), *state) -> (outputs (B, V or output_dim), *new_state)."""

    def forward(self, inputs: torch.Tensor, *state: torch.Tensor):
        states = self._unflatten(state)
        h = _embed(self.model, inputs)  # (B, D)
        new_states, cross_layer = [], {}  # what a layer hands to later ones (models/blocks.py)
        for layer, layer_state in zip(self.model.backbone.layers, states):
            h, layer_state = layer.step(h, layer_state, cross_layer=cross_layer)
            new_states.append(layer_state)
        return (_head(self.model, h),) + self._flatten(new_states)


class ChunkPrefill(_Recurrence):
    """(inputs (B, C) ids or (B, C, input_dim), *state) -> (outputs of the last position (B, V), *new_state)."""

    def forward(self, inputs: torch.Tensor, *state: torch.Tensor):
        states = self._unflatten(state)
        h = _embed(self.model, inputs)  # (B, C, D)
        new_states, cross_layer = [], {}
        for layer, layer_state in zip(self.model.backbone.layers, states):
            h, layer_state, _aux = layer(h, layer_state, True, cross_layer=cross_layer)
            new_states.append(layer_state)
        return (_head(self.model, h[:, -1]),) + self._flatten(new_states)


# ----------------------------------------------------------------------------------------------------
def fold_parameter_subgraphs(gm: torch.fx.GraphModule) -> int:
    """Evaluate every node of ``gm`` that depends on parameters and constants only, and store its value as a
    buffer; returns how many values were stored.

    The programs recompute things like S4D's complex Abar = exp(dt A) or Mamba's A = -exp(A_log) at every
    token; folding them once is what an edge runtime wants, and it is what makes complex-parameter mixers
    exportable to ONNX, whose runtimes have no complex exponential (only the complex products with the state
    remain, which the exporter lowers to real arithmetic).
    """
    graph = gm.graph
    is_constant, values, folded = {}, {}, 0

    def value_of(node):
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        if node not in values:
            args = torch.fx.node.map_arg(node.args, value_of)
            kwargs = torch.fx.node.map_arg(node.kwargs, value_of)
            values[node] = node.target(*args, **kwargs)
        return values[node]

    for node in graph.nodes:
        if node.op == "get_attr":
            is_constant[node] = True
        elif node.op == "call_function":
            # no inputs (arange, full, scalar_tensor) is constant too, unless it draws random numbers
            random = torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
            is_constant[node] = not random and all(is_constant.get(n, False) for n in node.all_input_nodes)
        else:
            is_constant[node] = False
    for node in list(graph.nodes):
        if node.op != "call_function" or not is_constant[node]:
            continue
        if all(is_constant[user] for user in node.users):
            continue  # an inner node of a folded subgraph: its value only feeds other folded values
        with torch.no_grad():
            value = value_of(node)
        if not isinstance(value, torch.Tensor):
            continue
        name = f"_folded_{folded}"
        folded += 1
        gm.register_buffer(name, value.detach().clone(memory_format=torch.contiguous_format))
        with graph.inserting_before(node):
            replacement = graph.get_attr(name)
        node.replace_all_uses_with(replacement)
    graph.eliminate_dead_code()
    gm.recompile()
    return folded


def complex_values_on_inputs(gm: torch.fx.GraphModule) -> bool:
    """Whether a node left after :func:`fold_parameter_subgraphs` computes a complex tensor.

    S4D's and S5's parallel forms (Vandermonde kernel with the state, final state, scan) and S4's prefill from
    a state compute in complex numbers from the inputs; the ONNX exporter lowers only a few complex
    operations (products, sums, views), so ONNX exports of these prefills are not attempted: their prompts are
    read with the step (``manifest["not_exported"]`` says so, and ``ExportedRecurrence.prompt_mode``).
    """
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        values = value if isinstance(value, (list, tuple)) else [value]
        if node.op == "call_function" and any(isinstance(v, torch.Tensor) and v.is_complex() for v in values):
            return True
    return False


def _example_inputs(model, batch_size: int, length: Optional[int]) -> torch.Tensor:
    config = model.config
    if config.vocab_size is not None:
        shape = (batch_size,) if length is None else (batch_size, length)
        return torch.zeros(shape, dtype=torch.long)
    shape = (batch_size, config.input_dim) if length is None else (batch_size, length, config.input_dim)
    return torch.zeros(shape, dtype=next(model.parameters()).dtype)


def _onnx_view(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def export_recurrence(model, directory, format: str = "onnx", batch_size: int = 1, prefill_chunk: int = 64,
                      scan_backend: str = "torch") -> dict:
    """Export the step and the chunked prefill of ``model`` into ``directory``; returns the manifest.

    Writes ``step.{onnx|pt2}``, ``prefill.{onnx|pt2}`` and ``manifest.json`` (state layout, batch size, chunk
    length, vocabulary). The programs run on the CPU in the model's dtype with a fixed ``batch_size``.

    Args:
        model: an :class:`~ssmkit.SSMModel` whose mixers all have a constant-size state (see the module docstring).
        format: "onnx" (needs the ``deploy`` extra: onnx, onnxscript) or "pt2" (``torch.export``).
        prefill_chunk: C, the number of tokens the prefill program reads at once.
        scan_backend: the scan backend Mamba layers use while the prefill is traced; it must be a traceable
            PyTorch one ("torch" or "reference"), not the C++ extension. Restored afterwards.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}; got {format!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive int; got {prefill_chunk!r}")
    if scan_backend not in ("torch", "reference"):
        raise ValueError(f"scan_backend must be 'torch' or 'reference' (traceable); got {scan_backend!r}")
    check_exportable(model)
    if format == "onnx":
        require("onnx", "ONNX export")
        require("onnxscript", "ONNX export")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    layout = state_layout(model, batch_size)
    state = tuple(t for layer in model.init_state(batch_size, device="cpu") for t in layer.values())
    names_in = ["inputs"] + [e.name for e in layout]
    names_out = ["outputs"] + [e.name + ".next" for e in layout]

    # the Mamba scan backend is an execution choice; the traced prefill needs a PyTorch one
    saved_backends = []
    for layer in model.backbone.layers:
        if hasattr(layer.mixer, "backend") and layer.mixer.name == "mamba":
            saved_backends.append((layer.mixer, layer.mixer.backend))
            layer.mixer.backend = scan_backend
    try:
        programs = {"step": (RecurrentStep(model, layout), _example_inputs(model, batch_size, None)),
                    "prefill": (ChunkPrefill(model, layout), _example_inputs(model, batch_size, prefill_chunk))}
        skipped = {}
        for name, (module, inputs) in programs.items():
            # traced with autograd on: S4 caches its discrete system under no_grad keyed on data pointers,
            # which a trace cannot read; with autograd on it builds it from the parameters, and the folding
            # below turns that into constants anyway
            exported = torch.export.export(module, (inputs,) + state)
            # the inference IR inlines autocast regions (the SSM cores run with autocast off), so that the
            # parameter-only parts inside them can be folded too
            folded = exported.run_decompositions({}).module()
            fold_parameter_subgraphs(folded)
            if format == "pt2":
                with torch.no_grad():
                    program = torch.export.export(folded, (inputs,) + state)
                torch.export.save(program, directory / f"{name}.pt2")
                continue
            if name == "prefill" and complex_values_on_inputs(folded):
                skipped["prefill"] = ("the parallel form computes in complex numbers from the inputs, and the ONNX "
                                      "exporter lowers too few complex operations; prompts are read with the step")
                continue
            with torch.no_grad(), warnings.catch_warnings(), process_settings():  # the exporter may touch them
                # the unlifted module says it is in training mode; the model was put in eval mode above
                warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
                program = torch.onnx.export(folded, (inputs,) + state, dynamo=True, input_names=names_in,
                                            output_names=names_out, verbose=False)
            program.save(str(directory / f"{name}.onnx"))
    finally:
        for mixer, backend in saved_backends:
            mixer.backend = backend

    config = model.config
    has_prefill = "prefill" not in skipped
    manifest = {"format": format, "batch_size": batch_size, "prefill_chunk": prefill_chunk if has_prefill else None,
                "programs": ["step", "prefill"] if has_prefill else ["step"], "not_exported": skipped,
                "vocab_size": config.vocab_size, "input_dim": config.input_dim, "head": config.head,
                "dtype": _dtype_name(next(model.parameters()).dtype),
                "complex_state_as_real": format == "onnx",
                "inputs": names_in, "outputs": names_out, "state": [asdict(e) for e in layout],
                "config": config.to_dict()}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, directory / MANIFEST)
    return manifest


# ----------------------------------------------------------------------------------------------------
class ExportedRecurrence:
    """Drives an exported directory (onnxruntime for ONNX, ``torch.export.load`` for pt2).

    States are lists of torch tensors in the manifest's order, in their torch dtype (complex stays complex;
    the ONNX boundary takes real views, without copies).

    Args:
        directory: what :func:`export_recurrence` wrote.
        threads: onnxruntime intra-op threads (None: its default); ignored for pt2.
        step_file: another step program in the same directory (e.g. "step.int8.onnx").
    """

    def __init__(self, directory, threads: Optional[int] = None, step_file: Optional[str] = None):
        directory = Path(directory)
        self.manifest = json.loads((directory / MANIFEST).read_text())
        self.format = self.manifest["format"]
        self.batch_size = self.manifest["batch_size"]
        self.chunk = self.manifest["prefill_chunk"]
        self.vocab_size = self.manifest["vocab_size"]
        self.layout = [StateEntry(**e) for e in self.manifest["state"]]
        suffix = "onnx" if self.format == "onnx" else "pt2"
        files = {"step": step_file or f"step.{suffix}"}
        if "prefill" in self.manifest["programs"]:
            files["prefill"] = f"prefill.{suffix}"
        #: how prompts are read: "prefill+step" (chunks of C, then the remainder) or "step" (token by token,
        #: for ONNX exports of complex-state models; see the module docstring)
        self.prompt_mode = "prefill+step" if "prefill" in files else "step"
        if self.format == "onnx":
            ort = require("onnxruntime", "running an ONNX export")
            options = ort.SessionOptions()
            if threads is not None:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            with process_settings():  # onnxruntime resets the thread's denormal mode: put it back
                self._programs = {k: ort.InferenceSession(str(directory / f), options,
                                                          providers=["CPUExecutionProvider"])
                                  for k, f in files.items()}
        else:
            self._programs = {k: torch.export.load(str(directory / f)).module() for k, f in files.items()}

    def init_state(self) -> List[torch.Tensor]:
        return [torch.zeros(e.shape, dtype=getattr(torch, e.dtype)) for e in self.layout]

    def _run(self, name: str, inputs: torch.Tensor, state: Sequence[torch.Tensor]):
        if self.format == "pt2":
            with torch.no_grad():
                out = self._programs[name](inputs, *state)
            return out[0], list(out[1:])
        feeds = {"inputs": inputs.numpy()}
        feeds.update({e.name: _onnx_view(t).numpy() for e, t in zip(self.layout, state)})
        with process_settings():  # (as above: a run may change the calling thread's denormal mode)
            out = self._programs[name].run(None, feeds)
        new_state = []
        for entry, value in zip(self.layout, out[1:]):
            t = torch.from_numpy(value)
            new_state.append(torch.view_as_complex(t) if entry.dtype.startswith("complex") else t)
        return torch.from_numpy(out[0]), new_state

    def _check_ids(self, ids: torch.Tensor) -> None:
        if self.vocab_size is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, vocab_size={self.vocab_size}); got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def step(self, inputs: torch.Tensor, state: Sequence[torch.Tensor]):
        """inputs (B,) ids or (B, input_dim) -> (outputs (B, V), new state)."""
        self._check_ids(inputs)
        return self._run("step", inputs, state)

    def prefill(self, inputs: torch.Tensor, state: Sequence[torch.Tensor]):
        """inputs (B, L) ids, L >= 1: chunks of C through the prefill program, the remainder through the step
        (every token through the step when ``prompt_mode`` is "step") -> (outputs of the last position, state)."""
        if inputs.dim() < 2 or inputs.shape[1] == 0:
            raise ValueError(f"inputs must be (batch, length >= 1, ...); got {tuple(inputs.shape)}")
        self._check_ids(inputs)
        length = inputs.shape[1]
        full = length - length % self.chunk if self.prompt_mode == "prefill+step" else 0
        out = None
        for start in range(0, full, self.chunk or 1):
            out, state = self._run("prefill", inputs[:, start:start + self.chunk].contiguous(), state)
        for t in range(full, length):
            out, state = self._run("step", inputs[:, t].contiguous(), state)
        return out, state

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, state: Optional[Sequence[torch.Tensor]] = None):
        """Greedy decoding: prompt (B, L) ids -> (new tokens (B, max_new_tokens), final state)."""
        if self.vocab_size is None:
            raise ValueError("generate needs a token model (vocab_size); this export takes real-valued inputs")
        state = self.init_state() if state is None else list(state)
        logits, state = self.prefill(prompt, state)
        tokens = []
        for _ in range(max_new_tokens):
            token = logits[:, : self.vocab_size].argmax(-1)
            tokens.append(token)
            logits, state = self._run("step", token, state)
        return torch.stack(tokens, 1) if tokens else prompt.new_zeros(prompt.shape[0], 0), state
