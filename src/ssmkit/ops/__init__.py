"""Pure functions on tensors: discretisation, HiPPO operators, LTI kernels, convolutions and scans.

Each op keeps a naive reference (a plain sequential loop, the readable specification) beside its fast
paths; tests compare the two on outputs, final states and gradients.

``ssmkit.ops.selective_scan`` and ``ssmkit.ops.ssd`` are the functions (mamba_ssm-compatible signatures);
their packages stay importable as ``from ssmkit.ops.mamba2.reference import ssd_ref``.
"""

from .backends import last_backend, record_backends, use_backend
from .conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from .discretize import discretize_dense, discretize_diag
from .dplr import kernel_dplr
from .fftconv import direct_conv_reference, fft_conv
from .hippo import hippo, nplr_legs, s4d_init
from .lti_kernels import kernel_naive, kernel_vandermonde
from .mamba2 import ssd, ssd_ref, ssd_state_update, ssd_state_update_ref
from .mamba import selective_scan, selective_scan_ref, selective_state_update, selective_state_update_ref
