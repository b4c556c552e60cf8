"""The one precision rule the ops share: accumulate in at least float32.

Half-precision inputs (bfloat16, float16) are computed in float32 and returned in their own dtype; float32
stays float32 and float64 stays float64 (so the references can be run in float64 by the tests).
"""

from __future__ import annotations

import torch

#: the activation dtypes that are upcast to float32 for the arithmetic
HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op computes in for inputs of ``dtype``: float32 for half precision, else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)
