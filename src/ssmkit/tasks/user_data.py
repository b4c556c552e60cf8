"""Tasks over the user's own data: text files, and labelled sequences in numpy or CSV files.

Text
    ``text_task(paths)`` (registered as ``"text"``) is byte-level language modelling over the named files
    and folders: a :class:`~ssmkit.tasks.text.BytesLM`.

Labelled sequences: :func:`load_sequences` (registered as ``"sequences"``) reads a file;
:class:`SequenceData` takes arrays in memory. One example per row; N rows in all:

* ``.npz`` with arrays ``inputs`` and ``targets`` (and optionally ``lengths``);
* ``.npy`` holding ``inputs``, with ``targets=`` naming a second ``.npy`` holding the targets;
* ``.csv``: one sequence per line, the label in column ``label_column`` (default 0, the first; -1 for the
  last) and the sequence values in the other columns; every line has the same number of fields; a header
  line only with ``header=True``.

Array layout:

==========  =======================================================================================
inputs      (N, L) integers: token ids >= 0 (vocabulary ``vocab_size``, by default max + 1);
            (N, L) floats: one real value per step (input_dim 1); (N, L, D) floats: D values per step.
            Integer or float is read from the dtype; ``tokens=True``/``False`` overrides (CSV values are
            read as real values unless ``tokens=True``).
targets     (N,) integers -> classification (``num_classes``, by default max + 1);
            (N,) or (N, K) floats -> regression of one K-vector per sequence;
            (N, L, K) floats -> regression at every position. ``kind=`` overrides the choice.
lengths     optional (N,) integers in 1..L: rows are right-padded after ``lengths[i]`` steps.
==========  =======================================================================================

Splits: a permutation of the rows seeded by ``split_seed`` puts the last ``test_fraction`` in test, the
``val_fraction`` before them in val, and the rest in train (at least one row).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from .base import Batch, Task, check_fraction, check_int, register_task, seeded_generator
from .text import BytesLM, PathLike

SEQUENCE_SUFFIXES = (".npz", ".npy", ".csv")


@register_task("text")
def text_task(paths: Union[PathLike, Sequence[PathLike]], length: int = 512,
              extensions: Optional[Sequence[str]] = None, val_fraction: float = 0.05, test_fraction: float = 0.05,
              seed: int = 0) -> BytesLM:
    """Byte-level LM over the user's text files or folders (see :class:`~ssmkit.tasks.text.BytesLM`)."""
    if paths is None:
        raise ValueError("the text task needs paths (files or folders); the 'bytes_lm' task without paths "
                         "reads the standard-library sources")
    return BytesLM(paths, length=length, extensions=extensions, val_fraction=val_fraction,
                   test_fraction=test_fraction, seed=seed)


