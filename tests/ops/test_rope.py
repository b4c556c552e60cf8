"""Rotary embeddings: the fast rotation against the complex-number specification, the relative-position
property that makes a KV cache reusable, and continuation from an offset."""

import pytest
import torch

from ssmkit.ops.rope import apply_rope, apply_rope_ref, rope_cos_sin, rope_positions


@pytest.mark.parametrize("offset", [0, 5, 40000], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize("head_dim", [2, 6, 16])
def test_matches_complex_reference(head_dim, offset):
    x = torch.randn(2, 3, 7, head_dim, dtype=torch.float64)
    # theta_i is rounded differently in the two (1 ulp), so angles may differ by ~offset * 1e-16
    torch.testing.assert_close(apply_rope(x, offset), apply_rope_ref(x, offset), rtol=0, atol=1e-10)


def test_per_row_offsets_match_reference_and_single_rows():
    x = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    offset = torch.tensor([0, 7, 123])
    y = apply_rope(x, offset)
    torch.testing.assert_close(y, apply_rope_ref(x, offset), rtol=0, atol=1e-12)
    for row in range(3):
        torch.testing.assert_close(y[row : row + 1], apply_rope(x[row : row + 1], int(offset[row])), rtol=0, atol=0)
    # a (1,) offset is shared by every row
    torch.testing.assert_close(apply_rope(x, torch.tensor([7])), apply_rope(x, 7), rtol=0, atol=0)


def test_dot_product_depends_only_on_relative_position():
    head_dim = 16
    q = torch.randn(1, 1, 1, head_dim, dtype=torch.float64)
    k = torch.randn(1, 1, 1, head_dim, dtype=torch.float64)

    def score(m, n):
        return (apply_rope(q, m) * apply_rope(k, n)).sum().item()

    for m, n in [(3, 0), (10, 10), (0, 9), (257, 250)]:
        for shift in (1, 17, 5000):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-9)
    # and it does depend on the distance: the scores at different m - n are not all equal
    distinct = {round(score(d, 0), 6) for d in range(6)}
    assert len(distinct) == 6


def test_offset_continuation_equals_whole_sequence():
    x = torch.randn(2, 3, 30, 8)
    whole = apply_rope(x, 4)
    pieces = torch.cat([apply_rope(x[:, :, :11], 4), apply_rope(x[:, :, 11:12], 15), apply_rope(x[:, :, 12:], 16)], 2)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=0)


def test_position_zero_is_identity_and_norms_are_kept():
    x = torch.randn(2, 2, 9, 12, dtype=torch.float64)
    y = apply_rope(x, 0)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    assert (y[:, :, 1:] - x[:, :, 1:]).abs().max() > 1e-3


def test_angles_follow_theta_and_dtype_is_kept():
    cos, sin = rope_cos_sin(torch.tensor([0, 1, 100]), head_dim=4, base=10000.0)
    assert cos.shape == (3, 2)
    # theta = (1, 10000^-0.5 = 0.01)
    torch.testing.assert_close(torch.atan2(sin[1], cos[1]), torch.tensor([1.0, 0.01], dtype=torch.float64))
    torch.testing.assert_close(cos[2], torch.tensor([100.0, 1.0], dtype=torch.float64).cos())
    assert apply_rope(torch.randn(1, 1, 3, 4, dtype=torch.bfloat16), 2).dtype == torch.bfloat16
    torch.testing.assert_close(rope_positions(torch.tensor([2, 5]), 3), torch.tensor([[2, 3, 4], [5, 6, 7]]))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="head_dim must be even.*got 5"):
        apply_rope(torch.randn(1, 1, 3, 5))
    with pytest.raises(ValueError, match=r"x must be \(batch, heads, L, head_dim\); got \(3, 4\)"):
        apply_rope(torch.randn(3, 4))
    with pytest.raises(ValueError, match="offset must be >= 0; got -1"):
        apply_rope(torch.randn(1, 1, 3, 4), -1)
    with pytest.raises(TypeError, match="offset must be an int or an integer tensor; got dtype torch.float32"):
        apply_rope(torch.randn(1, 1, 3, 4), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"offset must be \(batch=2,\) or \(1,\); got \(3,\)"):
        apply_rope(torch.randn(2, 1, 3, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="base must be a finite number > 1; got 0.5"):
        apply_rope(torch.randn(1, 1, 3, 4), 0, base=0.5)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        apply_rope(torch.ones(1, 1, 3, 4, dtype=torch.long))
