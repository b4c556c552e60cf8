"""Conversation states kept by the server: a few in memory, every committed one on disk.

A session is the model state after the last token of a conversation (``model.init_state`` layout, batch 1),
never its text: continuing it reads only the new prompt. ``commit`` writes the state to
``<directory>/<session_id>.safetensors`` before it returns (write-through), so a committed session survives a
restart or a crash; memory keeps the ``max_in_memory`` most recently used states so that a busy conversation
is not read back from disk at every turn.

A write is atomic: the new version goes to a temporary file in the same directory, is flushed to the disk
(fsync), and then replaces the old file with ``os.replace``; a process killed at any point leaves either the
previous version or the new one, never a mix. Temporary files left by a killed process are removed when a
store opens the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional

import torch

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUFFIX = ".safetensors"


class SessionError(ValueError):
    """A session request that cannot be honoured (bad id, too many sessions, another model's state)."""


def check_session_id(session_id) -> str:
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise SessionError(f"session_id must be 1-64 characters from [A-Za-z0-9_.-] starting with a letter or "
                           f"digit; got {session_id!r}")
    return session_id


def model_fingerprint(config) -> str:
    """A short hash of the architecture, written with each session so another model's state is refused."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()[:16]


class SessionStore:
    """Session states on disk (every committed one) with an LRU cache of ``max_in_memory`` in memory.

    Args:
        directory: where the ``<id>.safetensors`` files live (created if missing).
        fingerprint: :func:`model_fingerprint` of the serving model.
        max_sessions: how many sessions may exist at all (on disk); a new one beyond it is refused.
        max_in_memory: how many states are cached in memory.
    """

    def __init__(self, directory, fingerprint: str, max_sessions: int = 10_000, max_in_memory: int = 64):
        for name, value in (("max_sessions", max_sessions), ("max_in_memory", max_in_memory)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.max_sessions, self.max_in_memory = max_sessions, max_in_memory
        self._memory: "OrderedDict[str, list]" = OrderedDict()
        self._lock = threading.Lock()
        for leftover in self.directory.glob("*.tmp"):  # a write interrupted by a crash: never committed
            leftover.unlink(missing_ok=True)

    def _path(self, session_id: str) -> Path:
        return self.directory / (check_session_id(session_id) + SUFFIX)

    def exists(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._memory or self._path(session_id).exists()

    def count(self) -> int:
        return sum(1 for _ in self.directory.glob("*" + SUFFIX))

    def check_can_create(self, session_id: str) -> None:
        """Raise SessionError when ``session_id`` is new and the store is full."""
        if not self.exists(session_id) and self.count() >= self.max_sessions:
            raise SessionError(f"the server holds max_sessions={self.max_sessions} sessions; continue an existing "
                               f"one or ask the operator to raise the limit")

    def get(self, session_id: str) -> Optional[list]:
        """The committed state of ``session_id`` (a list of per-layer dicts), or None for a new session."""
        path = self._path(session_id)
        with self._lock:
            if session_id in self._memory:
                self._memory.move_to_end(session_id)
                return self._memory[session_id]
        if not path.exists():
            return None
        state = self._read(path)
        self._remember(session_id, state)
        return state

    def commit(self, session_id: str, state: List[dict]) -> None:
        """Write ``state`` (batch 1) to disk atomically, then cache it."""
        path = self._path(session_id)
        state = [{k: v.detach().to("cpu").contiguous() for k, v in layer.items()} for layer in state]
        self._write(path, state)
        self._remember(session_id, state)

    def _remember(self, session_id: str, state: list) -> None:
        with self._lock:
            self._memory[session_id] = state
            self._memory.move_to_end(session_id)
            while len(self._memory) > self.max_in_memory:  # already on disk: dropping from memory loses nothing
                self._memory.popitem(last=False)

    # ------------------------------------------------------------------------------------------------
    def _write(self, path: Path, state: list) -> None:
        from safetensors.torch import save

        tensors, complex_keys = {}, []
        for i, layer in enumerate(state):
            for key, value in layer.items():
                name = f"{i}/{key}"
                if value.is_complex():  # safetensors stores real dtypes; keep the (real, imag) view
                    complex_keys.append(name)
                    value = torch.view_as_real(value).contiguous()
                tensors[name] = value
        metadata = {"format": "ssmkit-session", "model": self.fingerprint, "n_layers": str(len(state)),
                    "complex": json.dumps(complex_keys)}
        data = save(tensors, metadata=metadata)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _read(self, path: Path) -> list:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != "ssmkit-session":
                raise SessionError(f"{path.name} is not an ssmkit session file")
            if metadata.get("model") != self.fingerprint:
                raise SessionError(f"session {path.stem!r} was made by another model (fingerprint "
                                   f"{metadata.get('model')}, this server's {self.fingerprint})")
            complex_keys = set(json.loads(metadata["complex"]))
            state = [dict() for _ in range(int(metadata["n_layers"]))]
            for name in f.keys():
                layer, key = name.split("/", 1)
                value = f.get_tensor(name)
                state[int(layer)][key] = torch.view_as_complex(value) if name in complex_keys else value
        return state
