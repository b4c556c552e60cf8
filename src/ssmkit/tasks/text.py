"""Byte-level language modelling over a local text corpus (vocabulary 256, no tokenizer, no download).

The corpus is the concatenation, in sorted path order, of the files the user names (files as given,
folders walked recursively, hidden entries skipped) or, by default, of the running Python's standard-
library ``.py`` sources outside ``test``/``tests``, ``idlelib``, ``site-packages`` and ``__pycache__``
(about 11 MB on CPython 3.11; present wherever Python is).

Splits are by position in that concatenation: the first 90% of bytes train, the next 5% val, the last 5%
test (``val_fraction``, ``test_fraction``). Windows never cross a split boundary, so no byte of val or
test is ever a training input or target.

An example is a window of ``length + 1`` bytes at a uniform random offset inside its split: inputs are its
first ``length`` bytes and targets its last ``length`` (targets[t] = the byte after inputs[t], already
aligned). Every position is scored; ``metrics`` adds ``bits_per_byte`` = loss / ln 2.

Files are listed when the task is built (a missing path or an empty corpus fails at once) and read on the
first batch; the bytes are cached in memory, once per process, for every task over the same files.
"""

from __future__ import annotations

import math
import os
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .base import Batch, Task, check_fraction, check_int, register_task

PathLike = Union[str, os.PathLike]
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})

_CORPUS_CACHE: Dict[Tuple, torch.Tensor] = {}


def stdlib_sources() -> List[Path]:
    """The running Python's standard-library .py files outside test(s)/, idlelib/ and site-packages/."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in STDLIB_EXCLUDED_DIRS)
        files.extend(Path(folder) / n for n in sorted(names) if n.endswith(".py"))
    return sorted(files)


def list_corpus_files(paths: Sequence[PathLike], extensions: Optional[Sequence[str]] = None) -> List[Path]:
    """Files named in ``paths`` plus the files under named folders (recursively, skipping names that start
    with "."; only those ending in ``extensions`` when given), sorted and without repeats.

    Raises ValueError naming a path that does not exist.
    """
    files = set()
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"corpus path does not exist: {str(path)!r}")
        if path.is_file():
            files.add(path.resolve())
            continue
        for folder, subfolders, names in os.walk(path):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            for n in names:
                if not n.startswith(".") and (extensions is None or n.endswith(tuple(extensions))):
                    files.add((Path(folder) / n).resolve())
    return sorted(files)


def read_corpus(files: Sequence[Path]) -> torch.Tensor:
    """The files' bytes concatenated into one (n,) uint8 tensor, cached per (path, size, mtime) list."""
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    corpus = _CORPUS_CACHE.get(key)
    if corpus is None:
        data = bytearray()
        for f in files:
            data += f.read_bytes()
        # clone: the tensor must own its memory rather than borrow the bytearray's
        corpus = torch.frombuffer(data, dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)
        _CORPUS_CACHE[key] = corpus
    return corpus


@register_task("bytes_lm")
class BytesLM(Task):
    """Byte-level next-byte prediction over a corpus of files (module docstring).

    Args:
        paths: a file or folder, or a list of them; None: the standard-library sources.
        length: bytes per example (the model reads ``length`` bytes and predicts each next byte).
        extensions: when walking folders, keep only files ending in one of these (e.g. ``[".py", ".md"]``);
            None keeps every file (for the default corpus: ``.py``). Files named directly are always kept.
        val_fraction, test_fraction: the tail of the corpus held out for val and test.
        seed: window offsets.
    """

    name = "bytes_lm"
    kind = "lm"
    vocab_size = 256

    def __init__(self, paths: Union[None, PathLike, Sequence[PathLike]] = None, length: int = 512,
                 extensions: Optional[Sequence[str]] = None, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, seed: int = 0):
        super().__init__(seed)
        self.default_length = check_int("length", length, 1)
        self.val_fraction = check_fraction("val_fraction", val_fraction, allow_zero=False)
        self.test_fraction = check_fraction("test_fraction", test_fraction, allow_zero=False)
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1; got {val_fraction} + {test_fraction}")
        if isinstance(extensions, str):
            extensions = [extensions]
        if paths is None:
            self.files = stdlib_sources() if extensions is None else [
                f for f in stdlib_sources() if f.name.endswith(tuple(extensions))]
            described = f"the standard library at {sysconfig.get_paths()['stdlib']}"
        else:
            path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
            if not path_list:
                raise ValueError("paths must name at least one file or folder; got an empty list")
            self.files = list_corpus_files(path_list, extensions)
            described = ", ".join(repr(str(p)) for p in path_list)
        self.num_bytes = sum(f.stat().st_size for f in self.files)
        if self.num_bytes == 0:
            which = f" with extensions {list(extensions)}" if extensions else ""
            raise ValueError(f"the corpus is empty: no bytes in files{which} under {described}")
        self._settings = {"paths": None if paths is None else [str(p) for p in
                                                               ([paths] if isinstance(paths, (str, os.PathLike))
                                                                else paths)],
                          "length": length, "extensions": None if extensions is None else list(extensions),
                          "val_fraction": val_fraction, "test_fraction": test_fraction}

    @property
    def corpus(self) -> torch.Tensor:
        """(num_bytes,) uint8: the whole corpus, read on first use."""
        return read_corpus(self.files)

    def split_range(self, split: str) -> Tuple[int, int]:
        """[start, stop) byte offsets of ``split`` in the corpus."""
        n = self.num_bytes
        train_end = int(n * (1 - self.val_fraction - self.test_fraction))
        val_end = int(n * (1 - self.test_fraction))
        return {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, n)}[split]

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        start, stop = self.split_range(split)
        if stop - start < length + 1:
            raise ValueError(f"split {split!r} holds {stop - start} bytes, fewer than length + 1 = {length + 1}; "
                             "use a larger corpus or a shorter length")
        corpus = self.corpus
        windows = []
        for example in ids:
            g = self.example_generator(split, example, length)
            offset = int(torch.randint(start, stop - length, (1,), generator=g))
            windows.append(corpus[offset:offset + length + 1])
        windows = torch.stack(windows).long()                        # (B, L + 1)
        return Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())

    @torch.no_grad()
    def metrics(self, logits: torch.Tensor, batch: Batch) -> Dict[str, float]:
        result = super().metrics(logits, batch)
        result["bits_per_byte"] = result["loss"] / math.log(2)
        return result
