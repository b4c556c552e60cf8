"""The C++ decoding kernels (``csrc/decode.cpp``), compiled at first use like the C++ selective scan.

Build: ``torch.utils.cpp_extension.load`` with the scan's flags (``-O3 -march=native``, ``-fopenmp`` on Linux)
into the scan's cache directory (:func:`ssmkit.ops.mamba.cpp.build_directory`), under its own name.
When no compiled library is cached yet, a line on stderr says that a build of about a minute is starting, so
a first call never blocks silently; ``ssmkit build`` runs that step ahead of time.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

from ..mamba.cpp import _compile_flags, build_directory

logger = logging.getLogger(__name__)

EXTENSION_NAME = "ssmkit_decode"
SOURCE = Path(__file__).resolve().parent / "csrc" / "decode.cpp"

_lock = threading.Lock()
_module = None
_error: str | None = None
_tried = False


def _cached_library_exists(directory: Path) -> bool:
    return any(directory.glob(f"{EXTENSION_NAME}*.so")) or any(directory.glob(f"{EXTENSION_NAME}*.pyd"))


def _load():
    global _module, _error, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        try:
            from torch.utils import cpp_extension

            directory = build_directory()
            directory.mkdir(parents=True, exist_ok=True)
            flags = _compile_flags()
            ldflags = ["-fopenmp"] if "-fopenmp" in flags else []
            fresh = not _cached_library_exists(directory)
            if fresh:
                print(f"ssmkit: compiling the C++ decoding kernels into {directory} (about a minute, once per "
                      "machine; `ssmkit build` does this ahead of time)...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            _module = cpp_extension.load(name=EXTENSION_NAME, sources=[str(SOURCE)], extra_cflags=flags,
                                         extra_ldflags=ldflags, build_directory=str(directory), verbose=False)
            if fresh:
                print(f"ssmkit: C++ decoding kernels ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                      flush=True)
        except Exception as exc:  # any failure of compiler, linker or loader means "not available here"
            message = str(exc).strip().splitlines()
            _error = f"{type(exc).__name__}: {' | '.join(message[-6:]) if message else ''}"
            _module = None
            logger.warning("the C++ decoding kernels could not be built: %s", _error)
        return _module


def is_available() -> bool:
    """Build (once per process; the binary is cached on disk) and report whether the extension loads."""
    return _load() is not None


def build_error() -> str | None:
    """Why the extension is unavailable (None if it loaded or was not tried yet)."""
    return _error


def extension():
    """The loaded extension module; ``RuntimeError`` naming the build error if it cannot be built here."""
    module = _load()
    if module is None:
        raise RuntimeError(f"the C++ decoding kernels could not be built or loaded (build directory "
                           f"{build_directory()}): {_error}. Use decode_backend='module' (the per-layer "
                           f"PyTorch step), or install a C++ compiler and run `ssmkit build`.")
    return module
