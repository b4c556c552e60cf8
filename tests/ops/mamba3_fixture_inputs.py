"""The inputs of the Mamba-3 fixture (tests/ops/mamba3_reference_fixture.json), rebuilt from a seed.

The fixture's expected values were computed once, in float64, by the authors' pure-PyTorch reference
functions (state-spaces/mamba at e9594ce, tests/ops/triton/test_mamba3_siso.py ``mamba3_siso_step_ref`` and
tests/ops/tilelang/test_mamba3_mimo.py ``mamba3_MIMO_step_ref`` and ``mamba3_MIMO_chunk_ref``), run from a
scratch copy outside this repository on exactly these inputs; their code is not part of ssmkit. Initial states
are rounded to float32 values (their step references cast the SSM state to float32) and the MIMO chunk
reference was given the cumulative angles in float64 (its helper rounds them to float32), so what remains
between theirs and ours is float64 rounding.
"""

import torch
import torch.nn.functional as F

SIZES = dict(batch=1, length=7, rank=2, n_heads=2, d_state=8, headdim=2, n_angles=2)


def fixture_inputs(seed: int = 2026):
    """Raw per-token inputs in the authors' layout (before bias, sigmoid, tanh): a dict of float64 tensors."""
    g = torch.Generator().manual_seed(seed)
    B, L, R, H, N, P, S = (SIZES[k] for k in ("batch", "length", "rank", "n_heads", "d_state", "headdim",
                                               "n_angles"))

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def f32(t):
        return t.float().double()

    return dict(
        C=r(B, L, R, H, N), B=r(B, L, R, H, N), x=r(B, L, H, P), dt=F.softplus(r(B, L, H) - 1),
        A=-(torch.rand(B, L, H, generator=g, dtype=torch.float64) + 0.1), trap=r(B, L, H), angles=r(B, L, H, S),
        C_bias=r(H, R, N), B_bias=r(H, R, N), D=r(H), mimo_x=r(H, R, P), mimo_o=r(H, R, P),
        # (angle, ssm (H, P, N), k (H, R, N) rotated, v (H, R, P)) in their step references' layout
        state=(f32(r(B, H, S)), f32(r(B, H, P, N)), f32(r(B, H, R, N)), f32(r(B, H, R, P))),
    )