def _as_numpy(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor; got {type(value).__name__}")
    if value.dtype == bool or not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
        raise TypeError(f"{name} must hold integers or floats; got dtype {value.dtype}")
    return value


def _require_integral(name: str, array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ValueError(f"{name} must hold whole numbers here; row {row} holds {array[row]!r}")
    return array.astype(np.int64)


def _require_finite(name: str, array: np.ndarray) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(f"{name} must be finite; row {int(np.argwhere(bad)[0][0])} holds NaN or inf")


class SequenceData(Task):
    """A classification or regression task over labelled sequences held in memory (module docstring).

    Args:
        inputs: (N, L) integer tokens, (N, L) or (N, L, D) floats.
        targets: (N,) integer classes; (N,), (N, K) or (N, L, K) float regression targets.
        lengths: optional (N,) valid lengths of right-padded rows.
        kind: "classification" or "regression"; None: from the targets' dtype.
        tokens: read inputs as token ids (True) or real values (False); None: from the inputs' dtype.
        vocab_size, num_classes: None: max + 1 of the data.
        val_fraction, test_fraction, split_seed: the split of the rows.
        seed: the training order.
    """

    name = "sequences"

    def __init__(self, inputs, targets, lengths=None, *, kind: Optional[str] = None, tokens: Optional[bool] = None,
                 vocab_size: Optional[int] = None, num_classes: Optional[int] = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, split_seed: int = 0, seed: int = 0):
        super().__init__(seed)
        inputs, targets = _as_numpy("inputs", inputs), _as_numpy("targets", targets)
        if inputs.ndim not in (2, 3) or inputs.shape[0] == 0 or inputs.shape[1] == 0:
            raise ValueError(f"inputs must be (N, L) or (N, L, D) with N, L >= 1; got {inputs.shape}")
        n, length = inputs.shape[:2]
        if targets.shape[:1] != (n,):
            raise ValueError(f"targets must hold one row per input sequence: inputs have N={n} rows "
                             f"(shape {inputs.shape}) but targets have shape {targets.shape}")
        if tokens is None:
            tokens = bool(np.issubdtype(inputs.dtype, np.integer))
        if tokens:
            if inputs.ndim != 2:
                raise ValueError(f"token inputs must be (N, L); got {inputs.shape}")
            ids = _require_integral("inputs", inputs)
            if ids.min() < 0:
                raise ValueError(f"token inputs must be >= 0; got a minimum of {ids.min()}")
            self.vocab_size = int(ids.max()) + 1 if vocab_size is None else check_int("vocab_size", vocab_size, 1)
            if ids.max() >= self.vocab_size:
                raise ValueError(f"token inputs must lie in [0, vocab_size={self.vocab_size}); got max {ids.max()}")
            self._inputs = torch.from_numpy(ids)                                      # (N, L) int64
        else:
            values = inputs.astype(np.float32)
            _require_finite("inputs", values)
            values = values[..., None] if values.ndim == 2 else values
            self.input_dim = values.shape[2]
            self._inputs = torch.from_numpy(values)                                   # (N, L, D) float32

        if kind is None:
            kind = "classification" if np.issubdtype(targets.dtype, np.integer) else "regression"
        if kind == "classification":
            if targets.ndim != 1:
                raise ValueError(f"classification targets must be (N,) class ids; got {targets.shape}")
            classes = _require_integral("targets", targets)
            if classes.min() < 0:
                raise ValueError(f"class ids must be >= 0; got a minimum of {classes.min()}")
            self.num_classes = (int(classes.max()) + 1 if num_classes is None
                                else check_int("num_classes", num_classes, 1))
            if classes.max() >= self.num_classes:
                raise ValueError(f"class ids must lie in [0, num_classes={self.num_classes}); got max {classes.max()}")
            self._targets = torch.from_numpy(classes)                                 # (N,)
        elif kind == "regression":
            values = targets.astype(np.float32)
            _require_finite("targets", values)
            if values.ndim == 1:
                values = values[:, None]
            elif values.ndim == 3 and values.shape[1] != length:
                raise ValueError(f"per-position targets (N, L, K) must have the inputs' length L={length}; "
                                 f"got {targets.shape}")
            elif values.ndim not in (2, 3):
                raise ValueError(f"regression targets must be (N,), (N, K) or (N, L, K); got {targets.shape}")
            self.output_dim = values.shape[-1]
            self._targets = torch.from_numpy(np.ascontiguousarray(values))
        else:
            raise ValueError(f"kind must be 'classification', 'regression' or None; got {kind!r}")
        self.kind = kind

        self._lengths = None
        if lengths is not None:
            lengths = _as_numpy("lengths", lengths)
            if lengths.shape != (n,):
                raise ValueError(f"lengths must be (N={n},); got {lengths.shape}")
            lengths = _require_integral("lengths", lengths)
            if lengths.min() < 1 or lengths.max() > length:
                raise ValueError(f"lengths must lie in 1..L={length}; got {lengths.min()}..{lengths.max()}")
            self._lengths = torch.from_numpy(lengths)

        check_fraction("val_fraction", val_fraction)
        check_fraction("test_fraction", test_fraction)
        num_test, num_val = int(round(n * test_fraction)), int(round(n * val_fraction))
        if n - num_test - num_val < 1:
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training "
                             f"row out of N={n}")
        order = torch.randperm(n, generator=seeded_generator("sequences-split", check_int("split_seed", split_seed)))
        self._rows = {"train": order[:n - num_test - num_val], "val": order[n - num_test - num_val:n - num_test],
                      "test": order[n - num_test:]}
        self.default_length = length
        self._settings = {"source": "arrays", "kind": kind, "val_fraction": val_fraction,
                          "test_fraction": test_fraction, "split_seed": split_seed}

    def num_examples(self, split: str) -> int:
        super().num_examples(split)
        return len(self._rows[split])

    def check_length(self, length: int) -> None:
        if length != self.default_length:
            raise ValueError(f"this data set's sequences have length {self.default_length}; got length={length}")

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        rows = self._rows[split][torch.tensor(ids, dtype=torch.long)]
        return Batch(self._inputs[rows], self._targets[rows], None if self._lengths is None else self._lengths[rows])


def _read_csv(path: Path, label_column: int, header: bool):
    with open(path, newline="") as handle:
        lines = [(number, row) for number, row in enumerate(csv.reader(handle), start=1) if row]
    if header:
        lines = lines[1:]
    if not lines:
        raise ValueError(f"{str(path)!r} holds no data rows")
    width = len(lines[0][1])
    if width < 2:
        raise ValueError(f"{str(path)!r}: each line needs a label and at least one value; line "
                         f"{lines[0][0]} has {width} field")
    if not -width <= label_column < width:
        raise ValueError(f"label_column must lie in [-{width}, {width}) for lines of {width} fields; "
                         f"got {label_column}")
    table = np.empty((len(lines), width), dtype=np.float64)
    for r, (number, row) in enumerate(lines):
        if len(row) != width:
            raise ValueError(f"{str(path)!r}: line {number} has {len(row)} fields but line {lines[0][0]} has "
                             f"{width}; every line must hold one label and the same number of values")
        for c, field in enumerate(row):
            try:
                table[r, c] = float(field)
            except ValueError:
                hint = "; pass header=True if the first line is a header" if r == 0 and not header else ""
                raise ValueError(f"{str(path)!r}: line {number}, column {c} is not a number: {field!r}{hint}") from None
    label_column %= width
    labels = table[:, label_column]
    values = np.delete(table, label_column, axis=1)
    return values, labels


@register_task("sequences")
def load_sequences(path: PathLike, targets: Optional[PathLike] = None, kind: Optional[str] = None,
                   tokens: Optional[bool] = None, vocab_size: Optional[int] = None, num_classes: Optional[int] = None,
                   label_column: int = 0, header: bool = False, val_fraction: float = 0.1,
                   test_fraction: float = 0.1, split_seed: int = 0, seed: int = 0) -> SequenceData:
    """A :class:`SequenceData` task read from a ``.npz``, ``.npy`` (+ ``targets`` ``.npy``) or ``.csv`` file
    (layouts in the module docstring). CSV labels that are all whole numbers >= 0 make a classification
    task unless ``kind="regression"``."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data path does not exist: {str(path)!r}")
    suffix = path.suffix.lower()
    lengths = None
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("inputs", "targets") if k not in archive.files]
            if missing:
                raise ValueError(f"{str(path)!r} must hold arrays 'inputs' and 'targets' (and optionally "
                                 f"'lengths'); missing {missing}, found {archive.files}")
            inputs, labels = archive["inputs"], archive["targets"]
            lengths = archive["lengths"] if "lengths" in archive.files else None
    elif suffix == ".npy":
        if targets is None:
            raise ValueError(f"{str(path)!r} holds the inputs only; pass targets= the .npy file of targets")
        targets_path = Path(targets)
        if not targets_path.exists():
            raise ValueError(f"targets path does not exist: {str(targets_path)!r}")
        inputs = np.load(path, allow_pickle=False)
        labels = np.load(targets_path, allow_pickle=False)
    elif suffix == ".csv":
        inputs, labels = _read_csv(path, check_int("label_column", label_column), header)
        if tokens is None:
            tokens = False
        if kind is None:
            integral = np.all(labels == np.round(labels)) and labels.min() >= 0
            kind = "classification" if integral else "regression"
    else:
        raise ValueError(f"unsupported data file {str(path)!r}: expected one of {list(SEQUENCE_SUFFIXES)}")
    if targets is not None and suffix != ".npy":
        raise ValueError(f"targets= is only for .npy inputs; {str(path)!r} holds its own targets")
    task = SequenceData(inputs, labels, lengths, kind=kind, tokens=tokens, vocab_size=vocab_size,
                        num_classes=num_classes, val_fraction=val_fraction, test_fraction=test_fraction,
                        split_seed=split_seed, seed=seed)
    task._settings = {"path": str(path), "targets": None if targets is None else str(targets), "kind": task.kind,
                      "tokens": task.vocab_size is not None, "vocab_size": vocab_size, "num_classes": num_classes,
                      "label_column": label_column, "header": header, "val_fraction": val_fraction,
                      "test_fraction": test_fraction, "split_seed": split_seed}
    return task
