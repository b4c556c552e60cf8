"""Mamba's selective scan (S6) and its one-token update, with explicit, visible backends.

Signatures follow mamba_ssm (``selective_scan_fn``, ``selective_state_update``), so code ports by
changing an import. Equations and the glossary of names are in :mod:`.reference`.

Backends of :func:`selective_scan` (argument ``backend``):

==============  ===================================================================================
``"reference"`` :func:`selective_scan_ref`, the sequential specification (slow, for tests)
``"torch"``     :mod:`.chunked`, pure PyTorch, chunked over time, any device and dtype
``"cpp"``       :mod:`.cpp`, a C++ scan compiled at first use (CPU, float32/float64); raises if the
                extension cannot be built
``"triton"``    :mod:`.triton`, GPU kernels (CUDA tensors; float32, bfloat16, float16);
                raises if triton is not installed
``"auto"``      ``"triton"`` for CUDA tensors when triton imports; ``"cpp"`` for CPU float32/float64
                tensors when the extension builds; else ``"torch"``; a failed build is reported once
                with ``warnings.warn``
==============  ===================================================================================

Both fast backends are differentiable with respect to every tensor argument, keep only per-chunk states
for the backward (recomputing the rest), and so never hold a (batch, dim, L, N) tensor. On the CPU the
C++ backend is several times faster than the torch one (see the benchmark table in the docs).

``backend=None`` (or "auto") defers to the innermost :func:`ssmkit.ops.use_backend` context, then to the
``$SSMKIT_SCAN_BACKEND`` if set, then the "auto" rule; :func:`last_backend` names the backend that ran the most recent call, so "auto" is never silent.

Files: ``reference.py`` (the specification), ``args.py`` (argument checks shared by every backend),
``chunked.py``, ``cpp.py`` (+ ``csrc/``), ``triton.py`` and ``triton_update.py`` (the fast paths).
"""

from __future__ import annotations

import warnings


from ..backends import last_backend as _last_backend
from ..backends import register_op, resolve
from .._triton import _check_runnable, auto_picks_triton, load_kernels, triton_available
from . import cpp as _cpp
from .args import mixed_precision
from .chunked import flush_denormals, selective_scan_chunked
from .reference import selective_scan_ref, selective_state_update_ref

__all__ = [
    "selective_scan", "selective_scan_ref", "selective_scan_chunked", "selective_state_update",
    "selective_state_update_ref", "last_backend", "available_backends", "BACKENDS",
    "flush_denormals", "selective_scan_triton", "selective_state_update_triton",
]

BACKENDS = ("auto", "cpp", "triton", "torch", "reference")
ENV_VAR = "SSMKIT_SCAN_BACKEND"
register_op("selective_scan", BACKENDS[1:], env_var=ENV_VAR)
register_op("selective_state_update", ("torch", "triton"))

_warned_auto_fallback = False


def available_backends() -> list[str]:
    """Backends that can run here. Checking ``"cpp"`` builds the extension if it is not built yet."""
    names = ["torch", "reference"]
    if triton_available():
        names.insert(0, "triton")
    if _cpp.is_available():
        names.insert(0, "cpp")
    return names


def last_backend() -> str | None:
    """Name of the backend ("cpp", "triton", "torch" or "reference") that ran the latest selective_scan call
    in this thread (see :func:`ssmkit.ops.record_backends` to collect every call)."""
    return _last_backend("selective_scan")


