"""Assertions shared by the test modules."""

import inspect

import pytest
import torch


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max(1, max |expected|): a relative check on the output's scale."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x scale {scale:.3g}"


# --------------------------------------------------------------------------------------------------
# Peers of other versions: skip (saying why) where an installed transformers lacks what a test compares
# --------------------------------------------------------------------------------------------------
def skip_unless_grouped_mamba2_norm(ngroups: int) -> None:
    """Older transformers releases normalise Mamba-2's gated RMSNorm over all of d_inner instead of per group
    of d_inner / n_groups channels as mamba_ssm does (and ssmkit, which follows mamba_ssm); with one group the
    two agree."""
    if ngroups == 1:
        return
    import transformers
    from transformers.models.mamba2 import modeling_mamba2

    # the class was MambaRMSNormGated until transformers 5.24 and Mamba2RMSNormGated from 5.25 on
    norm = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or getattr(modeling_mamba2, "MambaRMSNormGated")
    if "group_size" not in inspect.signature(norm.__init__).parameters:
        pytest.skip(f"transformers {transformers.__version__} normalises Mamba-2's gated RMSNorm over all groups "
                    "together; mamba_ssm and ssmkit normalise per group (n_groups > 1 differs)")


def skip_unless_cache_has(cache, *methods: str) -> None:
    """transformers' cache API changed between releases; compare states only where it has these methods."""
    import transformers

    missing = [m for m in methods if not hasattr(cache, m)]
    if missing:
        pytest.skip(f"transformers {transformers.__version__}: {type(cache).__name__} has no {missing}")
