"""Pure functions on tensors: discretisation, HiPPO operators, LTI kernels, convolutions and scans.

Each op keeps a naive reference (a plain sequential loop, the readable specification, named ``*_ref``)
beside its fast paths; tests compare the two on outputs, final states and gradients.

An op with several backends is a package of one shape (see CONTRIBUTING.md, "Add an op")::

    ops/<package>/__init__.py   the public functions: resolve the backend (ops/backends.py), then call it
                  reference.py  the specification only
                  args.py       argument checks shared by every backend
                  chunked.py    pure-PyTorch fast paths (``shifted.py`` for the conv1d)
                  cpp.py        C++ (+ csrc/), where there is one
                  triton.py     Triton kernels, imported only at the first Triton call (runtime: ``_triton.py``)

The packages are named by model family, not by function: ``ops/mamba/`` holds Mamba's selective scan (S6)
and its one-token update, ``ops/mamba2/`` Mamba-2's SSD and its update, ``ops/conv1d/`` the causal
depthwise convolution. That keeps ``from ssmkit.ops import selective_scan, ssd`` (mamba_ssm's names) the
functions, while ``import ssmkit.ops.mamba`` is always the package: no function here shares a name with a
module of ``ssmkit.ops`` (tests/test_import_graph.py checks it), so neither hides the other.
"""

from .backends import last_backend, record_backends, use_backend
from .conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from .discretize import discretize_dense, discretize_diag
from .dplr import kernel_dplr
from .fftconv import direct_conv_ref, fft_conv
from .hippo_operators import hippo, nplr_legs, s4d_init
from .lti_kernels import kernel_ref, kernel_vandermonde
from .mamba2 import ssd, ssd_ref, ssd_state_update, ssd_state_update_ref
from .mamba import selective_scan, selective_scan_ref, selective_state_update, selective_state_update_ref
