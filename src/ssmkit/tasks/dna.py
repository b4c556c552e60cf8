"""Long DNA classification, generated: is this DNA curved? A-tracts in and out of helical phase.

GENERATED DATA. No real genome with labels ships inside a package that our registries serve (Biopython's
wheel has no sequence test files; Debian's bowtie-examples has the E. coli genome but no labels), so this
task generates its sequences, and its name says so: ``generated_a_tract_phasing``.

Biological motivation
---------------------
A run of 4-6 adenines (an *A-tract*) bends the DNA double helix by about 18 degrees. When A-tracts repeat in
phase with the helical turn (centres about 10.5 bp apart) the bends add up and the molecule is curved; half a
turn out of phase they cancel and it stays straight (Koo, Wu & Crothers 1986, Nature 320:501). Such intrinsic
curvature is a grammar of spacing, not of letters: the same A-tracts make curved or straight DNA depending on
how far apart they are, and it matters in vivo (promoters, nucleosome positioning). An A-tract on one strand
is a T-tract on the other, so the answer does not depend on the strand read (it is invariant under the
reverse complement, as a Caduceus-style model is).

The task
--------
Each sequence of ``length`` bases is drawn from a background with GC content ``gc_content`` (0.41, the human
genome's average), and holds ``K = 2 * (length // (2 * bp_per_pair)) + 1`` pairs of A-tracts (``TRACT``,
6 bp) at a gap g of background bases between them, each pair on a random strand, plus K lone A-tracts as
decoys, in separate slots across the whole sequence. The gap is *in phase* (g in 4, 5: centres 10-11 bp
apart, one helical turn) or *out of phase* (g in 9, 10: centres 15-16 bp apart, 1.5 turns). The class is 1
("curved") when the sequence holds more in-phase than out-of-phase pairs, 0 otherwise; examples are drawn with
``int(minority * K)`` pairs of the other kind than their class (none by default), so the proportion is the
same at every length and a longer sequence only means more to read. Labels are computed by scanning the
finished sequence on both strands (so a pair that the background happened to form is counted too).

Inputs are token ids from :class:`~.nucleotides.NucleotideTokenizer` (``k`` bases per token, non-overlapping
by default): shape (B, length / k) for ``stride=k``; ``length`` always counts bases. Targets (B,) in {0, 1}.
The task's ``complement_map`` is the tokenizer's, for reverse-complement-equivariant models.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from .base import Batch, Task, check_int, register_task
from .nucleotides import BASES, NucleotideTokenizer, reverse_complement

TRACT = "AAAAAA"
IN_PHASE_GAPS = (4, 5)        # centres 10-11 bp apart: one helical turn
OUT_OF_PHASE_GAPS = (9, 10)   # centres 15-16 bp apart: a turn and a half
_CODE = {base: code for code, base in enumerate(BASES)}
_LETTERS = np.frombuffer(BASES.encode("ascii"), dtype=np.uint8)


def _text(codes: np.ndarray) -> str:
    """Base codes 0..3 -> an ACGT string."""
    return _LETTERS[codes].tobytes().decode("ascii")


def _codes(text: str) -> np.ndarray:
    return np.array([_CODE[base] for base in text], dtype=np.int64)


def count_pairs(sequence: str) -> Tuple[int, int]:
    """(in phase, out of phase) pairs of A-tracts in ``sequence`` on either strand (module docstring).

    A pair is two occurrences of ``TRACT`` (or, on the other strand, of its reverse complement, a T-tract)
    whose gap is one of ``IN_PHASE_GAPS`` or ``OUT_OF_PHASE_GAPS``. A longer run of A's holds several
    overlapping occurrences, and each pair of them at such a gap counts.
    """
    counts = [0, 0]
    for tract in (TRACT, reverse_complement(TRACT)):
        starts = _occurrences(sequence, tract)
        found = set(starts)
        for start in starts:
            for kind, gaps in enumerate((IN_PHASE_GAPS, OUT_OF_PHASE_GAPS)):
                counts[kind] += sum(start + len(tract) + gap in found for gap in gaps)
    return counts[0], counts[1]


def _occurrences(text: str, word: str) -> List[int]:
    found, start = [], text.find(word)
    while start != -1:
        found.append(start)
        start = text.find(word, start + 1)
    return found


@register_task("generated_a_tract_phasing")
class GeneratedATractPhasing(Task):
    """Is this (generated) DNA curved? A-tract pairs in or out of helical phase (module docstring).

    Args:
        k: bases per token (1 = one token per base; 2..8 = k-mers).
        stride: ``k`` (non-overlapping k-mers, default) or 1 (overlapping).
        gc_content: probability that a background base is G or C.
        bp_per_pair: bases per site pair (sets K from the length; every sequence holds >= 1 pair).
        minority: fraction of the pairs that are of the other kind than the class says (0 <= minority < 0.5):
            0 (default) makes every pair of a sequence grammatical or every pair ungrammatical.
        length: the default sequence length in bases (``batch(..., length=)`` overrides it).
        seed: the stream of examples (splits draw from separate streams).

    ``length`` (bases) must be >= 100 and readable by the tokenizer.
    """

    name = "generated_a_tract_phasing"
    kind = "classification"
    num_classes = 2
    default_length = 10_000

    def __init__(self, k: int = 1, stride: Optional[int] = None, gc_content: float = 0.41,
                 bp_per_pair: int = 100, minority: float = 0.0, length: int = 10_000, seed: int = 0):
        super().__init__(seed)
        self.tokenizer = NucleotideTokenizer(k, stride)
        if isinstance(gc_content, bool) or not isinstance(gc_content, (int, float)) or not 0 < gc_content < 1:
            raise ValueError(f"gc_content must be a number in (0, 1); got {gc_content!r}")
        self.gc_content = float(gc_content)
        self.bp_per_pair = check_int("bp_per_pair", bp_per_pair, 50)
        if isinstance(minority, bool) or not isinstance(minority, (int, float)) or not 0 <= minority < 0.5:
            raise ValueError(f"minority must be a number in [0, 0.5); got {minority!r}")
        self.minority = float(minority)
        self.vocab_size = self.tokenizer.vocab_size
        self.complement_map = self.tokenizer.complement_map.tolist()
        self.default_length = check_int("length", length, 1)
        self.check_length(self.default_length)
        self._settings = {"k": k, "stride": self.tokenizer.stride, "gc_content": self.gc_content,
                          "bp_per_pair": self.bp_per_pair, "minority": self.minority, "length": self.default_length}

    def check_length(self, length: int) -> None:
        if length < 100:
            raise ValueError(f"generated_a_tract_phasing needs length >= 100 bases; got length={length}")
        self.tokenizer.num_tokens(length)

    def num_pairs(self, length: int) -> int:
        """K, the site pairs in a sequence of ``length`` bases (odd, so that a majority always exists)."""
        return 2 * (length // (2 * self.bp_per_pair)) + 1

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        rows, labels = [], []
        for example in ids:
            codes, label = self.example(split, example, length)
            rows.append(codes)
            labels.append(label)
        inputs = self.tokenizer.encode_codes(torch.from_numpy(np.stack(rows)))
        return Batch(inputs, torch.tensor(labels, dtype=torch.int64))

    def example(self, split: str, example: int, length: int) -> Tuple[np.ndarray, int]:
        """Example number ``example`` of ``split``: (base codes (length,) int64 in 0..3, label)."""
        generator = self.example_generator(split, example, length)
        intended = int(torch.randint(2, (), generator=generator))
        codes = self._background(length, generator)
        units = self._units(intended, length, generator)
        slot = length // len(units)
        order = torch.randperm(len(units), generator=generator).tolist()
        for position, unit in zip(order, units):
            offset = int(torch.randint(slot - len(unit) + 1, (), generator=generator))
            start = position * slot + offset
            codes[start:start + len(unit)] = unit
        grammatical, ungrammatical = count_pairs(_text(codes))
        return codes, int(grammatical > ungrammatical)

    def _background(self, length: int, generator: torch.Generator) -> np.ndarray:
        at, gc = (1 - self.gc_content) / 2, self.gc_content / 2
        cumulative = torch.tensor([at, at + gc, at + 2 * gc], dtype=torch.float64)  # A | C | G | T
        return torch.searchsorted(cumulative, torch.rand(length, generator=generator, dtype=torch.float64)).numpy()

    def _units(self, intended: int, length: int, generator: torch.Generator) -> List[np.ndarray]:
        """The pairs and decoys of one example as base-code arrays, each on a random strand."""
        pairs = self.num_pairs(length)
        minority = int(self.minority * pairs)
        kinds = [intended == 1] * (pairs - minority) + [intended == 0] * minority  # True = in phase
        units = []
        for in_phase in kinds:
            gaps = IN_PHASE_GAPS if in_phase else OUT_OF_PHASE_GAPS
            gap = gaps[int(torch.randint(len(gaps), (), generator=generator))]
            # the gap never starts or ends with an A, so that the tracts keep their length and their gap
            filler = _text(self._background(gap, generator)).replace("A", "C")
            units.append(TRACT + filler + TRACT)
        units += [TRACT] * pairs  # decoys: lone tracts say nothing about the class
        flips = torch.randint(2, (len(units),), generator=generator).tolist()
        return [_codes(reverse_complement(u) if flip else u) for u, flip in zip(units, flips)]

