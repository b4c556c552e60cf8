"""Hyena's long-convolution recurrence (Poli et al. 2023, "Hyena Hierarchy", Sec. 3.1, Def. 3.1) and the modal
distillation of its filters (Massaroli et al. 2023, "Laughing Hyena Distillery", Sec. 3).

* :mod:`.reference`  the specification: the order-N recurrence with each convolution as an explicit sum
  (:func:`hyena_recurrence_ref`), and a modal filter by repeated multiplication (:func:`modal_kernel_ref`);
* :mod:`.fft`        the parallel pass by FFT convolutions (:func:`hyena_recurrence`) and the modal kernel by
  exponentials (:func:`modal_kernel`);
* :mod:`.distill`    fitting poles and residues to a filter (:func:`fit_modal`).
"""

from .distill import fit_modal
from .fft import hyena_recurrence, modal_kernel
from .reference import hyena_recurrence_ref, modal_kernel_ref

__all__ = ["fit_modal", "hyena_recurrence", "hyena_recurrence_ref", "modal_kernel", "modal_kernel_ref"]
