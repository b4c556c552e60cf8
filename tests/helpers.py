"""Assertions shared by the test modules."""

import torch


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max(1, max |expected|): a relative check on the output's scale."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x scale {scale:.3g}"
