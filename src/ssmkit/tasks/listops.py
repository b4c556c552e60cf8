"""ListOps as in the Long Range Arena (Tay et al. 2021; after Nangia & Bowman 2018), generated locally.

An example is a nested expression such as ``[MAX 2 9 [MIN 4 7 ] 0 ]`` (value 9) over four operators:

* ``[MIN`` / ``[MAX``: smallest / largest argument;
* ``[MED``: integer median (the mean of the two middle values when there is an even number of arguments,
  truncated);
* ``[SM``: sum modulo 10.

The grammar is LRA's generator: a node at depth d < max_depth (the root has depth 1) is an operator with
probability ``operator_probability`` = 0.25 and otherwise a digit 0-9; an operator takes 2..``max_args``
(10) arguments; at max_depth (10) every node is a digit. Samples whose token count lies in
[min_length, max_length] (500..2000) are kept, others are drawn again. The LRA code's ``VALUE_P = 0.25`` is
the probability of an OPERATOR (``if r > VALUE_P: leaf``); read the other way round (0.25 leaves) the
expected tree is astronomically long and almost never fits under 2000 tokens. With the LRA setting about
8% of raw draws land in 500..2000; a draw is abandoned as soon as it passes max_length, so each kept
sample costs a few milliseconds of Python.

Tokens (parentheses dropped, the closing bracket kept): 0 = padding, 1..10 = digits 0..9, 11..14 = ``[MIN``
``[MAX`` ``[MED`` ``[SM``, 15 = ``]``; vocabulary 16. Label: the value, 10 classes. Batches are right-padded
with 0 and carry ``lengths``.

Splits are fixed sets of examples: 96000 train, 2000 val, 2000 test (LRA's sizes); example i of a split is
drawn from a ``random.Random`` seeded by ``stable_seed(name, seed, split, i)``, so splits never share a
draw. (A recursive Python generator draws thousands of numbers per sample; torch's per-call overhead would
make it 20x slower, so it uses Python's Mersenne Twister, which is seeded deterministically from an int.)

:func:`evaluate` is an independent check of the labels: a stack machine over the token string that shares
no code with the generator's own value tracking.
"""

from __future__ import annotations

import random
import statistics
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .base import Batch, Task, check_int, register_task, stable_seed

PAD = 0
DIGIT_OFFSET = 1                       # token of digit d is d + 1
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
OPERATOR_TOKENS = {op: 11 + i for i, op in enumerate(OPERATORS)}
CLOSE = 15
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + ("]",)
TOKEN_OF = {word: token for token, word in enumerate(VOCAB) if token != PAD}

_MIN, _MAX, _MED, _SM = (OPERATOR_TOKENS[op] for op in OPERATORS)


class _TooLong(Exception):
    pass


def _apply(op_token: int, args: List[int]) -> int:
    if op_token == _MIN:
        return min(args)
    if op_token == _MAX:
        return max(args)
    if op_token == _SM:
        return sum(args) % 10
    ordered = sorted(args)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) // 2


def _grow(rng: random.Random, depth: int, tokens: List[int], settings: Tuple[int, int, float, int]) -> int:
    """Append one subtree's tokens to ``tokens`` and return its value; raise _TooLong past max_length."""
    max_depth, max_args, operator_probability, max_length = settings
    if len(tokens) >= max_length:  # this subtree adds at least one token: the draw is already too long
        raise _TooLong
    if depth < max_depth and rng.random() < operator_probability:
        op_token = _MIN + rng.randrange(4)
        tokens.append(op_token)
        args = [_grow(rng, depth + 1, tokens, settings) for _ in range(rng.randint(2, max_args))]
        tokens.append(CLOSE)
        return _apply(op_token, args)
    tokens.append(DIGIT_OFFSET + rng.randrange(10))
    return tokens[-1] - DIGIT_OFFSET


def generate_expression(rng: random.Random, min_length: int = 500, max_length: int = 2000, max_depth: int = 10,
                        max_args: int = 10, operator_probability: float = 0.25,
                        max_attempts: int = 1_000_000) -> Tuple[List[int], int]:
    """Draw expressions from ``rng`` until one has between min_length and max_length tokens.

    Returns (tokens, value). Raises RuntimeError after ``max_attempts`` draws (settings that the grammar
    practically never meets, e.g. a min_length beyond what max_depth allows).
    """
    settings = (max_depth, max_args, operator_probability, max_length)
    for _ in range(max_attempts):
        tokens: List[int] = []
        try:
            value = _grow(rng, 1, tokens, settings)
        except _TooLong:
            continue
        if min_length <= len(tokens) <= max_length:
            return tokens, value
    raise RuntimeError(f"no ListOps expression with {min_length}..{max_length} tokens in {max_attempts} draws "
                       f"(max_depth={max_depth}, max_args={max_args}, operator_probability={operator_probability})")


def to_string(tokens: Sequence[int]) -> str:
    """Token ids -> the expression text, e.g. ``"[MAX 2 9 [MIN 4 7 ] 0 ]"`` (padding dropped)."""
    return " ".join(VOCAB[int(t)] for t in tokens if int(t) != PAD)


