"""Liquid-S4's core (Hasani et al. 2023, "Liquid Structural State-Space Models", Sec. 3): a diagonal SSM
plus the liquid terms in products of inputs up to order p, with the paper's two kernels ("kb", "polyb").

* :mod:`.reference`  the specification: one token at a time (:func:`liquid_s4_step`) and the loop over time
  (:func:`liquid_s4_ref`); equations, glossary and the differences from the authors' code are there;
* :mod:`.fft`        the parallel pass: Vandermonde kernels and FFT convolutions (:func:`liquid_s4_fft`).
"""

from .fft import input_correlations, liquid_s4_fft
from .reference import LIQUID_KERNELS, liquid_s4_ref, liquid_s4_step

__all__ = ["LIQUID_KERNELS", "input_correlations", "liquid_s4_fft", "liquid_s4_ref", "liquid_s4_step"]
