"""HiPPO online reconstruction of band-limited noise (HiPPO Fig. 2 setting: T = 3 s, dt = 1e-3, 3 Hz, N = 64).

Errors are RMSE / RMS over the reconstructed span, seed 0. Measured when written (float64):
legs whole history 2.08e-2 (bilinear) / 9.0e-6 (zoh), N=16: 0.54; legt last window 1.9e-4 / 1.1e-5,
N=16: 9.0e-4; fout last window 2.9e-2 with the FouT correction of How to Train Your HiPPO (N=16: 8.6e-2),
0.377 with the FouT of ssmkit.ops.hippo_operators as it stands (see test_fout_reconstructs_the_window).
"""

import math

import numpy as np
import pytest
import torch

from ssmkit.ops.hippo_operators import hippo
from ssmkit.ops.hippo_reconstruction import (band_limited_noise, fourier_basis, hippo_reconstruct,
                                             hippo_states, laguerre_basis, legendre_basis,
                                             reconstruction_basis, relative_error)

DT = 1e-3


@pytest.fixture(scope="module")
def noise():
    return band_limited_noise(3.0, DT, 3.0, seed=0)


def error(result):
    return relative_error(result.reconstruction, result.target).item()


# --------------------------------------------------------------------------------------------------
# The test signal and the bases
# --------------------------------------------------------------------------------------------------
def test_band_limited_noise(noise):
    assert noise.shape == (3000,) and noise.dtype == torch.float64
    assert abs(noise.mean().item()) < 1e-12
    assert abs(noise.pow(2).mean().sqrt().item() - 1) < 1e-12
    spectrum = torch.fft.rfft(noise).abs()
    freqs = torch.fft.rfftfreq(3000, DT)
    assert spectrum[freqs > 3.0].max() < 1e-10 * spectrum.max()
    assert spectrum[(freqs > 0) & (freqs <= 3.0)].min() > 0
    torch.testing.assert_close(band_limited_noise(3.0, DT, 3.0, seed=0), noise, rtol=0, atol=0)
    assert not torch.allclose(band_limited_noise(3.0, DT, 3.0, seed=1), noise)
    batch = band_limited_noise(1.0, DT, 5.0, seed=2, batch=3)
    assert batch.shape == (3, 1000)
    torch.testing.assert_close(batch.pow(2).mean(-1), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="cutoff must be a number > 0; got -1"):
        band_limited_noise(1.0, DT, -1)
    with pytest.raises(ValueError, match="cutoff must be at least the lowest frequency"):
        band_limited_noise(1.0, DT, 0.5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        band_limited_noise(1.0, 2.0, 5.0)


def test_bases_are_orthonormal():
    N = 12
    x, w = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(N + 1))
    G = legendre_basis(N, x)
    torch.testing.assert_close(G.T @ (G * w[:, None] / 2), torch.eye(N, dtype=torch.float64))
    x, w = (torch.from_numpy(v) for v in np.polynomial.laguerre.laggauss(N + 1))  # weight e^{-x}
    G = laguerre_basis(N, x)
    torch.testing.assert_close(G.T @ (G * w[:, None]), torch.eye(N, dtype=torch.float64))
    for n_fourier in (N, N + 1):  # even N ends on a cosine, odd N on a sine
        r = torch.arange(64, dtype=torch.float64) / 64
        G = fourier_basis(n_fourier, r)
        torch.testing.assert_close(G.T @ G / 64, torch.eye(n_fourier, dtype=torch.float64))
    r = torch.tensor([0.1], dtype=torch.float64)
    expected = [1, math.sqrt(2) * math.cos(0.2 * math.pi), math.sqrt(2) * math.sin(0.2 * math.pi),
                math.sqrt(2) * math.cos(0.4 * math.pi)]
    torch.testing.assert_close(fourier_basis(4, r)[0], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(legendre_basis(3, r)[0],
                               torch.tensor([1, math.sqrt(3) * 0.1, math.sqrt(5) * (3 * 0.01 - 1) / 2],
                                            dtype=torch.float64))


@pytest.mark.parametrize("measure, N, bound", [("legs", 16, 1e-3), ("lagt", 16, 1e-4), ("legt", 16, 5e-3)])
def test_state_is_the_projection_onto_the_basis(noise, measure, N, bound):
    """The ODE state at the end equals the quadrature projection of the history onto reconstruction_basis
    under the measure: this pins the basis (and its argument mapping) to the ODE of ssmkit.ops.hippo_operators."""
    result = hippo_reconstruct(noise, DT, measure, N, method="zoh")
    t = 3.0
    s = (torch.arange(1, 3001, dtype=torch.float64) - 0.5) * DT
    weight = {"legs": torch.full_like(s, DT / t), "lagt": torch.exp(-(t - s)) * DT,
              "legt": (t - s < 1.0).double() * DT}[measure]
    projection = reconstruction_basis(measure, N, s, t).T @ (noise * weight)
    state = result.states[-1]
    assert (state - projection).norm() / projection.norm() < bound


# --------------------------------------------------------------------------------------------------
# Reconstruction from the final state
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~3.5 s on 2 shared cores
def test_legs_reconstructs_the_whole_history(noise):
    bilinear = hippo_reconstruct(noise, DT, "legs", 64)
    assert bilinear.states.shape == (3000, 64)
    assert bilinear.times.shape == (3000,) and bilinear.reconstruction.shape == (3000,)
    torch.testing.assert_close(bilinear.target, noise)
    assert error(bilinear) < 0.03  # measured 2.08e-2: bilinear steps 1/k are coarse at the start
    zoh = hippo_reconstruct(noise, DT, "legs", 64, method="zoh")
    assert error(zoh) < 1e-4  # measured 9.0e-6: exact for held samples, only the truncation to N remains
    small = hippo_reconstruct(noise, DT, "legs", 16)
    assert error(small) > 10 * error(bilinear)  # measured 0.54: 16 polynomials cannot follow 9 cycles


def test_legt_reconstructs_the_last_window(noise):
    result = hippo_reconstruct(noise, DT, "legt", 64, theta=1.0)
    assert result.times.shape == (1000,)
    torch.testing.assert_close(result.times[[0, -1]], torch.tensor([2.0005, 2.9995], dtype=torch.float64))
    torch.testing.assert_close(result.target, noise[-1000:])
    assert error(result) < 1e-3  # measured 1.9e-4
    assert error(hippo_reconstruct(noise, DT, "legt", 64, method="zoh")) < 1e-4  # measured 1.1e-5
    small = hippo_reconstruct(noise, DT, "legt", 16, theta=1.0)
    assert error(small) > 2 * error(result)  # measured 9.0e-4
    half = hippo_reconstruct(noise, DT, "legt", 64, theta=0.5)
    assert half.times.shape == (500,) and error(half) < 1e-3


def test_fout_reconstructs_the_window(noise):
    # The window's Fourier series meets its end-point jump at the midpoint, which limits the error.
    result = hippo_reconstruct(noise, DT, "fout", 64, theta=1.0)
    assert result.times.shape == (1000,)
    assert error(result) < 0.05  # measured 2.9e-2
    assert error(hippo_reconstruct(noise, DT, "fout", 16, theta=1.0)) > 2 * error(result)  # measured 8.6e-2


# --------------------------------------------------------------------------------------------------
# Batches and bad input
# --------------------------------------------------------------------------------------------------
def test_batch_rows_match_single_runs():
    u = band_limited_noise(0.4, DT, 5.0, seed=3, batch=2)
    for measure in ("legs", "legt", "fout"):
        both = hippo_reconstruct(u, DT, measure, 8, theta=0.2)
        for i in range(2):
            one = hippo_reconstruct(u[i], DT, measure, 8, theta=0.2)
            torch.testing.assert_close(both.states[i], one.states)
            torch.testing.assert_close(both.reconstruction[i], one.reconstruction)


def test_lti_states_follow_the_discretised_recurrence():
    """hippo_states against the recurrence written out with discretize_dense's bilinear matrices."""
    A, B = hippo("legt", 5, theta=0.1)
    u = torch.randn(7, dtype=torch.float64)
    eye = torch.eye(5, dtype=torch.float64)
    A_bar = torch.linalg.solve(eye - DT / 2 * A, eye + DT / 2 * A)
    B_bar = torch.linalg.solve(eye - DT / 2 * A, DT * B)
    x, want = torch.zeros(5, dtype=torch.float64), []
    for u_k in u:
        x = A_bar @ x + B_bar * u_k
        want.append(x)
    torch.testing.assert_close(hippo_states(u, A, B, DT), torch.stack(want))


def test_bad_arguments():
    u = torch.randn(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="measure must be one of"):
        hippo_reconstruct(u, DT, "chebyshev", 4)
    with pytest.raises(ValueError, match="method must be one of"):
        hippo_reconstruct(u, DT, "legs", 4, method="euler")
    with pytest.raises(ValueError, match=r"u must be \(T,\) or \(batch, T\) with T >= 1; got \(2, 2, 10\)"):
        hippo_reconstruct(u.reshape(1, 1, 10).expand(2, 2, 10), DT, "legs", 4)
    with pytest.raises(ValueError, match="dt must be a number > 0; got 0"):
        hippo_reconstruct(u, 0, "legs", 4)
    with pytest.raises(ValueError, match="theta must be a number > 0"):
        hippo_reconstruct(u, DT, "legt", 4, theta=-1.0)
    with pytest.raises(ValueError, match=r"A must be \(N, N\) and B \(N,\); got A \(3, 3\), B \(4,\)"):
        hippo_states(u, torch.eye(3), torch.ones(4), DT)
