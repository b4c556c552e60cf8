"""Weight-only quantisation for decoding: the specification the C++ kernels are held to.

int8, per output channel (symmetric, as llama.cpp's q8_0 but with one scale per row instead of per block
of 32; the scheme of LLM.int8's vector-wise quantisation without its outlier split, Dettmers et al. 2022,
arXiv 2208.07339):

    scale[m] = max_k |W[m, k]| / 127          (1 for an all-zero row)
    Q[m, k]  = round(W[m, k] / scale[m])       in [-127, 127], int8
    W~[m, k] = Q[m, k] * scale[m]

so the matrix-vector product is y[m] = scale[m] * sum_k Q[m, k] x[k] + bias[m]: the kernel converts Q to float
in registers and multiplies by the scale once per row. Shapes: W (M, K) -> Q (M, K) int8, scale (M,) float32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

METHODS = ("int8",)


def quantize_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """weight (M, K) float -> (Q (M, K) int8, scale (M,) float32), symmetric per output channel."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a floating-point (out_features, in_features) matrix; got {got}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(Q (M, K) int8, scale (M,)) -> W~ (M, K) = Q * scale[:, None]."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q must be an int8 (M, K) matrix; got {q.dtype} {tuple(q.shape)}")
    if scale.shape != (q.shape[0],):
        raise ValueError(f"scale must be ({q.shape[0]},) for q of shape {tuple(q.shape)}; got {tuple(scale.shape)}")
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (B, K) @ W^T (+ bias), W float32 (M, K) or int8 with its per-row scale (M,); returns (B, M)."""
    w = dequantize_int8(weight, scale) if weight.dtype == torch.int8 else weight
    return F.linear(x, w, bias)
