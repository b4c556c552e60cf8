"""Sequential and permuted 8x8 digits: the small offline cousin of sequential / permuted MNIST.

scikit-learn bundles 1797 handwritten digits as 8x8 images of integers 0..16 (``load_digits``; no
download). Each image is read row-major as a sequence of 64 pixels and classified into 10 classes. The
permuted variant reorders the 64 positions by one fixed permutation (the same for every image, drawn
from ``permutation_seed``), which destroys locality.

Inputs are tokens 0..16 by default (vocabulary 17, shape (B, 64)); ``real_valued=True`` gives pixel / 16
as floats of shape (B, 64, 1) instead.

Splits are fixed index ranges of the bundled order: train = images 0..1399, val = 1400..1499,
test = the last 297 (1500..1796).
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import torch

from .base import Batch, Task, check_int, register_task, seeded_generator

NUM_IMAGES = 1797
SEQUENCE_LENGTH = 64
SPLIT_RANGES = {"train": (0, 1400), "val": (1400, 1500), "test": (1500, NUM_IMAGES)}


@lru_cache(maxsize=1)
def load_digit_arrays() -> Tuple[torch.Tensor, torch.Tensor]:
    """(pixels (1797, 64) int64 in 0..16, labels (1797,) int64), read once from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits task reads the 8x8 digits bundled with scikit-learn, which is not "
                          "installed; install it with `pip install scikit-learn`") from error
    data = load_digits()
    pixels = torch.from_numpy(data.data.round().astype("int64"))
    labels = torch.from_numpy(data.target.astype("int64"))
    if pixels.shape != (NUM_IMAGES, SEQUENCE_LENGTH):
        raise RuntimeError(f"scikit-learn's digits have shape {tuple(pixels.shape)}; expected (1797, 64)")
    return pixels, labels


@register_task("digits")
class Digits(Task):
    """Sequential (or permuted) 8x8 digits classification: 64 pixels in, one of 10 classes out.

    Args:
        permuted: reorder positions by ``permutation`` (pMNIST-style).
        permutation_seed: seed of that fixed permutation (independent of ``seed``).
        real_valued: float inputs (B, 64, 1) = pixel / 16 instead of tokens (B, 64) in 0..16.
        seed: the training order (a fresh permutation of the 1400 train images each epoch).
    """

    name = "digits"
    kind = "classification"
    num_classes = 10
    default_length = SEQUENCE_LENGTH

    def __init__(self, permuted: bool = False, permutation_seed: int = 0, real_valued: bool = False,
                 seed: int = 0):
        super().__init__(seed)
        for arg, value in (("permuted", permuted), ("real_valued", real_valued)):
            if not isinstance(value, bool):
                raise TypeError(f"{arg} must be a bool; got {type(value).__name__} {value!r}")
        self.permuted = permuted
        self.permutation_seed = check_int("permutation_seed", permutation_seed)
        self.real_valued = real_valued
        if real_valued:
            self.input_dim = 1
        else:
            self.vocab_size = 17
        if permuted:
            self.permutation = torch.randperm(SEQUENCE_LENGTH,
                                              generator=seeded_generator("digits-permutation", permutation_seed))
        else:
            self.permutation = torch.arange(SEQUENCE_LENGTH)
        self._settings = {"permuted": permuted, "permutation_seed": permutation_seed, "real_valued": real_valued}
        load_digit_arrays()  # fail now, not at the first batch, when scikit-learn is missing

    def num_examples(self, split: str) -> int:
        super().num_examples(split)
        start, stop = SPLIT_RANGES[split]
        return stop - start

    def check_length(self, length: int) -> None:
        if length != SEQUENCE_LENGTH:
            raise ValueError(f"digits sequences have length 64 (8x8 pixels); got length={length}")

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        pixels, labels = load_digit_arrays()
        rows = torch.tensor(ids, dtype=torch.long) + SPLIT_RANGES[split][0]
        sequences = pixels[rows][:, self.permutation]                          # (B, 64) int64
        if self.real_valued:
            return Batch((sequences.float() / 16.0).unsqueeze(-1), labels[rows])  # (B, 64, 1), (B,)
        return Batch(sequences, labels[rows])
