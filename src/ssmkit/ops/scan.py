"""Diagonal linear recurrences ``h_t = a_t * h_{t-1} + b_t``, sequentially and as parallel scans.

The recurrence is elementwise (a diagonal transition), real or complex, with time along any dimension.
It is the state update of every diagonal SSM once discretised: in S5 (Smith, Warrington, Linderman,
ICLR 2023; parallel scans: its background section and appendix) ``a_t = Lambda_bar`` and ``b_t = B_bar u_t``.

Glossary (code name = S5 symbol):

===========  =========================================================================================
``a``        the transition ``a_t`` (S5: the diagonal of ``Lambda_bar``), broadcastable to ``b``; a size-1
             time extent means the same ``a`` at every step (time-invariant systems: cheaper)
``b``        the input term ``b_t`` (S5: ``B_bar u_t``)
``h``        the states ``h_t``, one per time step (S5: ``x_k``)
``h0``       the state before the first step (``h_{-1}``); zero when omitted
``dim``      the time dimension of the broadcast shape of ``a`` and ``b``
``reverse``  run backwards in time: ``h_t = a_t * h_{t+1} + b_t`` with ``h_L = h0``
===========  =========================================================================================

Three ways to compute the same numbers:

* :func:`linear_recurrence_ref`: a plain loop over time, the specification.
* :func:`associative_scan`: the parallel prefix scan with the associative operator
  ``(a_i, b_i) o (a_j, b_j) = (a_j a_i, a_j b_i + b_j)`` of S5: the odd/even recursion
  (pair neighbours, scan the half-length sequence of pairs, fill in the even positions), ``O(L)`` work
  and ``O(log L)`` depth, for any ``L``. Only the ``b`` half of each prefix is ever needed, so the prefix
  products of ``a`` are not formed.
* :func:`chunked_scan`: split time into chunks of ``T``; scan every chunk from a zero state at once
  (a loop of ``T`` vectorised steps), carry the chunk-end states across chunk boundaries (a loop of
  ``L / T`` steps), then add each chunk's carried-in state times the running product of ``a`` inside the
  chunk. The running products are built by multiplication, never by dividing cumulative products (which
  under- and overflows for decaying ``a``).

All three are differentiable (``a``, ``b`` and ``h0``): the reference through autograd over its loop, the
fast two through :class:`_ScanFunction`, whose backward is the same scan run the other way in time (the
adjoint recurrence), saving only ``h``; double backward works. The result has the promoted dtype of
``a``, ``b`` and ``h0``; the gradient of a real input is real (a real ``a`` with a complex ``b``). On CPU, scans
over long sequences of small decaying ``a`` hit subnormal numbers; ``torch.set_flush_denormal(True)``
avoids a large slow-down (a process-wide setting, left to the caller).

Which is fastest depends on the size of one time step. Measured on one CPU thread (complex64, L = 4096,
time-invariant a; forward / forward + backward): 8 x 32 channels (S5-sized): reference 27 / 139 ms,
associative 7 / 15 ms, chunked (T = 64) 5 / 14 ms; 256 x 64 channels: reference 527 / 1833 ms,
associative 828 / 1671 ms, chunked 432 / 1128 ms. Small steps are bound by the loop's per-step overhead,
large ones by memory traffic (there the associative scan's extra passes cost most).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._checks import check_choice, check_positive_int, check_tensor
from .backends import register_op, resolve

BACKENDS = ("reference", "associative", "chunked")
register_op("linear_recurrence", BACKENDS)


# --------------------------------------------------------------------------------------------------
# Argument handling shared by every backend
# --------------------------------------------------------------------------------------------------
def _prepare(a, b, h0, dim) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
    """Validate; return a, b (time first; a with time extent 1 or L), h0 (state shape) and dim in range."""
    check_tensor("a", a, complex_ok=True)
    check_tensor("b", b, complex_ok=True)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int; got {type(dim).__name__}")
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"a and b must broadcast to one shape; got a {tuple(a.shape)} and b {tuple(b.shape)}")
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("a and b must have a time dimension; got two scalars")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim - 1}] for the broadcast shape {tuple(shape)}; "
                         f"got {dim}")
    dim = dim % ndim
    L = shape[dim]
    if L == 0:
        raise ValueError(f"the time dimension (dim={dim}) must hold at least one step; got shape {tuple(shape)}")
    a = a.reshape((1,) * (ndim - a.dim()) + tuple(a.shape))
    a_steps = a.shape[dim]  # 1 (time-invariant) or L
    a = a.expand(shape[:dim] + (a_steps,) + shape[dim + 1:]).movedim(dim, 0)
    b = b.expand(shape).movedim(dim, 0)
    if h0 is not None:
        check_tensor("h0", h0, complex_ok=True)
        state_shape = shape[:dim] + shape[dim + 1:]
        try:
            ok = torch.broadcast_shapes(h0.shape, state_shape) == state_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"h0 must broadcast to the state shape {tuple(state_shape)} (the shape of a*b "
                             f"without dim={dim}); got {tuple(h0.shape)}")
        if h0.device != b.device:
            raise ValueError(f"h0 is on {h0.device} but b is on {b.device}")
        h0 = h0.expand(state_shape)
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    return a, b, h0, dim


def _result_dtype(a, b, h0) -> torch.dtype:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return dtype if h0 is None else torch.promote_types(dtype, h0.dtype)


# --------------------------------------------------------------------------------------------------
# Reference: the specification
# --------------------------------------------------------------------------------------------------
def linear_recurrence_ref(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None,
                                dim: int = -1, reverse: bool = False) -> torch.Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` (``h_{-1} = h0`` or 0) by a loop over time.

    Args:
        a: transition, broadcastable to ``b``'s shape (time extent L or 1), real or complex.
        b: input term, broadcastable with ``a``; time along ``dim``.
        h0: optional initial state, broadcastable to the broadcast shape without ``dim``.
        dim: the time dimension of the broadcast shape.
        reverse: run backwards in time, ``h_t = a_t * h_{t+1} + b_t`` with ``h_L = h0`` (the second scan
            of a bidirectional layer).

    Returns:
        h with the broadcast shape of ``a`` and ``b`` (time along ``dim``) and their promoted dtype.
    """
    a, b, h0, dim = _prepare(a, b, h0, dim)
    L = b.shape[0]
    a_steps = list(a.unbind(0)) if a.shape[0] == L else [a[0]] * L
    b_steps = list(b.unbind(0))
    order = range(L - 1, -1, -1) if reverse else range(L)
    h = h0
    states: List[torch.Tensor] = [None] * L
    for t in order:
        h = b_steps[t] if h is None else a_steps[t] * h + b_steps[t]
        states[t] = h
    out = torch.stack(states, dim=0)
    return out.to(_result_dtype(a, b, h0)).movedim(0, dim)