def _auto(u) -> str:
    global _warned_auto_fallback
    if u.is_cuda:
        return "triton" if auto_picks_triton(u) else "torch"
    if not _cpp.supports(u):
        return "torch"  # the C++ kernel exists only for CPU float32/float64
    if _cpp.is_available():
        return "cpp"
    if not _warned_auto_fallback:
        _warned_auto_fallback = True
        warnings.warn(f"ssmkit selective_scan: the C++ backend could not be built, so backend='auto' runs the "
                      f"pure-PyTorch backend ('torch'), which is slower. Reason: {_cpp.build_error()}",
                      RuntimeWarning, stacklevel=4)
    return "torch"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, backend: str | None = None):
    """Selective scan of Mamba (Gu & Dao 2023, Eq. (2), Algorithm 2), as mamba_ssm's ``selective_scan_fn``.

    Args:
        u, delta: (batch, dim, L).
        A: (dim, N), real.
        B, C: (batch, N, L) or (batch, groups, N, L), ``groups`` dividing ``dim``; channel ``d`` uses
            group ``d // (dim // groups)``.
        D, delta_bias: optional (dim,). With half-precision u (bfloat16, float16), A, D and delta_bias may
            be float32, as mamba_ssm allows.
        z: optional (batch, dim, L); the output is multiplied by silu(z).
        delta_softplus: replace delta by softplus(delta + delta_bias).
        return_last_state: also return the state after the last step.
        initial_state: optional (batch, dim, N) state before the first step (zeros when omitted); in u's
            dtype or, for half-precision u, float32.
        backend: "auto", "cpp", "triton", "torch", "reference" or None (see the module docstring).

    Returns:
        y (batch, dim, L) in u's dtype, or ``(y, last_state)`` with last_state (batch, dim, N) in the compute
        dtype (u's; float32 for half-precision u, as mamba_ssm). Gradients flow to every tensor argument,
        including initial_state, and in from last_state.
    """
    name = resolve("selective_scan", backend, lambda: _auto(u))
    if name != "triton" and mixed_precision(u, A, D, delta_bias, initial_state):
        # float32 parameters or state beside half-precision activations (accepted as mamba_ssm accepts them):
        # the kernels other than Triton's take one dtype, so they compute in float32 and return y in u's
        # dtype (and the last state in float32, as for any half-precision u)
        f32 = [t.float() if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
        out = selective_scan(*f32[:7], delta_bias=f32[7], delta_softplus=delta_softplus,
                             return_last_state=return_last_state, initial_state=f32[8], backend=name)
        return (out[0].to(u.dtype), out[1]) if return_last_state else out.to(u.dtype)
    if name == "triton":
        out = selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                    initial_state)
    elif name == "cpp":
        out = _cpp.selective_scan_cpp(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                      initial_state)
    else:
        fn = selective_scan_chunked if name == "torch" else selective_scan_ref
        with flush_denormals():
            out = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    return out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           backend: str | None = None, *, inplace: bool = False):
    """One decoding step of the selective scan, as mamba_ssm's ``selective_state_update``.

    Args:
        state: (batch, dim, N), the state before this token. Unlike mamba_ssm it is NOT updated in place:
            the new state is returned as a new tensor, so autograd can run through a chain of steps.
        x, dt: (batch, dim); A: (dim, N); B, C: (batch, N) or (batch, groups, N); D, dt_bias: optional
            (dim,); z: optional (batch, dim) gate; dt_softplus: dt <- softplus(dt + dt_bias).

    Returns:
        ``(y (batch, dim), new_state (batch, dim, N))``.

    ``backend``: "torch" (a handful of vectorised tensor operations: the reference itself), "triton" (the
    fused GPU kernel; inference only, it refuses to run with gradients enabled), or "auto": "triton" for
    CUDA tensors when triton imports and gradients are off, else "torch".

    ``inplace=True`` writes the new state into ``state`` and returns it as the second result (the form a
    decoding loop or a CUDA graph wants: the state keeps its address); the Triton kernel then skips a copy.
    """
    name = resolve("selective_state_update", backend,
                   lambda: "triton" if auto_picks_triton(x, inference_only=True) else "torch")
    if name == "triton":
        return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, inplace=inplace)
    y, new_state = selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return (y, state.copy_(new_state)) if inplace else (y, new_state)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None):
    """The "triton" backend of :func:`selective_scan` (kernels in ``triton.py``), without the resolver.

    Shapes as :func:`selective_scan`: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or
    (batch, groups, N, L); D, delta_bias (dim,); initial_state (batch, dim, N). Returns y (batch, dim, L), or
    ``(y, last_state (batch, dim, N))``; differentiable in every tensor.
    """
    _check_runnable("selective_scan_triton", u)
    return load_kernels("ssmkit.ops.mamba.triton").selective_scan_triton(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        return_last_state=return_last_state, initial_state=initial_state)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *,
                                  state_batch_indices=None, inplace=False):
    """The "triton" backend of :func:`selective_state_update` (``triton_update.py``; inference only):
    state (batch, dim, N), x, dt, z (batch, dim), A (dim, N), B, C (batch, N) or (batch, groups, N),
    D, dt_bias (dim,) -> ``(y (batch, dim), new_state)``. Keyword-only ``state_batch_indices`` (row ``i`` reads
    and writes cache row ``state_batch_indices[i]`` of a larger state) and ``inplace`` (update ``state``)."""
    _check_runnable("selective_state_update_triton", x)
    return load_kernels("ssmkit.ops.mamba.triton_update").selective_state_update_triton(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        state_batch_indices=state_batch_indices, inplace=inplace)


# Also reachable from the function, for code that holds only ``from ssmkit.ops import selective_scan``.
selective_scan.last_backend = last_backend
selective_scan.available_backends = available_backends
