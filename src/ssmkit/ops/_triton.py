"""The shared Triton runtime: availability checks, the lazy loading of kernel modules, and the shims that let
the kernels run on the CPU under Triton's interpreter.

The kernels themselves live beside their ops (``ops/mamba/triton.py``, ``ops/mamba/triton_update.py``,
``ops/mamba2/triton.py``, ``ops/mamba2/triton_update.py``, ``ops/conv1d/triton.py``). Each op package
has thin ``*_triton`` functions that check with ``_check_runnable`` here and then import their kernel
module with :func:`load_kernels`, so that importing ssmkit never imports triton. The argument checks of
the one-token kernels' serving-cache options (``state_batch_indices``, ``inplace``) are here too, being
shared by three kernel files.

**Triton is optional.** The kernel modules load at the first call. They run on CUDA tensors, or on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before the first call; slow, for tests).
Anything else raises an error that says what is missing; :func:`triton_available` asks without raising.
"""

from __future__ import annotations

import importlib
import os

import torch

from .._checks import check_shape, check_tensor

__all__ = ["triton_available", "auto_picks_triton", "load_kernels", "real_associative_scan", "INTERPRETER_SHIM_VERSIONS"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_import_error():
    try:
        importlib.import_module("triton")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return exc
    return None


def auto_picks_triton(t, inference_only: bool = False) -> bool:
    """The "auto" rule shared by every op with a Triton backend: CUDA tensors of a dtype the kernels take
    (float32, bfloat16, float16; float64 stays on the PyTorch paths), without gradients for the one-token
    (inference-only) kernels, and triton importable."""
    return (isinstance(t, torch.Tensor) and t.is_cuda and t.dtype in _SUPPORTED_DTYPES
            and not (inference_only and torch.is_grad_enabled()) and triton_available())


def triton_available(device=None) -> bool:
    """Whether the triton backend can run here: the ``triton`` package imports, and ``device`` (default:
    CUDA if present) is a CUDA device, or the CPU under ``TRITON_INTERPRET=1``."""
    if _triton_import_error() is not None:
        return False
    if device is None:
        return torch.cuda.is_available() or _interpreting()
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreting()


def _check_runnable(op: str, tensor: torch.Tensor) -> None:
    """Raise a clear error when the triton kernels cannot run on ``tensor`` (called by every op)."""
    err = _triton_import_error()
    if err is not None:
        raise ImportError(f"{op}: the triton backend needs the 'triton' package (pip install triton); "
                          f"importing it failed: {err}") from err
    if tensor.device.type == "cuda":
        pass
    elif tensor.device.type == "cpu":
        if not _interpreting():
            raise RuntimeError(f"{op}: the triton backend runs on CUDA tensors, or on CPU tensors under Triton's "
                               "interpreter (set TRITON_INTERPRET=1 before the first triton call); got CPU "
                               "tensors without it")
    else:
        raise RuntimeError(f"{op}: the triton backend runs on CUDA tensors; got a tensor on {tensor.device}")
    if tensor.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: the triton kernels take float32, bfloat16 or float16 tensors; got {tensor.dtype} "
                        "(use backend='torch' or 'reference' for float64)")


def load_kernels(module: str):
    """Import the kernel module ``module`` (e.g. ``"ssmkit.ops.mamba.triton"``), first installing the
    interpreter shims when ``TRITON_INTERPRET=1``; the op packages call it only after :func:`_check_runnable`."""
    if _interpreting():
        _patch_interpreter()
    return importlib.import_module(module)


_interpreter_patched = False

#: Triton releases whose interpreter internals the shims below were written against and tested with.
#: The shims patch private classes, so under any other release the interpreter refuses to run (compiled
#: kernels on a GPU are not affected: they never touch the shims).
INTERPRETER_SHIM_VERSIONS = ("3.6",)

#: Whether the interpreter runs our linear-recurrence ``tl.associative_scan`` vectorised (shim 2 below)
#: rather than through Triton's own element-by-element combine. Tests switch it off to run the real
#: combine function at a tiny size (:func:`real_associative_scan`).
fast_interpreter_scan = True


class real_associative_scan:
    """Context manager: under the interpreter, run ``tl.associative_scan`` with the kernel's real combine
    function (Triton's generic path) instead of the vectorised shim; restores the previous setting."""

    def __enter__(self):
        global fast_interpreter_scan
        self._previous, fast_interpreter_scan = fast_interpreter_scan, False
        return self

    def __exit__(self, *exc):
        global fast_interpreter_scan
        fast_interpreter_scan = self._previous
        return False


def _check_interpreter_version() -> None:
    import triton

    version = getattr(triton, "__version__", "unknown")
    if not any(version == v or version.startswith(v + ".") for v in INTERPRETER_SHIM_VERSIONS):
        raise RuntimeError(
            f"ssmkit's shims for Triton's CPU interpreter (TRITON_INTERPRET=1) are known to work with triton "
            f"{', '.join(v + '.x' for v in INTERPRETER_SHIM_VERSIONS)}; found triton {version}. Install a "
            f"known version (pip install 'triton=={INTERPRETER_SHIM_VERSIONS[-1]}.*') to run the kernels on "
            "the CPU, or run them compiled on a GPU")