# --------------------------------------------------------------------------------------------------
# Fast cores: time first, no autograd (the gradient is the adjoint recurrence, see _ScanFunction)
# --------------------------------------------------------------------------------------------------
def _associative_core(a: torch.Tensor, b: torch.Tensor, first: Optional[torch.Tensor] = None,
                      reverse: bool = False) -> torch.Tensor:
    """Prefix scan over dim 0 from a zero state by odd/even recursion.

    a: (L or 1, ...), b: (L, ...). Forward: ``h_t = a_t h_{t-1} + b_t``; reverse: ``h_t = a_t h_{t+1} + b_t``.
    ``first``, when given, replaces the input of the first step in scan order (``b[0]``, or ``b[L-1]`` when
    reversed), which folds in an initial state without copying b. Returns h (L, ...) in a new tensor.

    Neighbours are paired (the earlier one in scan order on the left), the pairs are scanned recursively
    (half the length), which gives the state at the later element of every pair; each remaining position
    then takes one step from the state next to it.
    """
    L = b.shape[0]
    dtype = torch.promote_types(a.dtype, b.dtype)
    if first is not None:
        dtype = torch.promote_types(dtype, first.dtype)
    out = torch.empty(b.shape, dtype=dtype, device=b.device)
    start = L - 1 if reverse else 0
    out[start] = b[start] if first is None else first
    if L == 1:
        return out
    n_pairs = L // 2
    if reverse:
        # pairs (L-1, L-2), (L-3, L-4), ... stored in ascending order of time: o = 1 leaves index 0 unpaired
        o = L % 2
        left, right = slice(o + 1, L, 2), slice(o, L - 1, 2)
        rest, rest_from = slice(1 - o, L - 1, 2), slice(1 - o, None)  # h_i = a_i h_{i+1} + b_i
        first_pair = -1
    else:
        left, right = slice(0, 2 * n_pairs, 2), slice(1, 2 * n_pairs, 2)
        rest, rest_from = slice(2, L, 2), slice(0, (L - 1) // 2)  # h_2k = a_2k h_{2k-1} + b_2k
        first_pair = 0
    constant = a.shape[0] == 1
    if constant:
        a_right = a_rest = a
        pair_a = a * a
    else:
        a_right, a_rest = a[right], a[rest]
        pair_a = a_right * a[left]
    # (a_l, b_l) o (a_r, b_r) = (a_r a_l, a_r b_l + b_r)
    pair_b = torch.addcmul(b[right], a_right, b[left]).to(dtype)
    if first is not None:
        pair_b[first_pair] = a_right[0 if constant else first_pair] * first + b[right][first_pair]
    states_at_right = _associative_core(pair_a, pair_b, reverse=reverse)
    out[right] = states_at_right
    if out[rest].shape[0]:
        torch.addcmul(b[rest], a_rest, states_at_right[rest_from], out=out[rest])
    return out


def _chunked_core(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor], chunk_size: int,
                  reverse: bool = False) -> torch.Tensor:
    """Two-level chunked scan over dim 0. a: (L or 1, ...), b: (L, ...), h0: (...) or None -> h (L, ...).

    1. scan every chunk from a zero state, all chunks at once (``T`` vectorised steps), and keep the running
       product of ``a`` inside each chunk (multiplied step by step: no division by cumulative products);
    2. carry the chunk-end states across the ``L // T`` chunk boundaries;
    3. add to each chunk its carried-in state times the running product.
    The ``L mod T`` steps left over (at the end of the scan order) continue sequentially from the last
    carried state. ``reverse`` runs ``h_t = a_t h_{t+1} + b_t`` from ``t = L-1`` down (chunks from the end).
    """
    L = b.shape[0]
    dtype = torch.promote_types(a.dtype, b.dtype)
    if h0 is not None:
        dtype = torch.promote_types(dtype, h0.dtype)
    constant = a.shape[0] == 1
    rest = tuple(b.shape[1:])
    T = chunk_size
    n_chunks = L // T
    main = n_chunks * T
    chunked = slice(L - main, L) if reverse else slice(0, main)
    leftover = range(L - main - 1, -1, -1) if reverse else range(main, L)
    steps = range(T - 1, -1, -1) if reverse else range(T)  # scan order inside a chunk
    out = torch.empty(b.shape, dtype=dtype, device=b.device)
    carry = h0
    if n_chunks > 0:
        h_chunks = out[chunked].view((n_chunks, T) + rest)  # (C, T, ...), written in place
        b_chunks = b[chunked].reshape((n_chunks, T) + rest)
        a_chunks = a[0:1].unsqueeze(1) if constant else a[chunked].reshape((n_chunks, T) + rest)
        decay = torch.empty((a_chunks.shape[0], T) + rest, dtype=a.dtype, device=a.device)  # (C or 1, T, ...)
        # 1. all chunks from a zero state, and the running products of a
        t0, previous = steps[0], None
        h_chunks[:, t0] = b_chunks[:, t0]
        decay[:, t0] = a_chunks[:, 0 if constant else t0]
        for t in steps:
            if previous is not None:
                a_t = a_chunks[:, 0 if constant else t]
                torch.addcmul(b_chunks[:, t], a_t, h_chunks[:, previous], out=h_chunks[:, t])
                torch.mul(decay[:, previous], a_t, out=decay[:, t])
            previous = t
        # 2. the state entering each chunk, in scan order
        t_end = steps[-1]
        ends_h, ends_a = h_chunks[:, t_end], decay[:, t_end]
        entering = torch.zeros((n_chunks,) + rest, dtype=dtype, device=b.device)
        for c in (range(n_chunks - 1, -1, -1) if reverse else range(n_chunks)):
            if carry is None:
                carry = ends_h[c].clone()
            else:
                entering[c] = carry
                carry = torch.addcmul(ends_h[c], ends_a[0 if constant else c], carry)
        # 3. decay the carried-in state through each chunk
        if n_chunks > 1 or h0 is not None:
            h_chunks.addcmul_(decay, entering.unsqueeze(1))
    for t in leftover:  # the steps that fill no whole chunk, sequentially
        if carry is None:
            out[t] = b[t]
        else:
            torch.addcmul(b[t], a[0 if constant else t], carry, out=out[t])
        carry = out[t]
    return out


