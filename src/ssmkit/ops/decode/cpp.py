"""The C++ decoding kernels (``csrc/decode.cpp``), compiled at first use like the C++ selective scan.

Build: ``torch.utils.cpp_extension.load`` with the scan's flags (``-O3 -march=native``, ``-fopenmp`` on Linux)
into the scan's cache directory (:func:`ssmkit.ops.mamba.cpp.build_directory`), under its own name.
When no compiled library is cached yet, a line on stderr says that a build of about a minute is starting, so
a first call never blocks silently; ``ssmkit build`` runs that step ahead of time.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..mamba.cpp import build_directory, compile_extension

logger = logging.getLogger(__name__)

EXTENSION_NAME = "ssmkit_decode"
SOURCE = Path(__file__).resolve().parent / "csrc" / "decode.cpp"

_lock = threading.Lock()
_module = None
_error: str | None = None
_tried = False


def _load():
    global _module, _error, _tried
    with _lock:
        if not _tried:
            _tried = True
            _module, _error = compile_extension(EXTENSION_NAME, SOURCE, "decoding kernels")
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
