"""How an op runs: one resolver for every op with several implementations ("backends").

Every op that has fast paths takes ``backend=`` and asks :func:`resolve` which implementation to run, in
this order:

1. the op's own ``backend=`` argument, when it is not ``None`` or ``"auto"``;
2. the innermost :func:`use_backend` context that names a backend this op has;
3. the op's environment variable, where it has one (``SSMKIT_SCAN_BACKEND`` for the selective scan);
4. ``"auto"``: the op's own rule, which depends on the tensors (e.g. "triton" for CUDA tensors, "cpp" for
   CPU float32/float64 tensors where the C++ extension builds).

What ran is never hidden: :func:`record_backends` collects ``(op, backend)`` for every call inside it, and
:func:`last_backend` names the backend of the latest call of one op in the current thread (and context).
Layers record their own (``Mamba.last_backend``). Backends are execution choices: they change speed, never
the numbers beyond rounding, and they are never stored in a model's configuration.

    from ssmkit.ops import use_backend
    with use_backend("triton"):                    # every op that has a Triton backend uses it
        y = model(x)
    with use_backend(selective_scan="cpp", causal_conv1d="torch"):   # per op
        y = model(x)
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple

#: op name -> the backends it has ("auto" excluded), filled by :func:`register_op`
OPS: Dict[str, Tuple[str, ...]] = {}
#: op name -> the environment variable that sets its default backend (outermost choice, below contexts)
ENV_VARS: Dict[str, str] = {}

_choices: contextvars.ContextVar[Tuple[Tuple[Optional[str], str], ...]] = contextvars.ContextVar(
    "ssmkit_backend_choices", default=())
_last: contextvars.ContextVar[Dict[str, str]] = contextvars.ContextVar("ssmkit_last_backends")
_recorders: contextvars.ContextVar[Tuple[list, ...]] = contextvars.ContextVar("ssmkit_backend_recorders",
                                                                              default=())


def register_op(op: str, backends: Tuple[str, ...], env_var: Optional[str] = None) -> None:
    """Declare an op, its backends and optionally the environment variable of its default (done once, by
    the module that defines the op)."""
    OPS[op] = tuple(backends)
    if env_var:
        ENV_VARS[op] = env_var


def _check_backend(op: str, backend: str, what: str = "backend") -> None:
    known = OPS[op]
    if backend != "auto" and backend not in known:
        close = difflib.get_close_matches(str(backend), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{what} must be one of {['auto', *known]} for {op}; got {backend!r}{hint}")


@contextlib.contextmanager
def use_backend(default: Optional[str] = None, **per_op: str) -> Iterator[None]:
    """Choose backends for the ops called inside the ``with`` block (innermost context wins).

    Args:
        default: a backend name for every op that has it ("triton", "torch", "reference", "cpp", ...);
            ops without a backend of that name keep their own choice ("auto" or an outer context).
        per_op: ``op=backend`` for single ops (``selective_scan="cpp"``); names are those of :data:`OPS`.

    An op's explicit ``backend=`` argument still wins over the context.
    """
    for op, backend in per_op.items():
        if op not in OPS:
            close = difflib.get_close_matches(op, list(OPS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"use_backend: unknown op {op!r}; ops with backends are {sorted(OPS)}{hint}")
        _check_backend(op, backend)
    if default is not None and default != "auto":
        every = sorted({b for names in OPS.values() for b in names})
        if default not in every:
            raise ValueError(f"use_backend: default must be one of {every}; got {default!r}")
    added = tuple((op, b) for op, b in per_op.items())
    if default is not None:
        added = ((None, default),) + added
    token = _choices.set(_choices.get() + added)
    try:
        yield
    finally:
        _choices.reset(token)


def resolve(op: str, requested: Optional[str], auto: Callable[[], str]) -> str:
    """The backend ``op`` runs: explicit ``requested`` > :func:`use_backend` context > ``auto()``.

    The choice is recorded (:func:`last_backend`, :func:`record_backends`)."""
    if requested is not None:
        _check_backend(op, requested)
    chosen = requested if requested not in (None, "auto") else None
    if chosen is None:
        for name, backend in reversed(_choices.get()):
            if backend == "auto":
                if name == op:
                    break
                continue
            if name == op or (name is None and backend in OPS[op]):
                chosen = backend
                break
    if chosen is None and op in ENV_VARS:
        value = os.environ.get(ENV_VARS[op], "").strip()
        if value:
            _check_backend(op, value, f"environment variable {ENV_VARS[op]}")
            chosen = value if value != "auto" else None
    if chosen is None:
        chosen = auto()
    _note(op, chosen)
    return chosen


def _note(op: str, backend: str) -> None:
    last = _last.get(None)
    if last is None:
        last = {}
        _last.set(last)
    last[op] = backend
    for recorder in _recorders.get():
        recorder.append((op, backend))


def last_backend(op: str) -> Optional[str]:
    """The backend that the latest call of ``op`` ran in this thread and context, or None."""
    last = _last.get(None)
    return None if last is None else last.get(op)


@contextlib.contextmanager
def record_backends() -> Iterator[List[Tuple[str, str]]]:
    """Collect ``(op, backend)`` for every op call made inside the ``with`` block (nested ones too)."""
    calls: List[Tuple[str, str]] = []
    token = _recorders.set(_recorders.get() + (calls,))
    try:
        yield calls
    finally:
        _recorders.reset(token)