def _forward_core(a, b, h0, backend, chunk_size, reverse):
    if backend == "associative":
        first = None
        if h0 is not None:
            t0 = b.shape[0] - 1 if reverse else 0
            first = a[0 if a.shape[0] == 1 else t0] * h0 + b[t0]
        return _associative_core(a, b, first, reverse)
    return _chunked_core(a, b, h0, chunk_size, reverse)


class _ScanFunction(torch.autograd.Function):
    """h = scan(a, b, h0) on time-first tensors, with the adjoint recurrence as its backward.

    With the conjugate (Wirtinger) gradients PyTorch uses, the gradient ``lam_t = dLoss/dh_t`` (all paths)
    of the forward scan obeys the same recurrence run backwards in time,
    ``lam_t = g_t + conj(a_{t+1}) lam_{t+1}``, so it is computed with the same core (reversed, with ``a``
    shifted by one step); then ``grad b_t = lam_t``, ``grad a_t = lam_t conj(h_{t-1})`` (``h_{-1} = h0``),
    ``grad h0 = conj(a_0) lam_0``. A reverse scan mirrors this. Only ``h`` is saved, and the backward is
    made of differentiable ops, so double backward works too.
    """

    @staticmethod
    def forward(ctx, a, b, h0, backend, chunk_size, reverse):
        h = _forward_core(a, b, h0, backend, chunk_size, reverse)
        ctx.backend, ctx.chunk_size, ctx.reverse = backend, chunk_size, reverse
        ctx.a_dtype, ctx.b_dtype = a.dtype, b.dtype
        ctx.h0_dtype = None if h0 is None else h0.dtype
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        reverse = ctx.reverse
        constant = a.shape[0] == 1
        a_conj = a.conj() if a.is_complex() else a
        if constant:
            a_adjoint = a_conj
        elif reverse:  # lam_t = g_t + conj(a_{t-1}) lam_{t-1}; step 0 has no predecessor
            a_adjoint = torch.cat([torch.ones_like(a_conj[:1]), a_conj[:-1]], dim=0)
        else:  # lam_t = g_t + conj(a_{t+1}) lam_{t+1}; step L-1 has no successor
            a_adjoint = torch.cat([a_conj[1:], torch.ones_like(a_conj[:1])], dim=0)
        lam = _ScanFunction.apply(a_adjoint, grad_h, None, ctx.backend, ctx.chunk_size, not reverse)
        grad_a = grad_b = grad_h0 = None
        t0 = h.shape[0] - 1 if reverse else 0  # the step that sees h0
        if ctx.needs_input_grad[0]:
            # grad a_t = lam_t conj(state before step t)
            h_before = h[1:] if reverse else h[:-1]
            lam_after = lam[:-1] if reverse else lam[1:]
            h_before = h_before.conj() if h_before.is_complex() else h_before
            if h0 is not None:
                at_t0 = lam[t0] * (h0.conj() if h0.is_complex() else h0)
            else:
                at_t0 = torch.zeros_like(lam[t0])
            if torch.is_grad_enabled():  # double backward: differentiable ops only
                steps = lam_after * h_before
                if constant:
                    grad_a = (steps.sum(0) + at_t0).unsqueeze(0)
                else:
                    pieces = [steps, at_t0.unsqueeze(0)] if reverse else [at_t0.unsqueeze(0), steps]
                    grad_a = torch.cat(pieces, dim=0)
            elif constant:  # sum over time in blocks: no (L, ...) temporary
                grad_a = at_t0.clone()
                for i in range(0, lam_after.shape[0], 256):
                    grad_a += (lam_after[i:i + 256] * h_before[i:i + 256]).sum(0)
                grad_a = grad_a.unsqueeze(0)
            else:
                grad_a = torch.empty_like(lam)
                grad_a[t0] = at_t0
                torch.mul(lam_after, h_before, out=grad_a[:-1] if reverse else grad_a[1:])
            grad_a = _as_grad(grad_a, ctx.a_dtype)
        if ctx.needs_input_grad[1]:
            grad_b = _as_grad(lam, ctx.b_dtype)
        if h0 is not None and ctx.needs_input_grad[2]:
            grad_h0 = _as_grad(a_conj[0 if constant else t0] * lam[t0], ctx.h0_dtype)
        return grad_a, grad_b, grad_h0, None, None, None


