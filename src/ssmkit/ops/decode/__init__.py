"""One-token decoding at the memory-bandwidth floor, and weight-only quantisation.

Decoding a token reads every weight once, so its time is the time to stream the weights. The C++ kernels
(:mod:`.cpp`, ``csrc/decode.cpp``) run one fused step per Mamba or Mamba-2 layer (in_proj -> conv update ->
x_proj/dt_proj -> state update -> gate (Mamba-2: gated RMSNorm) -> out_proj) into preallocated buffers, with a
matrix-vector kernel for float32 or int8 (per-output-channel) weights. The specification of a fused step is
the layer's own ``step`` (``ssmkit.layers``), which the tests hold it to; the quantisation scheme is specified
in :mod:`.reference`. The model-level driver is :class:`ssmkit.models.decoding.FusedDecoder`.
"""

from .reference import METHODS, dequantize_int8, linear_ref, quantize_int8

__all__ = ["METHODS", "quantize_int8", "dequantize_int8", "linear_ref"]