def encode(text: str) -> List[int]:
    """Expression text (with or without LRA's parentheses) -> token ids."""
    words = text.replace("(", " ").replace(")", " ").split()
    unknown = [w for w in words if w not in TOKEN_OF]
    if unknown:
        raise ValueError(f"ListOps text holds unknown words {unknown[:5]}; known: {list(TOKEN_OF)}")
    return [TOKEN_OF[w] for w in words]


def evaluate(expression: Union[str, Sequence[int], torch.Tensor]) -> int:
    """Value of a ListOps expression given as text or token ids (padding ignored).

    Written apart from the generator on purpose: a stack of open operators, each collecting its
    arguments, closed by ``]``; the median follows LRA (``int`` of the statistical median).
    """
    if isinstance(expression, str):
        words = expression.replace("(", " ").replace(")", " ").split()
    else:
        ids = expression.tolist() if isinstance(expression, torch.Tensor) else list(expression)
        words = [VOCAB[t] for t in ids if t != PAD]
    stack: List[Tuple[str, List[int]]] = []
    result = None
    for position, word in enumerate(words):
        if word.isdigit():
            value = int(word)
        elif word in OPERATORS:
            stack.append((word, []))
            continue
        elif word == "]":
            if not stack:
                raise ValueError(f"unbalanced ']' at word {position} of the expression")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"operator {op} closed with no arguments at word {position}")
            value = {"[MIN": min, "[MAX": max, "[MED": lambda a: int(statistics.median(a)),
                     "[SM": lambda a: sum(a) % 10}[op](args)
        else:
            raise ValueError(f"unknown word {word!r} at position {position} of the expression")
        if stack:
            stack[-1][1].append(value)
        elif result is None:
            result = value
        else:
            raise ValueError(f"more than one top-level expression (word {position})")
    if stack or result is None:
        raise ValueError("incomplete expression: " + ("unclosed operator" if stack else "empty"))
    return result


@register_task("listops")
class ListOps(Task):
    """LRA ListOps: classify the value (0-9) of a nested MIN/MAX/MED/SM expression (module docstring).

    Args:
        min_length, max_length: kept expressions have this many tokens, bounds included (LRA: 500, 2000).
        max_depth, max_args, operator_probability: the grammar (LRA: 10, 10, 0.25).
        num_train, num_val, num_test: split sizes (LRA: 96000, 2000, 2000).
        seed: draws of the examples and of the training order.

    ``batch(..., length=)`` gives the padded width: None pads to the longest row of the batch; an int pads
    to exactly that many positions (it must be >= every row, so ``max_length`` always works). The examples
    themselves never depend on ``length``.
    """

    name = "listops"
    kind = "classification"
    vocab_size = len(VOCAB)
    num_classes = 10

    def __init__(self, min_length: int = 500, max_length: int = 2000, max_depth: int = 10, max_args: int = 10,
                 operator_probability: float = 0.25, num_train: int = 96000, num_val: int = 2000,
                 num_test: int = 2000, seed: int = 0):
        super().__init__(seed)
        self.min_length = check_int("min_length", min_length, 1)
        self.max_length = check_int("max_length", max_length, 1)
        if max_length < min_length:
            raise ValueError(f"max_length must be >= min_length={min_length}; got {max_length}")
        self.max_depth = check_int("max_depth", max_depth, 1)
        self.max_args = check_int("max_args", max_args, 2)
        if isinstance(operator_probability, bool) or not isinstance(operator_probability, (int, float)) \
                or not 0 <= operator_probability <= 1:
            raise ValueError(f"operator_probability must be a number in [0, 1]; got {operator_probability!r}")
        self.operator_probability = float(operator_probability)
        self._sizes = {"train": check_int("num_train", num_train, 1), "val": check_int("num_val", num_val, 0),
                       "test": check_int("num_test", num_test, 0)}
        self.default_length = max_length
        self._settings = {"min_length": min_length, "max_length": max_length, "max_depth": max_depth,
                          "max_args": max_args, "operator_probability": operator_probability,
                          "num_train": num_train, "num_val": num_val, "num_test": num_test}

    def num_examples(self, split: str) -> int:
        super().num_examples(split)
        return self._sizes[split]

    def example(self, split: str, index: int) -> Tuple[List[int], int]:
        """(tokens, value) of example ``index`` of ``split``."""
        rng = random.Random(stable_seed(self.name, self.seed, split, index))
        return generate_expression(rng, self.min_length, self.max_length, self.max_depth, self.max_args,
                                   self.operator_probability)

    def _resolve_length(self, length: Optional[int]) -> Optional[int]:
        return None if length is None else check_int("length", length, 1)  # None: pad to the longest row

    def _make_batch(self, split: str, ids: List[int], length: Optional[int]) -> Batch:
        examples = [self.example(split, i) for i in ids]
        longest = max(len(tokens) for tokens, _ in examples)
        width = longest if length is None else length
        if width < longest:
            raise ValueError(f"length={length} is shorter than the longest expression in this batch ({longest} "
                             f"tokens); pass length >= max_length={self.max_length} or None")
        inputs = torch.zeros(len(examples), width, dtype=torch.long)
        for row, (tokens, _) in enumerate(examples):
            inputs[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        lengths = torch.tensor([len(tokens) for tokens, _ in examples], dtype=torch.long)
        targets = torch.tensor([value for _, value in examples], dtype=torch.long)
        return Batch(inputs, targets, lengths)                      # (B, W), (B,), (B,)