def _as_grad(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of a real input is the real part of the complex one (PyTorch's convention)."""
    if grad.is_complex() and not dtype.is_complex:
        grad = grad.real
    return grad.to(dtype)


# --------------------------------------------------------------------------------------------------
# Public fast paths
# --------------------------------------------------------------------------------------------------
def associative_scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None, dim: int = -1,
                     reverse: bool = False) -> torch.Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` by a parallel associative scan (S5's operator).

    Same arguments, result and dtype as :func:`linear_recurrence_ref`. ``O(L)`` work, ``O(log L)``
    depth; ``h0`` is folded into the first step (``b_0 <- a_0 h0 + b_0``). Differentiable: the backward is
    the same scan run the other way in time (see :class:`_ScanFunction`).
    """
    a, b, h0, dim = _prepare(a, b, h0, dim)
    return _ScanFunction.apply(a, b, h0, "associative", 0, bool(reverse)).movedim(0, dim)


def chunked_scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None, dim: int = -1,
                 reverse: bool = False, chunk_size: int = 64) -> torch.Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` by a two-level chunked scan.

    Same arguments, result and dtype as :func:`linear_recurrence_ref`, plus ``chunk_size`` (T).
    Sequential depth ``T + L/T`` (about ``2 sqrt(L)`` at ``T = sqrt(L)``), every step vectorised over the
    chunks; the ``L mod T`` steps left over continue sequentially from the last carried state.
    """
    check_positive_int("chunk_size", chunk_size)
    a, b, h0, dim = _prepare(a, b, h0, dim)
    return _ScanFunction.apply(a, b, h0, "chunked", chunk_size, bool(reverse)).movedim(0, dim)


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None, dim: int = -1,
                      reverse: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` (or reversed) with ``backend`` in :data:`BACKENDS`; None or "auto" means
    the :func:`ssmkit.ops.use_backend` context, else "associative"."""
    if backend is not None:  # this op has no "auto": a named backend or None (the context, else associative)
        check_choice("backend", backend, BACKENDS)
    backend = resolve("linear_recurrence", backend, lambda: "associative")
    if backend == "reference":
        return linear_recurrence_ref(a, b, h0, dim, reverse)
    if backend == "associative":
        return associative_scan(a, b, h0, dim, reverse)
    return chunked_scan(a, b, h0, dim, reverse)
