"""Mamba-2's SSD (state space duality) scan: ``ssd`` for whole sequences, ``ssd_state_update`` for one token.

Signatures and semantics follow mamba_ssm's ``mamba_chunk_scan_combined`` and, for one token, its
``selective_state_update`` in the Mamba-2 layout (Dao & Gu 2024, arXiv 2405.21060), so ported code changes
only its import. The shapes, the glossary and the recurrence are in ``reference.py``, the argument checks
every backend shares in ``args.py``.

Backends of :func:`ssd` (``backend=``):
    ``"torch"``      the chunked SSD algorithm in pure PyTorch (``chunked.py``, paper Sec. 6);
    ``"reference"``  the sequential loop over time (``reference.py``), the specification;
    ``"triton"``     GPU kernels (``triton.py``, ``triton_update.py``; CUDA tensors; raises if triton is missing).
    ``"auto"``       ``"triton"`` for CUDA tensors when triton imports, else ``"torch"``.
``backend=None`` (or "auto") defers to the innermost :func:`ssmkit.ops.use_backend` context, then to the
"auto" rule; :func:`last_backend` names the backend that ran last, so "auto" is never a silent choice.
"""

from __future__ import annotations


from ..backends import last_backend as _last_backend
from ..backends import register_op, resolve
from .._triton import _check_runnable, auto_picks_triton, load_kernels, triton_available
from .args import DEFAULT_DT_LIMIT
from .chunked import ssd_chunked, ssd_state_update_torch
from .norm_reference import rmsnorm_gated_ref
from .reference import ssd_ref, ssd_state_update_ref

__all__ = ["ssd", "ssd_ref", "ssd_state_update", "ssd_state_update_ref", "last_backend", "available_backends",
           "BACKENDS", "ssd_triton", "ssd_state_update_triton", "rmsnorm_gated", "rmsnorm_gated_ref"]

BACKENDS = ("auto", "triton", "torch", "reference")
register_op("ssd", BACKENDS[1:])
register_op("ssd_state_update", ("torch", "triton"))
register_op("rmsnorm_gated", ("torch", "triton"))


def last_backend():
    """The backend that the latest :func:`ssd` call ran in this thread, or None."""
    return _last_backend("ssd")


def available_backends() -> list[str]:
    """Backends of :func:`ssd` that can run here."""
    return (["triton"] if triton_available() else []) + ["torch", "reference"]


def ssd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=DEFAULT_DT_LIMIT, initial_states=None, seq_idx=None, return_final_states=False,
        backend=None):
    """Mamba-2 SSD over whole sequences (drop-in for mamba_ssm's ``mamba_chunk_scan_combined``).

    Args:
        x: (batch, L, heads, headdim), any L >= 1.
        dt: (batch, L, heads); A: (heads,), negative reals.
        B, C: (batch, L, groups, N), groups dividing heads; head h reads group h // (heads // groups).
        chunk_size: chunk length of the chunked algorithm (a tuning knob; results do not depend on it).
        D: (heads,) or (heads, headdim), optional skip; z: like x, optional gate y <- (y + D x) * silu(z).
        dt_bias: (heads,); dt_softplus, dt_limit: dt <- clamp(softplus(dt + dt_bias), *dt_limit), the clamp
            applied only when dt_limit is not the default (0, inf).
        initial_states: (batch, heads, headdim, N), the state before the first token; with ``seq_idx`` it
            applies to the first packed sequence of each row only.
        seq_idx: (batch, L) integer ids of packed sequences, non-decreasing per row; the state restarts
            from zero where the id changes.
        return_final_states: also return the state after the last token.
        backend: "auto", "triton", "torch" or "reference" (see the module docstring).

    Returns:
        y (batch, L, heads, headdim) in x's dtype, or ``(y, final_states)`` with final_states
        (batch, heads, headdim, N) in float32 (float64 for float64 inputs).
    """
    chosen = resolve("ssd", backend, lambda: "triton" if auto_picks_triton(x) else "torch")
    if chosen == "triton":
        fn = ssd_triton
    else:
        fn = ssd_chunked if chosen == "torch" else ssd_ref
    out = fn(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
             dt_limit=dt_limit, initial_states=initial_states, seq_idx=seq_idx,
             return_final_states=return_final_states)
    return out


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=DEFAULT_DT_LIMIT, backend=None, *, inplace=False):
    """One token of the SSD recurrence (the recurrent mode used by ``step``).

    Args: state (batch, heads, headdim, N); x, z (batch, heads, headdim); dt (batch, heads); A, dt_bias
    (heads,); B, C (batch, groups, N); D (heads,) or (heads, headdim); dt_softplus, dt_limit as in :func:`ssd`.
    Returns: ``(y (batch, heads, headdim) in x's dtype, new_state in state's dtype)``; ``state`` is not
    modified. ``backend``: "torch", "triton" (fused GPU kernel, inference only) or "auto" ("triton" for CUDA
    tensors when triton imports and gradients are off, else "torch"). ``inplace=True`` writes the new state
    into ``state`` and returns it (for decoding loops and CUDA graphs).
    """
    chosen = resolve("ssd_state_update", backend,
                     lambda: "triton" if auto_picks_triton(x, inference_only=True) else "torch")
    if chosen == "triton":
        return ssd_state_update_triton(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                       dt_limit=dt_limit, inplace=inplace)
    y, new_state = ssd_state_update_torch(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                          dt_softplus=dt_softplus, dt_limit=dt_limit)
    return (y, state.copy_(new_state)) if inplace else (y, new_state)


