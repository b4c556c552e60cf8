"""The task contract that training, evaluation and ``ssmkit compare`` rely on.

A task turns ``(seed, split, index, batch_size, length)`` into a :class:`Batch`, always the same batch for
the same arguments, without touching the network. Three kinds exist:

* ``"lm"``: inputs (B, L) int64 tokens; targets (B, L) int64; logits (B, L, V') with V' >= ``vocab_size``.
* ``"classification"``: inputs (B, L) int64 tokens or (B, L, input_dim) float32; targets (B,) int64 class
  ids; logits (B, num_classes), or (B, L, num_classes) read at the last valid position.
* ``"regression"``: inputs as above; targets (B, output_dim) float32 per sequence, or (B, L, output_dim) per
  position; predictions of the targets' shape, or (B, L, output_dim) read at the last valid position when
  the targets are per sequence.

Target alignment for ``"lm"``: ``targets[b, t]`` is what the model must output AT position ``t``, having
read ``inputs[b, :t+1]``. Targets are already aligned (a byte-level LM's targets are its inputs shifted
left by one), so the trainer must NOT shift them again; ``-100`` marks positions that carry no loss.
Columns of the logits past ``vocab_size`` (a padded vocabulary) take part in the softmax and never in the
targets.

``Batch.lengths`` (B,) int64 is given when rows are right-padded (ListOps, user data with lengths): row b
holds ``lengths[b]`` real tokens followed by padding (token 0, or zeros). For sequence-level targets a causal
model's answer is its output at position ``lengths[b] - 1`` (``L - 1`` without ``lengths``):
:func:`last_valid` picks it, and :meth:`Task.loss` applies it when handed per-position outputs.

Reading order, resumption and sharding
--------------------------------------
Row j of ``batch(split, index, batch_size)`` is example number ``p = index * batch_size + j`` of the split's
stream, and every example is a pure function of (task settings, ``seed``, split, ``p``, ``length``): each is
drawn from its own ``torch.Generator`` seeded by :func:`stable_seed`, a hash that does not depend on the
process (Python's ``hash()`` is salted per process and is not used). Hence

* a resumed run that asks for the same ``(split, index)`` reads exactly the same data;
* rank ``r`` of ``W`` data-parallel ranks with per-rank batch ``b`` reads ``batch(split, step * W + r, b)``,
  and the ``W`` shards together are exactly ``batch(split, step, W * b)``, the batch one process would read;
* batch size can change between runs without reshuffling what a given example is.

Generated tasks have endless streams (``num_examples(split)`` is None). Tasks over a fixed set of examples
(ListOps, digits, user arrays) read ``"train"`` as endless epochs, each a fresh seeded permutation of the
train examples (``p`` -> epoch ``p // N``, slot ``p % N``), and read ``"val"``/``"test"`` once in order:
their last batch may be short, an index past the end raises ``IndexError``, and ``num_examples(split)``
gives ``N`` so an evaluation loop knows when to stop.

Registry
--------
``TASKS`` maps names to factories; :func:`make_task` builds one by name and refuses unknown names and
unknown keyword arguments, suggesting the closest known one.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .._checks import check_choice

SPLITS = ("train", "val", "test")
KINDS = ("lm", "classification", "regression")
IGNORE_INDEX = -100


def check_int(name: str, value, minimum: Optional[int] = None) -> int:
    """Require an int (not a bool), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def check_fraction(name: str, value, *, allow_zero: bool = True) -> float:
    """Require a real number in [0, 1) (or (0, 1) when ``allow_zero`` is False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1); got {type(value).__name__} {value!r}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        raise ValueError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1); got {value}")
    return float(value)


def stable_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (str, int, bool, float or None) that is the same in every process and on
    every machine: blake2b of their ``repr``. Used instead of ``hash()``, which Python salts per process."""
    for part in parts:
        if part is not None and not isinstance(part, (str, int, float)):
            raise TypeError(f"stable_seed takes str, int, float or None parts; got {type(part).__name__}")
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_generator(*parts) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``stable_seed(*parts)``."""
    generator = torch.Generator()
    generator.manual_seed(stable_seed(*parts))
    return generator


@dataclass
class Batch:
    """One batch of a task (shapes in the module docstring).

    inputs: (B, L) int64 token ids, or (B, L, input_dim) float32.
    targets: lm (B, L) int64 with -100 where no loss; classification (B,) int64; regression
        (B, output_dim) or (B, L, output_dim) float32.
    lengths: (B,) int64 valid lengths of right-padded rows, or None when every row fills L.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) input positions in the batch, for tokens/s."""
        if self.lengths is not None:
            return int(self.lengths.sum())
        return self.inputs.shape[0] * self.inputs.shape[1]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        def move(tensor):
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)

        return Batch(move(self.inputs), move(self.targets), move(self.lengths))


def last_valid(outputs: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """outputs (B, L, D) -> (B, D): each row's output at its last valid position, ``lengths[b] - 1``
    (``L - 1`` when ``lengths`` is None): the readout of a causal model for a sequence-level target."""
    if outputs.dim() != 3:
        raise ValueError(f"outputs must be (batch, length, features); got {tuple(outputs.shape)}")
    if lengths is None:
        return outputs[:, -1]
    if lengths.shape != (outputs.shape[0],):
        raise ValueError(f"lengths must be (batch={outputs.shape[0]},); got {tuple(lengths.shape)}")
    rows = torch.arange(outputs.shape[0], device=outputs.device)
    return outputs[rows, lengths.to(outputs.device).long() - 1]


class Task:
    """Base class of every task (the contract is in the module docstring).

    A subclass sets ``name``, ``kind``, one of ``vocab_size`` (token inputs) / ``input_dim`` (real inputs),
    ``num_classes`` (classification) or ``output_dim`` (regression), and ``default_length``, records its
    settings in ``self._settings`` (shown by :attr:`config`), and implements :meth:`_make_batch`; a task over
    a fixed set of examples also overrides :meth:`num_examples`.
    """

    name: str = "task"
    kind: str = "lm"
    vocab_size: Optional[int] = None
    input_dim: Optional[int] = None
    num_classes: Optional[int] = None
    output_dim: Optional[int] = None
    default_length: int = 0
    splits: Sequence[str] = SPLITS

    def __init__(self, seed: int = 0):
        self.seed = check_int("seed", seed)
        self._settings: Dict[str, object] = {}
        self._order_cache: Dict[int, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------------
    # What a subclass provides
    # ----------------------------------------------------------------------------------------------
    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        """The examples ``ids`` of ``split`` at sequence length ``length`` (already validated)."""
        raise NotImplementedError

    def check_length(self, length: int) -> None:
        """Raise ValueError if the task cannot be posed at ``length``; the default accepts any length >= 1."""

    def num_examples(self, split: str) -> Optional[int]:
        """How many examples ``split`` holds; None for an endless generated stream."""
        check_choice("split", split, self.splits)
        return None

    # ----------------------------------------------------------------------------------------------
    # The public contract
    # ----------------------------------------------------------------------------------------------
    @property
    def config(self) -> Dict[str, object]:
        """The task's name and settings: ``make_task(**task.config)`` builds the same task."""
        return {"name": self.name, **self._settings, "seed": self.seed}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "name")
        return f"{type(self).__name__}({args})"

    def batch(self, split: str, index: int, batch_size: int, length: Optional[int] = None) -> Batch:
        """Batch number ``index`` of ``split``: rows are examples ``index * batch_size + j`` of the split's
        stream (module docstring), a pure function of the arguments and the task's settings and seed.

        Args:
            split: "train", "val" or "test".
            index: batch number, >= 0 (a trainer passes its step; data-parallel ranks ``step * W + rank``).
            batch_size: rows, >= 1 (the last batch of a finite "val"/"test" split may hold fewer).
            length: sequence length, ``default_length`` when None (see each task for its meaning).
        """
        check_choice("split", split, self.splits)
        check_int("index", index, 0)
        check_int("batch_size", batch_size, 1)
        length = self._resolve_length(length)
        return self._make_batch(split, self._example_ids(split, index, batch_size), length)

    def example_generator(self, split: str, example: int, length: Optional[int]) -> torch.Generator:
        """The generator that draws example number ``example`` of ``split`` at ``length``."""
        return seeded_generator(self.name, self.seed, split, example, length)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Scalar training loss: cross-entropy over target positions (-100 ignored) for "lm",
        cross-entropy for "classification", mean squared error for "regression"; computed in float32."""
        if self.kind == "lm":
            scores, targets = self._lm_scores(logits, batch)
            return F.cross_entropy(scores, targets, ignore_index=IGNORE_INDEX)
        if self.kind == "classification":
            return F.cross_entropy(self._sequence_outputs(logits, batch, self.num_classes), batch.targets)
        predictions = self._regression_outputs(logits, batch)
        return F.mse_loss(predictions, batch.targets.to(predictions.dtype))

    @torch.no_grad()
    def metrics(self, logits: torch.Tensor, batch: Batch) -> Dict[str, float]:
        """Metrics of one batch, as floats: ``loss`` and ``accuracy`` (over target positions for "lm", over
        rows for "classification") or ``mse`` ("regression"), and ``count``, the number of scored items, so
        that batch means can be combined as ``sum(m * count) / sum(count)``."""
        if self.kind == "lm":
            scores, targets = self._lm_scores(logits, batch)
            scored = targets != IGNORE_INDEX
            count = int(scored.sum())
            correct = (scores.argmax(-1) == targets) & scored
            return {"loss": float(F.cross_entropy(scores, targets, ignore_index=IGNORE_INDEX)),
                    "accuracy": float(correct.sum()) / max(count, 1), "count": float(count)}
        if self.kind == "classification":
            scores = self._sequence_outputs(logits, batch, self.num_classes)
            return {"loss": float(F.cross_entropy(scores, batch.targets)),
                    "accuracy": float((scores.argmax(-1) == batch.targets).float().mean()),
                    "count": float(batch.targets.shape[0])}
        predictions = self._regression_outputs(logits, batch)
        mse = float(F.mse_loss(predictions, batch.targets.to(predictions.dtype)))
        return {"loss": mse, "mse": mse, "count": float(batch.targets.shape[0])}

    # ----------------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------------
    def _resolve_length(self, length: Optional[int]) -> Optional[int]:
        length = self.default_length if length is None else check_int("length", length, 1)
        self.check_length(length)
        return length

    def _example_ids(self, split: str, index: int, batch_size: int) -> List[int]:
        total = self.num_examples(split)
        start = index * batch_size
        if total is None:
            return list(range(start, start + batch_size))
        if total == 0:
            raise ValueError(f"split {split!r} of task {self.name!r} holds no examples")
        if split != "train":
            if start >= total:
                raise IndexError(f"batch index {index} is past the end of split {split!r}: {total} examples "
                                 f"make {math.ceil(total / batch_size)} batches of {batch_size}")
            return list(range(start, min(start + batch_size, total)))
        ids = []
        for position in range(start, start + batch_size):
            epoch, slot = divmod(position, total)
            ids.append(int(self._epoch_order(epoch, total)[slot]))
        return ids

    def _epoch_order(self, epoch: int, total: int) -> torch.Tensor:
        order = self._order_cache.get(epoch)
        if order is None:
            order = torch.randperm(total, generator=seeded_generator(self.name, self.seed, "train-order", epoch))
            if len(self._order_cache) >= 4:  # a batch spans at most two epochs; keep a few
                self._order_cache.pop(next(iter(self._order_cache)))
            self._order_cache[epoch] = order
        return order

    def _lm_scores(self, logits: torch.Tensor, batch: Batch):
        targets = batch.targets
        if logits.dim() != 3 or logits.shape[:2] != targets.shape or logits.shape[2] < self.vocab_size:
            raise ValueError(f"logits must be (batch, length, >= vocab_size={self.vocab_size}) matching targets "
                             f"{tuple(targets.shape)}; got {tuple(logits.shape)}")
        return logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).to(logits.device)

    def _sequence_outputs(self, logits: torch.Tensor, batch: Batch, width: int) -> torch.Tensor:
        rows = batch.targets.shape[0]
        if logits.dim() == 3 and logits.shape[0] == rows and logits.shape[2] == width:
            logits = last_valid(logits, batch.lengths)
        if logits.dim() != 2 or logits.shape != (rows, width):
            raise ValueError(f"logits must be (batch={rows}, {width}) or (batch={rows}, length, {width}); "
                             f"got {tuple(logits.shape)}")
        return logits.float()

    def _regression_outputs(self, predictions: torch.Tensor, batch: Batch) -> torch.Tensor:
        targets = batch.targets
        if targets.dim() == 2 and predictions.dim() == 3 and predictions.shape[0] == targets.shape[0]:
            predictions = last_valid(predictions, batch.lengths)
        if predictions.shape != targets.shape:
            raise ValueError(f"predictions must have the targets' shape {tuple(targets.shape)}"
                             + (" or (batch, length, output_dim)" if targets.dim() == 2 else "")
                             + f"; got {tuple(predictions.shape)}")
        return predictions.float()


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
TASKS: Dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable:
    """Decorator registering a task class or factory function under ``name``."""

    def decorator(factory: Callable) -> Callable:
        if name in TASKS and TASKS[name] is not factory:
            raise ValueError(f"task name {name!r} is already registered")
        TASKS[name] = factory
        return factory

    return decorator


def _closest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def make_task(name: str, **kwargs) -> Task:
    """Build the task registered under ``name`` with keyword settings (see each task's docstring).

    Unknown names and unknown keywords raise ValueError naming them and suggesting the closest known one.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: known tasks are {sorted(TASKS)}{_closest(name, TASKS)}")
    factory = TASKS[name]
    parameters = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted = [k for k, p in parameters.items() if k != "self" and p.kind in
                    (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown} for task {name!r}: it accepts {accepted}"
                             f"{_closest(unknown[0], accepted)}")
    return factory(**kwargs)
