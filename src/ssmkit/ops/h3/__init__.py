"""H3's core (Fu, Dao et al. 2023, "Hungry Hungry Hippos", Sec. 3): a shift SSM on K, a diagonal SSM on the
per-head outer product K V^T, read out by Q.

* :mod:`.reference`  the specification: one token at a time (:func:`h3_step`, :func:`shift_ssm_step`) and
  the loops over time (:func:`h3_ref`, :func:`shift_ssm_ref`);
* :mod:`.fft`        the parallel pass: both SSMs as FFT convolutions (:func:`h3_fft`, :func:`shift_ssm`).
"""

from .fft import h3_fft, shift_ssm, shift_ssm_kernel
from .reference import H3System, h3_ref, h3_step, shift_ssm_ref, shift_ssm_step

__all__ = ["H3System", "h3_fft", "h3_ref", "h3_step", "shift_ssm", "shift_ssm_kernel", "shift_ssm_ref",
           "shift_ssm_step"]
