"""Long DNA classification, generated: a cis-regulatory "grammar" of two binding sites and their spacing.

GENERATED DATA. No real genome with labels ships inside a package that our registries serve (Biopython's
wheel has no sequence test files; Debian's bowtie-examples has the E. coli genome but no labels), so this
task generates its sequences. The name says so: ``generated_enhancer_grammar``.

Biological motivation
---------------------
Transcription factors that bind DNA side by side often act together only when their sites lie on the same
face of the double helix, i.e. when their centres are a whole number of helical turns (about 10.5 bp) apart;
half a turn more puts them on opposite faces (helical phasing of cooperative binding, e.g. the sites of the
interferon-beta enhanceosome). Regulatory regions are thus read by a *grammar*: which sites, in which
orientation, at which spacing. Both sites can sit on either strand, so the label does not depend on the strand
the sequence was read from (it is invariant under the reverse complement, as a Caduceus-style model is).

The task
--------
Each sequence of ``length`` bases is drawn from a background with GC content ``gc_content`` (0.41, the human
genome's average), and holds ``K = 2 * (length // (2 * bp_per_pair)) + 1`` pairs of a site A (``SITE_A``,
NF-kB-like, 10 bp) followed by a site B (``SITE_B``, IRF-like, 10 bp) at a gap g of background bases between
them, each pair on a random strand, plus K lone A or B sites as decoys, in separate slots across the whole
sequence. The gap is *grammatical* (g in 10, 11: centres 20-21 bp apart, two helical turns: same face) or
*ungrammatical* (g in 5, 6, 15, 16: 1.5 or 2.5 turns: opposite faces). The class is 1 ("active") when the
sequence holds more grammatical than ungrammatical pairs, 0 otherwise; examples are drawn with
``K - K // 3`` pairs of the class's kind and ``K // 3`` of the other kind, so the proportion (2:1) is the same
at every length and a longer sequence only means more to read. Labels are computed by scanning the finished
sequence for the sites on both strands (so a site that the background happened to form is counted too).

Inputs are token ids from :class:`~.nucleotides.NucleotideTokenizer` (``k`` bases per token, non-overlapping
by default): shape (B, length / k) for ``stride=k``; ``length`` always counts bases. Targets (B,) in {0, 1}.
The task's ``complement_map`` is the tokenizer's, for reverse-complement-equivariant models.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .base import Batch, Task, check_int, register_task
from .nucleotides import BASES, NucleotideTokenizer, reverse_complement

SITE_A = "GGGACTTTCC"  # NF-kB-like consensus
SITE_B = "AAGTGAAAGT"  # IRF-like (GAAA repeats)
GRAMMATICAL_GAPS = (10, 11)
UNGRAMMATICAL_GAPS = (5, 6, 15, 16)
_CODE = {base: code for code, base in enumerate(BASES)}
_LETTERS = np.frombuffer(BASES.encode("ascii"), dtype=np.uint8)


def _text(codes: np.ndarray) -> str:
    """Base codes 0..3 -> an ACGT string."""
    return _LETTERS[codes].tobytes().decode("ascii")


def _codes(text: str) -> np.ndarray:
    return np.array([_CODE[base] for base in text], dtype=np.int64)


def count_pairs(sequence: str) -> Tuple[int, int]:
    """(grammatical, ungrammatical) A-gap-B pairs in ``sequence`` on either strand (see the module docstring).

    On the reverse strand a pair reads RC(B), gap, RC(A) on the given strand.
    """
    counts = [0, 0]
    for first, second in ((SITE_A, SITE_B), (reverse_complement(SITE_B), reverse_complement(SITE_A))):
        starts_first = _occurrences(sequence, first)
        starts_second = set(_occurrences(sequence, second))
        for start in starts_first:
            for kind, gaps in enumerate((GRAMMATICAL_GAPS, UNGRAMMATICAL_GAPS)):
                counts[kind] += sum(start + len(first) + gap in starts_second for gap in gaps)
    return counts[0], counts[1]


def _occurrences(text: str, word: str) -> List[int]:
    found, start = [], text.find(word)
    while start != -1:
        found.append(start)
        start = text.find(word, start + 1)
    return found


@register_task("generated_enhancer_grammar")
class GeneratedEnhancerGrammar(Task):
    """Is this (generated) regulatory sequence active? Binding-site pairs at helical spacing (module docstring).

    Args:
        k: bases per token (1 = one token per base; 2..8 = k-mers).
        stride: ``k`` (non-overlapping k-mers, default) or 1 (overlapping).
        gc_content: probability that a background base is G or C.
        bp_per_pair: bases per site pair (sets K from the length; every sequence holds >= 1 pair).
        length: the default sequence length in bases (``batch(..., length=)`` overrides it).
        seed: the stream of examples (splits draw from separate streams).

    ``length`` (bases) must be >= 100 and readable by the tokenizer.
    """

    name = "generated_enhancer_grammar"
    kind = "classification"
    num_classes = 2
    default_length = 10_000

    def __init__(self, k: int = 1, stride: Optional[int] = None, gc_content: float = 0.41,
                 bp_per_pair: int = 500, length: int = 10_000, seed: int = 0):
        super().__init__(seed)
        self.tokenizer = NucleotideTokenizer(k, stride)
        if isinstance(gc_content, bool) or not isinstance(gc_content, (int, float)) or not 0 < gc_content < 1:
            raise ValueError(f"gc_content must be a number in (0, 1); got {gc_content!r}")
        self.gc_content = float(gc_content)
        self.bp_per_pair = check_int("bp_per_pair", bp_per_pair, 50)
        self.vocab_size = self.tokenizer.vocab_size
        self.complement_map = self.tokenizer.complement_map.tolist()
        self.default_length = check_int("length", length, 1)
        self.check_length(self.default_length)
        self._settings = {"k": k, "stride": self.tokenizer.stride, "gc_content": self.gc_content,
                          "bp_per_pair": self.bp_per_pair, "length": self.default_length}

    def check_length(self, length: int) -> None:
        if length < 100:
            raise ValueError(f"generated_enhancer_grammar needs length >= 100 bases; got length={length}")
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
        minority = pairs // 3
        kinds = [intended == 1] * (pairs - minority) + [intended == 0] * minority  # True = grammatical
        units = []
        for grammatical in kinds:
            gaps = GRAMMATICAL_GAPS if grammatical else UNGRAMMATICAL_GAPS
            gap = gaps[int(torch.randint(len(gaps), (), generator=generator))]
            filler = _text(self._background(gap, generator))
            units.append(SITE_A + filler + SITE_B)
        for _ in range(pairs):  # decoys: lone sites say nothing about the class
            units.append(SITE_A if int(torch.randint(2, (), generator=generator)) else SITE_B)
        flips = torch.randint(2, (len(units),), generator=generator).tolist()
        return [_codes(reverse_complement(u) if flip else u) for u, flip in zip(units, flips)]

    @property
    def motifs(self) -> Dict[str, str]:
        """The two sites and their reverse complements (for plots and tests)."""
        return {"A": SITE_A, "B": SITE_B, "rc(A)": reverse_complement(SITE_A), "rc(B)": reverse_complement(SITE_B)}
