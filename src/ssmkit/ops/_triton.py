"""Triton GPU kernels for Mamba's selective scan, Mamba-2's SSD, the causal depthwise conv1d and decoding.

Each function here has the signature of the ssmkit op it accelerates, minus ``backend``, and computes the
same function (tests compare both against the sequential references, on outputs, final states and
gradients):

===================================  ===============================================================
``selective_scan_triton``            :func:`ssmkit.ops.mamba.selective_scan`
``selective_state_update_triton``    :func:`ssmkit.ops.mamba.selective_state_update`
``ssd_triton``                       :func:`ssmkit.ops.mamba2.ssd`
``ssd_state_update_triton``          :func:`ssmkit.ops.mamba2.ssd_state_update`
``causal_conv1d_triton``             :func:`ssmkit.ops.conv1d.causal_conv1d`
``causal_conv1d_update_triton``      :func:`ssmkit.ops.conv1d.causal_conv1d_update`
===================================  ===============================================================

The one-token functions also take keyword-only ``state_batch_indices`` (row ``i`` of the batch reads and
writes cache row ``state_batch_indices[i]`` of a larger state, as a serving cache does) and ``inplace``
(update the state tensor in place instead of returning a new one); they are inference-only.

**Triton is optional.** Importing ssmkit never imports triton: the kernel modules load at the first call.
They run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
the first call; slow, for tests). Anything else raises an error that says what is missing;
:func:`triton_available` asks without raising.
"""

from __future__ import annotations

import importlib
import os

import torch

__all__ = [
    "triton_available", "selective_scan_triton", "selective_state_update_triton", "ssd_triton",
    "ssd_state_update_triton", "causal_conv1d_triton", "causal_conv1d_update_triton",
]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_import_error():
    try:
        importlib.import_module("triton")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return exc
    return None


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


#: kernel family -> the module beside its op that holds the Triton kernels
_KERNEL_MODULES = {
    "selective_scan": "ssmkit.ops.mamba.triton",
    "state_update": "ssmkit.ops.mamba.triton_update",
    "ssd": "ssmkit.ops.mamba2.triton",
    "conv1d": "ssmkit.ops.conv1d.triton",
}


def _kernels(name: str):
    if _interpreting():
        _patch_interpreter()
    return importlib.import_module(_KERNEL_MODULES[name])


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


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None):
    """Selective scan (Mamba, Gu & Dao 2023, Alg. 2) on Triton; see :mod:`.selective_scan`.

    Shapes as :func:`ssmkit.ops.mamba.selective_scan`: u, delta, z (batch, dim, L); A (dim, N);
    B, C (batch, N, L) or (batch, groups, N, L); D, delta_bias (dim,); initial_state (batch, dim, N).
    Returns y (batch, dim, L), or ``(y, last_state (batch, dim, N))``; differentiable in every tensor.
    """
    _check_runnable("selective_scan_triton", u)
    return _kernels("selective_scan").selective_scan_triton(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        return_last_state=return_last_state, initial_state=initial_state)


def ssd_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=(0.0, float("inf")), initial_states=None, seq_idx=None, return_final_states=False):
    """Mamba-2 SSD, chunked (Dao & Gu 2024, Sec. 6) on Triton; see :mod:`.ssd`.

    Shapes as :func:`ssmkit.ops.mamba2.ssd`: x, z (batch, L, heads, headdim); dt (batch, L, heads); A, dt_bias
    (heads,); B, C (batch, L, groups, N); D (heads,) or (heads, headdim); initial_states
    (batch, heads, headdim, N); seq_idx (batch, L). Returns y, or ``(y, final_states)`` (float32).
    """
    _check_runnable("ssd_triton", x)
    return _kernels("ssd").ssd_triton(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        initial_states=initial_states, seq_idx=seq_idx, return_final_states=return_final_states)


def causal_conv1d_triton(x, weight, bias=None, initial_state=None, seq_idx=None, activation=None,
                         return_final_state=False):
    """Causal depthwise conv1d (+ SiLU) on Triton; arguments and results as
    :func:`ssmkit.ops.conv1d.causal_conv1d`: x (batch, dim, L) any strides, weight (dim, width) or
    (dim, 1, width), bias (dim,), initial_state (batch, dim, width-1), seq_idx (batch, L)."""
    _check_runnable("causal_conv1d_triton", x)
    return _kernels("conv1d").causal_conv1d_triton(
        x, weight, bias=bias, initial_state=initial_state, seq_idx=seq_idx, activation=activation,
        return_final_state=return_final_state)


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None, *, state_batch_indices=None,
                                inplace=False):
    """One conv step for decoding, as :func:`ssmkit.ops.conv1d.causal_conv1d_update`:
    x (batch, dim), conv_state (batch or cache rows, dim, width-1) -> (y (batch, dim), new state)."""
    _check_runnable("causal_conv1d_update_triton", x)
    return _kernels("conv1d").causal_conv1d_update_triton(
        x, conv_state, weight, bias=bias, activation=activation, state_batch_indices=state_batch_indices,
        inplace=inplace)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *,
                                  state_batch_indices=None, inplace=False):
    """One Mamba decoding step, as :func:`ssmkit.ops.mamba.selective_state_update`:
    state (batch, dim, N), x, dt, z (batch, dim), A (dim, N), B, C (batch, N) or (batch, groups, N),
    D, dt_bias (dim,) -> ``(y (batch, dim), new_state)``."""
    _check_runnable("selective_state_update_triton", x)
    return _kernels("state_update").selective_state_update_triton(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        state_batch_indices=state_batch_indices, inplace=inplace)


def ssd_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                            dt_limit=(0.0, float("inf")), *, state_batch_indices=None, inplace=False):
    """One Mamba-2 decoding step, as :func:`ssmkit.ops.mamba2.ssd_state_update`: state
    (batch, heads, headdim, N), x, z (batch, heads, headdim), dt (batch, heads), A, dt_bias (heads,),
    B, C (batch, groups, N), D (heads,) or (heads, headdim) -> ``(y, new_state)``."""
    _check_runnable("ssd_state_update_triton", x)
    return _kernels("state_update").ssd_state_update_triton(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        state_batch_indices=state_batch_indices, inplace=inplace)