def ssd_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=DEFAULT_DT_LIMIT, initial_states=None, seq_idx=None, return_final_states=False):
    """The "triton" backend of :func:`ssd` (chunked, Dao & Gu 2024 Sec. 6; kernels in ``triton.py``).

    Shapes as :func:`ssd`: x, z (batch, L, heads, headdim); dt (batch, L, heads); A, dt_bias (heads,); B, C
    (batch, L, groups, N); D (heads,) or (heads, headdim); initial_states (batch, heads, headdim, N); seq_idx
    (batch, L). Returns y, or ``(y, final_states)`` (float32).
    """
    _check_runnable("ssd_triton", x)
    return load_kernels("ssmkit.ops.mamba2.triton").ssd_triton(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        initial_states=initial_states, seq_idx=seq_idx, return_final_states=return_final_states)


def ssd_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                            dt_limit=DEFAULT_DT_LIMIT, *, state_batch_indices=None, inplace=False):
    """The "triton" backend of :func:`ssd_state_update` (``triton_update.py``; inference only): state
    (batch, heads, headdim, N), x, z (batch, heads, headdim), dt (batch, heads), A, dt_bias (heads,),
    B, C (batch, groups, N), D (heads,) or (heads, headdim) -> ``(y, new_state)``. Keyword-only
    ``state_batch_indices`` and ``inplace`` as in :func:`ssmkit.ops.mamba.selective_state_update_triton`."""
    _check_runnable("ssd_state_update_triton", x)
    return load_kernels("ssmkit.ops.mamba2.triton_update").ssd_state_update_triton(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        state_batch_indices=state_batch_indices, inplace=inplace)


def rmsnorm_gated(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False, backend=None):
    """Mamba-2's gated RMSNorm (``norm_reference.py`` has the equations): x, z (..., hidden) (z may be None),
    weight (hidden,) -> (..., hidden) in x's dtype, normalised per group of ``group_size`` channels (default:
    all of them) in float32.

    ``backend``: "torch" (the reference's tensor operations), "triton" (one fused kernel forward and one
    backward: ``triton_norm.py``) or "auto" ("triton" for CUDA tensors when triton imports, else "torch").
    """
    from ..._checks import check_tensor

    check_tensor("x", x)
    hidden = x.shape[-1] if x.dim() else 0
    if z is not None:
        check_tensor("z", z)
        if z.shape != x.shape:
            raise ValueError(f"z must have x's shape {tuple(x.shape)}; got {tuple(z.shape)}")
    check_tensor("weight", weight)
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be (hidden={hidden},); got {tuple(weight.shape)}")
    group_size = hidden if group_size is None else group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or hidden % group_size:
        raise ValueError(f"group_size must be a positive divisor of hidden={hidden}; got {group_size!r}")
    chosen = resolve("rmsnorm_gated", backend, lambda: "triton" if auto_picks_triton(x) else "torch")
    if chosen == "triton":
        _check_runnable("rmsnorm_gated", x)
        return load_kernels("ssmkit.ops.mamba2.triton_norm").rmsnorm_gated_triton(
            x, z, weight, eps, group_size, norm_before_gate)
    return rmsnorm_gated_ref(x, z, weight, eps, group_size, norm_before_gate)
