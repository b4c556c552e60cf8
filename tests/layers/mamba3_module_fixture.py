"""Inputs of the Mamba-3 module fixture (tests/layers/mamba3_module_fixture.json), rebuilt from seeds.

The expected outputs were computed once, in float64, by the authors' ``Mamba3`` module (state-spaces/mamba at
e9594ce, ``mamba_ssm/modules/mamba3.py``) with its GPU kernels replaced by their own pure-PyTorch references
(``mamba3_siso_step_ref`` for ``mamba3_siso_combined``, ``mamba3_MIMO_chunk_ref`` with the kernel-aligned
rotation for ``mamba3_mimo_combined``, ``rms_norm_ref`` for ``RMSNormGated``), loading the state dict of the
ssmkit layer built here (strict: the parameter names and shapes are theirs). It ran from a scratch copy
outside this repository; none of their code is part of ssmkit. Parameters are rounded to float32 values
because their norm reference casts the weights to float32.
"""

import torch

from ssmkit.layers.mamba3 import Mamba3

CONFIGS = {
    "siso": dict(d_model=8, d_state=8, headdim=4, ngroups=2),
    "siso_outproj_norm": dict(d_model=8, d_state=8, headdim=4, is_outproj_norm=True, rope_fraction=1.0),
    "mimo": dict(d_model=8, d_state=8, headdim=4, is_mimo=True, mimo_rank=2),
    "mimo_outproj_norm": dict(d_model=8, d_state=8, headdim=4, ngroups=2, is_mimo=True, mimo_rank=3,
                              is_outproj_norm=True),
}


def build_ours(kwargs, seed: int = 0) -> Mamba3:
    torch.manual_seed(seed)
    layer = Mamba3(**kwargs).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
            p.copy_(p.float().double())
    return layer


def module_input(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 9, 8, generator=g, dtype=torch.float64)
