"""Needle in a haystack on the bytes LM: find a short key=value line hidden in a long byte context.

The haystack is a window of the bytes LM's corpus (:class:`~.text.BytesLM`: by default the standard-library
sources, split 90/5/5 by position so val/test filler is never trained on). A needle ``STX key = value ETX``
is put at a depth of the window, and the sequence ends with the query ``ENQ key =`` followed by the value,
read with teacher forcing: the model must output each value byte, having read the query and the value bytes
before it. Only those ``value_len`` positions carry a loss; ``metrics`` adds ``exact_match``, the fraction
of rows whose whole value is right.

One sequence S of ``length + 1`` bytes (k = ``key_len``, v = ``value_len``, F = L - 2k - 2v - 4 filler
bytes)::

    filler[:p]  STX key '=' value ETX  filler[p:]  ENQ key '=' value
    inputs = S[:L]; targets[t] = S[t + 1] for the last v positions t = L - v .. L - 1, -100 elsewhere

with p = round(depth * F). Keys are k lowercase letters, values v decimal digits (10^v possible values), so
the value cannot be guessed from the query; the control bytes STX (0x02), ETX (0x03) and ENQ (0x05) are
replaced by spaces wherever the filler holds them, so the needle and the query are the only places they occur.

This is the single-needle retrieval of the long-context LLM evaluations ("needle in a haystack", Kamradt
2023; RULER, Hsieh et al. 2024, arXiv 2404.06654), scaled to byte models trained in minutes: a model with
a fixed state has to keep v digits through F bytes of unrelated text without knowing which key will be asked;
attention looks back for the key.

Every example is a pure function of (the corpus, settings, seed, split, its position in the stream, length):
the filler offset, the key, the value and the depth come from the example's own generator.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

import torch

from .base import IGNORE_INDEX, Batch, Task, check_int, register_task
from .text import BytesLM

PathLike = Union[str, os.PathLike]
NEEDLE_START, NEEDLE_END, QUERY = 0x02, 0x03, 0x05
EQUALS, SPACE = ord("="), ord(" ")
KEY_ALPHABET = torch.arange(ord("a"), ord("z") + 1)     # (26,)
VALUE_ALPHABET = torch.arange(ord("0"), ord("9") + 1)   # (10,)


@register_task("needle_haystack")
class NeedleHaystack(Task):
    """Single-needle key=value retrieval in bytes-LM filler (module docstring).

    Args:
        paths, extensions, val_fraction, test_fraction: the filler corpus, as for :class:`~.text.BytesLM`
            (None: the standard-library sources).
        length: L, bytes the model reads (filler, needle, query and the value so far).
        key_len: k, letters in the key.
        value_len: v, digits in the value (the scored positions per example).
        depth: where the needle sits in the filler, 0 (start) .. 1 (just before the query); None draws it
            uniformly per example.
        seed: filler offsets, keys, values and depths.
    """

    name = "needle_haystack"
    kind = "lm"
    vocab_size = 256

    def __init__(self, paths: Union[None, PathLike, Sequence[PathLike]] = None, length: int = 512,
                 key_len: int = 4, value_len: int = 4, depth: Optional[float] = None,
                 extensions: Optional[Sequence[str]] = None, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, seed: int = 0):
        super().__init__(seed)
        self.key_len = check_int("key_len", key_len, 1)
        self.value_len = check_int("value_len", value_len, 1)
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float))
                                  or not 0.0 <= depth <= 1.0):
            raise ValueError(f"depth must be None (uniform) or a number in [0, 1]; got {depth!r}")
        self.depth = None if depth is None else float(depth)
        self.default_length = check_int("length", length, 1)
        self.check_length(length)
        self.haystack = BytesLM(paths, length=max(length, 1), extensions=extensions, val_fraction=val_fraction,
                                test_fraction=test_fraction, seed=seed)
        self._settings = {**self.haystack.config, "length": length, "key_len": key_len, "value_len": value_len,
                          "depth": depth}
        for key in ("name", "seed"):
            self._settings.pop(key)

    def filler_length(self, length: int) -> int:
        """F = L - 2k - 2v - 4: filler bytes around the needle at sequence length ``length``."""
        return length - 2 * self.key_len - 2 * self.value_len - 4

    def check_length(self, length: int) -> None:
        if self.filler_length(length) < 0:
            minimum = 2 * self.key_len + 2 * self.value_len + 4
            raise ValueError(f"needle_haystack length must be >= 2 * key_len + 2 * value_len + 4 = {minimum} "
                             f"(needle and query without filler); got {length}")

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        k, v, filler_len = self.key_len, self.value_len, self.filler_length(length)
        start, stop = self.haystack.split_range(split)
        if stop - start < filler_len + 1:
            raise ValueError(f"split {split!r} of the filler corpus holds {stop - start} bytes, fewer than the "
                             f"{filler_len + 1} needed at length {length}; use a larger corpus or a shorter length")
        corpus = self.haystack.corpus
        inputs, targets = [], []
        for example in ids:
            g = self.example_generator(split, example, length)
            offset = int(torch.randint(start, stop - filler_len, (1,), generator=g))
            key = KEY_ALPHABET[torch.randint(0, len(KEY_ALPHABET), (k,), generator=g)]        # (k,)
            value = VALUE_ALPHABET[torch.randint(0, len(VALUE_ALPHABET), (v,), generator=g)]  # (v,)
            depth = float(torch.rand((), generator=g, dtype=torch.float64)) if self.depth is None else self.depth
            filler = corpus[offset:offset + filler_len].long()                                 # (F,)
            filler = torch.where((filler == NEEDLE_START) | (filler == NEEDLE_END) | (filler == QUERY),
                                 torch.tensor(SPACE), filler)
            at = round(depth * filler_len)
            needle = torch.cat([torch.tensor([NEEDLE_START]), key, torch.tensor([EQUALS]), value,
                                torch.tensor([NEEDLE_END])])                                    # (k + v + 3,)
            query = torch.cat([torch.tensor([QUERY]), key, torch.tensor([EQUALS]), value])      # (k + v + 2,)
            sequence = torch.cat([filler[:at], needle, filler[at:], query])                    # (L + 1,)
            y = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
            y[length - v:] = sequence[length + 1 - v:]
            inputs.append(sequence[:length])
            targets.append(y)
        return Batch(torch.stack(inputs), torch.stack(targets))                                 # (B, L), (B, L)

    @torch.no_grad()
    def metrics(self, logits: torch.Tensor, batch: Batch) -> Dict[str, float]:
        """The lm metrics over the value bytes, and ``exact_match``: rows with every value byte right."""
        result = super().metrics(logits, batch)
        v = self.value_len
        predicted = logits[:, -v:, :].argmax(-1).to(batch.targets.device)                       # (B, v)
        result["exact_match"] = float((predicted == batch.targets[:, -v:]).all(-1).float().mean())
        return result