def _patch_interpreter() -> None:
    """Two shims for Triton's CPU interpreter (used by the tests); compiled kernels are untouched.

    1. Loops with run-time bounds under numpy >= 2.4: the interpreter holds every scalar as a 1-element
       array and converts it for ``range`` with ``int(array)``, which numpy 2.4 refuses ("only
       0-dimensional arrays can be converted to Python scalars"). The conversion it installs
       (``tensor.__index__``) is wrapped to read the single element instead.
    2. Speed: the interpreter runs ``tl.associative_scan`` with a user combine function one element at a
       time in Python. For our linear-recurrence operator (marked ``_ssmkit_linear_recurrence``) the same
       sequential recurrence is run vectorised over the other axes; any other operator keeps the generic path,
       and so does ours inside :class:`real_associative_scan` (a test runs the real combine that way).

    They patch private classes of ``triton.runtime.interpreter``: an unknown Triton release is refused with
    a clear message (:data:`INTERPRETER_SHIM_VERSIONS`) rather than patched blindly.
    """
    global _interpreter_patched
    if _interpreter_patched:
        return
    _check_interpreter_version()
    from triton.runtime import interpreter as _interp
    scope_cls = _interp._LangPatchScope
    original = scope_cls.set_attr
    scan_cls = _interp.ScanOps
    generic_scan = scan_cls.generic_scan
    import numpy as np

    _interpreter_patched = True

    def set_attr(self, obj, name, value):
        if name == "__index__":
            def value(tensor):  # noqa: F811 - replaces the interpreter's conversion
                return int(tensor.handle.data.reshape(-1)[0])
        return original(self, obj, name, value)

    def fast_scan(self, inputs):
        fn = getattr(self.combine_fn, "fn", None)
        if (not fast_interpreter_scan or not getattr(fn, "_ssmkit_linear_recurrence", False)
                or len(inputs) != 2):
            return generic_scan(self, inputs)
        # inputs arrive already flipped for reverse scans; h_t = a_t h_{t-1} + b_t along self.axis
        a = np.moveaxis(inputs[0].handle.data, self.axis, -1)
        b = np.moveaxis(inputs[1].handle.data, self.axis, -1).copy()
        a_cum = a.copy()
        for t in range(1, a.shape[-1]):
            b[..., t] += a[..., t] * b[..., t - 1]
            a_cum[..., t] *= a_cum[..., t - 1]
        return [self.to_tensor(np.moveaxis(a_cum, -1, self.axis), inputs[0].dtype),
                self.to_tensor(np.moveaxis(b, -1, self.axis), inputs[1].dtype)]

    scope_cls.set_attr = set_attr
    scan_cls.generic_scan = fast_scan

    # 3. Speed: every call of a nested jit function (tl.sum, tl.sigmoid, our helpers) re-patches the
    #    language modules (~3 ms a call, most of the interpreter's time). Those nested patches are never
    #    undone by the interpreter, and the kernel's own patch covers ``tl`` itself, so patching once per set
    #    of language modules a function sees is equivalent.
    fn_cls = getattr(_interp, "InterpretedFunction", None)
    patch_lang = getattr(_interp, "_patch_lang", None)
    if fn_cls is None or patch_lang is None or not hasattr(fn_cls, "rewrite"):
        return
    import inspect

    import triton.language as tl
    seen_keys, seen_fns = set(), set()

    def call(self, *args, **kwargs):
        if self.fn not in seen_fns:
            seen_fns.add(self.fn)
            key = frozenset(id(v) for v in self.fn.__globals__.values()
                            if inspect.ismodule(v) and v in (tl, tl.core))
            if key not in seen_keys:
                patch_lang(self.fn)
                seen_keys.add(key)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise _interp.InterpreterError(repr(e)) from e

    fn_cls.__call__ = call


# --- arguments shared by the one-token (decoding) kernels -------------------------------------------------

def check_state_batch_indices(state_batch_indices, batch: int, rows: int, device) -> torch.Tensor:
    """Validate ``state_batch_indices``: integer (batch,) on ``device`` with values in [0, rows)."""
    check_tensor("state_batch_indices", state_batch_indices, floating=False)
    if state_batch_indices.is_floating_point() or state_batch_indices.is_complex() \
            or state_batch_indices.dtype == torch.bool:
        raise TypeError(f"state_batch_indices must be an integer tensor; got dtype {state_batch_indices.dtype}")
    check_shape("state_batch_indices", state_batch_indices, (batch,), f"(batch={batch},)")
    if state_batch_indices.device != device:
        raise ValueError(f"state_batch_indices is on {state_batch_indices.device} but x is on {device}")
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing and batch > 0:  # a range check syncs, so it is skipped inside CUDA-graph capture
        lo, hi = int(state_batch_indices.min()), int(state_batch_indices.max())
        if lo < 0 or hi >= rows:
            raise ValueError(f"state_batch_indices must lie in [0, {rows}) (the state's rows); got values "
                             f"from {lo} to {hi}")
    return state_batch_indices


def check_inference_only(op: str, tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op} is inference-only (no backward); call it under torch.no_grad(), or use the "
                           "torch backend to differentiate through decoding steps")


def output_state(state, batch, idx, inplace):
    """The tensor a one-token kernel writes the new state into: ``state`` itself when ``inplace``."""
    if inplace:
        return state
    if idx is None:
        return torch.empty_like(state, memory_format=torch.contiguous_format)
    return state.clone()  # every cache row, the selected ones then overwritten


def rows_view(state, batch):
    """A (batch, ...) view of a cache with any number of rows, for the shared shape checks (no copy)."""
    return state[:1].expand(batch, *state.shape[1:]) if state.shape[0] >= 1 else state
