"""Selective scan in C++ (CPU, float32/float64), compiled at first use, with a checkpointed backward.

Same equations and glossary as :mod:`.reference` (Mamba, Gu & Dao 2023, Eq. (2), Algorithm 2). The kernel
in ``csrc/selective_scan.cpp`` runs the recurrence sequentially in time, one (batch, channel) pair per task
(tasks spread over threads with ATen's ``parallel_for``, so ``torch.set_num_threads`` governs it), with the
N states of a task held in SIMD vectors (N padded to a multiple of 8 floats / 4 doubles; a branch-free vector
exp included). Denormals are flushed inside the kernel on every thread and the caller's floating-point mode
is restored on exit.

Memory: the forward keeps only the state at the start of every ``CHECKPOINT_INTERVAL``-th step,
(batch, dim, ceil(L / K), N). The backward walks the chunks from last to first, replays each chunk's
forward from its checkpoint into a (K, N) buffer per task, and runs the reverse-time adjoint recurrence

    lambda_t = C_t * dy_t + exp(Delta_{t+1} A) * lambda_{t+1},      lambda_L = d(loss)/d(h_L)

from which dA, dDelta, du, dB, dC and d(h_0) = exp(Delta_1 A) * lambda_1 follow step by step. No
(batch, dim, L, N) tensor exists in forward or backward.

The elementwise parts (delta_bias + softplus, the D skip term, the silu(z) gate and their gradients) are
fused into the kernel's per-channel passes; only the small B and C are transposed to (batch, groups, L, N)
on the Python side. u, delta, z and the incoming gradient of y are read with their own strides, so channel-last
views (what the Mamba layer passes on the CPU: u and z column slices of one (batch, L, 2 d_inner) projection)
are not copied; y and the gradients of u, delta and z are written in their inputs' layout (channel-last for a
channel-last input), so the next matrix product reads them without a transposing copy either.

Build: ``torch.utils.cpp_extension.load`` with ``-O3 -march=native`` (plus ``-fopenmp`` on Linux, which ATen's
``parallel_for`` needs to use several threads) into ``build_directory()``: ``$SSMKIT_BUILD_DIR`` if set,
else ``~/.cache/ssmkit/torch_extensions/<tag>``, where the tag names the Python and torch versions and a
hash of the CPU model, so a home directory shared between machines never loads a binary built for another
CPU. Building takes about a minute once; later
processes load the cached library (torch rebuilds only when the source or flags change).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

from .args import check_scan_args

logger = logging.getLogger(__name__)

EXTENSION_NAME = "ssmkit_selective_scan"
SOURCE = Path(__file__).resolve().parent / "csrc" / "selective_scan.cpp"
#: time steps between stored states; the backward replays at most this many steps per chunk
CHECKPOINT_INTERVAL = 64

_lock = threading.Lock()
_module = None
_error: str | None = None
_tried = False


def _cpu_fingerprint() -> str:
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def build_directory() -> Path:
    """Where the compiled extension is cached (created on first use)."""
    override = os.environ.get("SSMKIT_BUILD_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    torch_tag = torch.__version__.replace("+", "_")
    python_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    tag = f"{python_tag}-torch{torch_tag}-{platform.machine()}-{_cpu_fingerprint()}"
    return Path(base) / "ssmkit" / "torch_extensions" / tag


def _compile_flags() -> list[str]:
    flags = ["-O3"]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        flags.append("-march=native")
    elif machine in ("aarch64", "arm64"):
        flags.append("-mcpu=native")
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")  # ATen's parallel_for needs _OPENMP to run tasks on several threads
    return flags


def compile_extension(name: str, source: Path, title: str):
    """Build (or load from the on-disk cache) one C++ extension with these flags into :func:`build_directory`.

    Returns ``(module, None)``, or ``(None, error message)`` when the compiler, linker or loader fails. Before a
    build with nothing cached it says so on stderr (about a minute, once per machine), so a first call never
    blocks silently. Shared by every C++ extension of ssmkit (the scan here, the decoding kernels)."""
    try:
        from torch.utils import cpp_extension

        flags = _compile_flags()
        ldflags = ["-fopenmp"] if "-fopenmp" in flags else []
        # one folder per (source, flags) version: two checkouts or versions of ssmkit sharing the cache each
        # keep their own build, instead of rebuilding over each other and waiting on one lock file
        digest = hashlib.sha256(source.read_bytes() + " ".join(flags + ldflags).encode()).hexdigest()[:12]
        directory = build_directory() / f"{name}-{digest}"
        directory.mkdir(parents=True, exist_ok=True)
        fresh = not (any(directory.glob(f"{name}*.so")) or any(directory.glob(f"{name}*.pyd")))
        if fresh:
            print(f"ssmkit: compiling the C++ {title} into {directory} (about a minute, once per machine; "
                  "`ssmkit build` does this ahead of time)...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        module = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=ldflags,
                                    build_directory=str(directory), verbose=False)
        if fresh:
            print(f"ssmkit: C++ {title} ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        return module, None
    except Exception as exc:  # any failure of compiler, linker or loader means "not available here"
        message = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {' | '.join(message[-6:]) if message else ''}"
        logger.warning("the C++ %s could not be built: %s", title, error)
        return None, error


def _load():
    global _module, _error, _tried
    with _lock:
        if not _tried:
            _tried = True
            _module, _error = compile_extension(EXTENSION_NAME, SOURCE, "selective scan")
        return _module


def is_available() -> bool:
    """Build (once per process; the binary is cached on disk) and report whether the extension loads."""
    return _load() is not None


def build_error() -> str | None:
    """Why the extension is unavailable (None if it loaded or was not tried yet)."""
    return _error


def supports(u: torch.Tensor) -> bool:
    """Whether the C++ kernel handles tensors like ``u`` (CPU, float32 or float64)."""
    return isinstance(u, torch.Tensor) and u.device.type == "cpu" and u.dtype in (torch.float32, torch.float64)


def _extension():
    module = _load()
    if module is None:
        raise RuntimeError(f"the C++ selective scan extension could not be built or loaded "
                           f"(build directory {build_directory()}): {_error}")
    return module


def _or_empty(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return x if x is not None else like.new_empty(0)


class _SelectiveScanCpp(torch.autograd.Function):
    """Autograd wrapper of the C++ kernel; B, C arrive as given ((batch, N, L) or (batch, groups, N, L))."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, interval):
        ext = _extension()
        ctx.set_materialize_grads(False)  # a missing gradient (y or last state unused) arrives as None
        # (batch, groups, L, N): each step reads its N values contiguously
        B_t = (B if B.dim() == 4 else B.unsqueeze(1)).transpose(-1, -2).contiguous()
        C_t = (C if C.dim() == 4 else C.unsqueeze(1)).transpose(-1, -2).contiguous()
        keep = any(ctx.needs_input_grad)
        y, last, checkpoints = ext.forward(u, delta, A, B_t, C_t, _or_empty(D, u), _or_empty(z, u),
                                           _or_empty(delta_bias, u), _or_empty(initial_state, u), delta_softplus,
                                           interval, keep)
        if keep:
            ctx.save_for_backward(u, delta, A, B_t, C_t, D, z, delta_bias, checkpoints)
            ctx.config = (delta_softplus, interval, B.dim(), C.dim())
        return y, last

    @staticmethod
    def backward(ctx, grad_out, grad_last):
        ext = _extension()
        u, delta, A, B_t, C_t, D, z, delta_bias, checkpoints = ctx.saved_tensors
        delta_softplus, interval, b_dim, c_dim = ctx.config
        (grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias, grad_h0) = ext.backward(
            u, delta, A, B_t, C_t, _or_empty(D, u), _or_empty(z, u), _or_empty(delta_bias, u), delta_softplus,
            checkpoints, _or_empty(grad_out, u), _or_empty(grad_last, u), interval)
        grad_B = grad_B.transpose(-1, -2)
        grad_C = grad_C.transpose(-1, -2)
        if b_dim == 3:
            grad_B = grad_B.squeeze(1)
        if c_dim == 3:
            grad_C = grad_C.squeeze(1)
        return (grad_u, grad_delta, grad_A.sum(0), grad_B, grad_C,
                grad_D.sum(0) if D is not None else None,
                grad_z if z is not None else None,
                grad_bias.sum(0) if delta_bias is not None else None,
                grad_h0 if ctx.needs_input_grad[8] else None, None, None)


def selective_scan_cpp(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, checkpoint_interval: int = CHECKPOINT_INTERVAL):
    """Selective scan by the C++ kernel; arguments and returns as :func:`.reference.selective_scan_ref`.

    ``checkpoint_interval`` (K >= 1) trades backward recomputation buffers for stored states.
    Raises ``RuntimeError`` if the extension cannot be built, ``TypeError``/``ValueError`` for tensors it
    does not handle (not on the CPU, or not float32/float64).
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if u.device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors only; got u on {u.device}")
    if u.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"backend 'cpp' supports float32 and float64; got u of dtype {u.dtype}")
    if isinstance(checkpoint_interval, bool) or not isinstance(checkpoint_interval, int) or checkpoint_interval < 1:
        raise ValueError(f"checkpoint_interval must be an int >= 1; got {checkpoint_interval!r}")
    _extension()
    y, last = _SelectiveScanCpp.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus),
                                      checkpoint_interval)
    return (y, last) if return_last_state else y
