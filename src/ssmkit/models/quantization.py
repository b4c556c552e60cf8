"""Weight-only quantisation of a model: ``ssmkit.quantize(model, "int8")``.

Every ``nn.Linear`` of the mixers and MLPs and the LM head is replaced by an :class:`Int8Linear` holding int8
weights and one float32 scale per output channel (:func:`ssmkit.ops.decode.quantize_int8`). Left in float32:
embeddings, norms, convolutions, the SSM parameters (A_log, D, dt biases), and the small selection maps of Mamba
(``x_proj``, ``dt_proj``: under 6% of a layer's weights, and they set Delta, B and C, to which the recurrence is
most sensitive) and MoE routers. A tied LM head gets its own int8 copy; the embedding stays float32.

The fused decoder (:mod:`ssmkit.models.decoding`) reads the int8 weights directly; a parallel forward
(prefill, training-style evaluation) uses the dequantised weights, so both compute with the same numbers.

Checkpoints: ``save_pretrained`` writes the int8 weights and scales into model.safetensors
(``<module>.weight_int8``, ``<module>.weight_scale``) and the method and module names into
``quantization.json`` beside config.json (the model config itself is unchanged: quantisation is a property
of the stored weights, not of the architecture); ``from_pretrained`` reads it back.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.decode import METHODS, dequantize_int8, quantize_int8

#: Linear maps kept in float32 (see the module docstring)
KEEP_FLOAT = ("x_proj", "dt_proj", "router")
QUANTIZATION_FILE = "quantization.json"


class Int8Linear(nn.Module):
    """y = x @ (Q * scale[:, None])^T + bias, Q int8 (out, in), scale (out,) float32.

    ``weight`` is the dequantised float32 matrix (computed on access), so code that reads ``layer.weight`` (the
    layers' channel-first matmuls) works unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scale = quantize_int8(linear.weight)
        module.weight_int8.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach().float())
        return module.to(linear.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantizable_modules(model: nn.Module) -> List[str]:
    """Names of the ``nn.Linear`` modules that :func:`quantize` replaces (see the module docstring)."""
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.split(".")[-1] not in KEEP_FLOAT:
            if name == "lm_head" or ".mixer" in name or ".mlp" in name:
                names.append(name)
    return names


def quantize(model: nn.Module, method: str = "int8", modules: Optional[List[str]] = None) -> nn.Module:
    """Quantise ``model``'s weights in place (and return it); see the module docstring.

    Args:
        model: an :class:`~ssmkit.models.model.SSMModel` (float32 or another float dtype on any device).
        method: "int8" (per-output-channel symmetric int8).
        modules: names of the linear maps to replace (default :func:`quantizable_modules`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}; got {method!r}")
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"model is already quantised ({model.quantization['method']})")
    names = quantizable_modules(model) if modules is None else list(modules)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if type(linear) is not nn.Linear:
            raise ValueError(f"modules: {name!r} is a {type(linear).__name__}, not an nn.Linear")
        setattr(parent, child, Int8Linear.from_linear(linear))
    model.quantization = {"method": method, "modules": names}
    return model
