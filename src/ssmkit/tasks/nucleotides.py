"""Nucleotide tokenizers: single bases or k-mers, with the reverse complement as an operation on token ids.

DNA is double-stranded: the same molecule read on the other strand is the *reverse complement* (RC) of the
sequence (reverse the order, swap A<->T and C<->G). A model that should not care which strand it was given
needs the RC as an operation on its inputs; here it is ``flip`` of the token order followed by
``complement_map[token]``, and both tokenizers are built so that

    encode(reverse_complement(s)) == complement_map[encode(s).flip(-1)]          (exactly)

for every sequence s they accept (tests/tasks/test_dna.py checks it).

Vocabularies
------------
Characters (``k=1``): ``0`` pad, ``1`` N (any base other than A, C, G, T), ``2..5`` = A, C, G, T.
k-mers (``k>1``): ``0`` pad, ``1`` any k-mer holding an N, then the ``4**k`` k-mers over ACGT in
lexicographic order (AA..A = 2). ``stride=k`` (default) reads non-overlapping k-mers, so a sequence of L bases
becomes L / k tokens (L must be a multiple of k); ``stride=1`` reads every overlapping k-mer (DNABERT style,
L - k + 1 tokens). The complement of a k-mer token is the token of the k-mer's reverse complement, which is
what makes the identity above hold for k-mers too.

Decoding returns upper-case text: ``decode(encode(s)) == s.upper()`` for every s over ACGT, and over ACGTN
for characters (a k-mer holding an N is one unknown token and decodes as k N's).
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

BASES = "ACGT"
COMPLEMENT = {"A": "T", "C": "G", "G": "C", "T": "A", "N": "N"}
PAD_ID = 0
UNKNOWN_ID = 1
FIRST_BASE_ID = 2

# byte -> base code 0..3 (A, C, G, T) or 4 (anything else, read as N); case-insensitive
_BASE_CODE = np.full(256, 4, dtype=np.int64)
for _code, _base in enumerate(BASES):
    _BASE_CODE[ord(_base)] = _code
    _BASE_CODE[ord(_base.lower())] = _code


def reverse_complement(sequence: str) -> str:
    """The reverse complement of a DNA string (upper case; any letter other than ACGT becomes N)."""
    if not isinstance(sequence, str):
        raise TypeError(f"sequence must be a str; got {type(sequence).__name__}")
    return "".join(COMPLEMENT.get(base, "N") for base in reversed(sequence.upper()))


class NucleotideTokenizer:
    """Bases or k-mers <-> token ids (vocabulary in the module docstring).

    Args:
        k: bases per token (1 = characters).
        stride: bases between the starts of consecutive tokens: ``k`` (non-overlapping, default) or 1
            (overlapping k-mers).

    Attributes:
        vocab_size: 6 for characters, ``4**k + 2`` for k-mers.
        complement_map: (vocab_size,) int64; ``complement_map[t]`` is the token of the reverse complement of
            token t's bases (pad -> pad, unknown -> unknown). It is an involution.
    """

    def __init__(self, k: int = 1, stride: Optional[int] = None):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 8:
            raise ValueError(f"k must be an int in 1..8 (4**k k-mers); got {k!r}")
        stride = k if stride is None else stride
        if stride not in (1, k) or isinstance(stride, bool):
            raise ValueError(f"stride must be {k} (non-overlapping k-mers) or 1 (overlapping); got {stride!r}")
        self.k, self.stride = k, stride
        self.vocab_size = 4 ** k + FIRST_BASE_ID
        self.complement_map = torch.tensor(self._complement_ids(), dtype=torch.int64)

    def __repr__(self) -> str:
        return f"NucleotideTokenizer(k={self.k}, stride={self.stride})"

    def _complement_ids(self) -> List[int]:
        ids = [PAD_ID, UNKNOWN_ID]
        for kmer in itertools.product(range(4), repeat=self.k):
            # complement of base code c is 3 - c (A0<->T3, C1<->G2); reversing the k-mer reverses the digits
            rc = [3 - c for c in reversed(kmer)]
            ids.append(FIRST_BASE_ID + int(np.dot(rc, 4 ** np.arange(self.k - 1, -1, -1))))
        return ids

    def num_tokens(self, num_bases: int) -> int:
        """Tokens that ``num_bases`` bases become (ValueError when the tokenizer cannot read that many)."""
        if num_bases < self.k:
            raise ValueError(f"a sequence must hold at least k={self.k} bases; got {num_bases}")
        if self.stride == 1:
            return num_bases - self.k + 1
        if num_bases % self.k:
            raise ValueError(f"non-overlapping {self.k}-mers need a length that is a multiple of {self.k}; "
                             f"got {num_bases} bases")
        return num_bases // self.k

    # ------------------------------------------------------------------------------------------------
    def encode_codes(self, codes: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """Base codes (..., L) with 0..3 = A, C, G, T and 4 = N -> token ids (..., num_tokens(L)) int64."""
        codes = torch.as_tensor(codes, dtype=torch.int64)
        if codes.dim() == 0 or codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 4):
            raise ValueError("codes must be a (..., length) array of base codes in 0..4")
        self.num_tokens(codes.shape[-1])
        if self.k == 1:
            return torch.where(codes == 4, UNKNOWN_ID, codes + FIRST_BASE_ID)
        windows = codes.unfold(-1, self.k, self.stride)                       # (..., T, k)
        place = 4 ** torch.arange(self.k - 1, -1, -1)
        ids = (windows.clamp(max=3) * place).sum(-1) + FIRST_BASE_ID
        return torch.where((windows == 4).any(-1), UNKNOWN_ID, ids)

    def encode(self, sequence: str) -> torch.Tensor:
        """A DNA string (any case; letters other than ACGT read as N) -> (num_tokens,) int64 token ids."""
        if not isinstance(sequence, str):
            raise TypeError(f"sequence must be a str; got {type(sequence).__name__}")
        raw = np.frombuffer(sequence.encode("ascii", errors="replace"), dtype=np.uint8)
        return self.encode_codes(_BASE_CODE[raw])

    def encode_batch(self, sequences: Sequence[str]) -> torch.Tensor:
        """Equal-length DNA strings -> (batch, num_tokens) int64."""
        lengths = {len(s) for s in sequences}
        if len(lengths) != 1:
            raise ValueError(f"sequences must all have the same length; got lengths {sorted(lengths)}")
        return torch.stack([self.encode(s) for s in sequences])

    def decode(self, ids: Union[torch.Tensor, Sequence[int]]) -> str:
        """(T,) token ids -> the DNA string they read (pad tokens are skipped; unknown k-mers give k N's)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D (num_tokens,); got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, vocab_size={self.vocab_size}); got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        kmers = [self._token_text(int(t)) for t in ids if int(t) != PAD_ID]
        if self.stride == self.k or not kmers:
            return "".join(kmers)
        return kmers[0] + "".join(kmer[-1] for kmer in kmers[1:])  # overlapping: each adds its last base

    def _token_text(self, token: int) -> str:
        if token == UNKNOWN_ID:
            return "N" * self.k
        index, letters = token - FIRST_BASE_ID, []
        for _ in range(self.k):
            index, code = divmod(index, 4)
            letters.append(BASES[code])
        return "".join(reversed(letters))

    def reverse_complement_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (..., T) of a sequence -> the token ids of its reverse complement (flip, then complement)."""
        return self.complement_map.to(ids.device)[ids.flip(-1)]
