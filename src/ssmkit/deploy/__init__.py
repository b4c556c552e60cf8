"""Deployment: export the recurrence (ONNX, torch.export), run it outside PyTorch, serve many streams.

An SSM carries a constant-size state per stream, so a device can stream forever and a server can hold many
conversations and resume any of them without reading their history again. This package turns that into
files and a server:

* :mod:`ssmkit.deploy.export`: the one-token step and the chunked prefill as ONNX or ``.pt2`` programs whose
  inputs and outputs are the tokens and the state tensors, plus runners that drive them.
* :mod:`ssmkit.deploy.sessions`: per-conversation states kept in memory up to a cap and spilled to disk
  atomically.
* :mod:`ssmkit.deploy.serve`: an OpenAI-style ``/v1/completions`` server with continuous batching.

ONNX export, onnxruntime and the server need the optional ``deploy`` extra (``pip install ssmkit[deploy]``);
the library imports without it.
"""

from __future__ import annotations

import importlib


def require(module: str, feature: str):
    """Import an optional dependency, or fail with one line that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{feature} needs the optional package {module.split('.')[0]!r}: "
                          f"pip install 'ssmkit[deploy]'") from error
