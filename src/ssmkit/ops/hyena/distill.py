"""Modal fitting of long filters (Massaroli et al. 2023, "Laughing Hyena Distillery", Sec. 3.2-3.3): each filter
h (lags 0 .. L-1) is replaced by a diagonal SSM of n modes, h_t ~ Re(sum_k R_k lambda_k^t), whose recurrence
z_t = lambda z_{t-1} + u_t, y_t = Re(R . z_t) runs in constant memory per token.

Poles by the matrix-pencil method (Hua & Sarkar 1990; a Hankel/shift-invariance fit of the kind the paper's
Hankel-based distillation uses): the dominant n-dimensional right singular subspace V of the Hankel matrix
H_{ij} = h_{i+j} is shift-invariant for a sum of n exponentials, V[1:] = V[:-1] M, and the eigenvalues of M
are the poles. Poles outside the unit disc are pulled to radius ``max_radius`` (a stable filter). Residues
then by least squares on the impulse response: min_R ||Vandermonde(lambda) R - h||_2.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..._checks import check_positive_int, check_tensor

__all__ = ["fit_modal"]


def fit_modal(h: torch.Tensor, n_modes: int, max_radius: float = 0.9999
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit ``n_modes`` complex poles and residues to each real filter.

    Args:
        h: (channels, L) real filters, lags 0 .. L-1 (L >= 2 n_modes + 1). Fitted in float64.
        n_modes: n, complex modes per filter (a real filter's modes come in conjugate pairs, so an even n
            is the natural choice).
        max_radius: largest pole modulus kept (< 1 for a stable recurrence).

    Returns:
        poles (channels, n) complex128, residues (channels, n) complex128, and the relative L2 error
        ||h - h_fit|| / ||h|| per channel (channels,) float64.
    """
    check_tensor("h", h)
    check_positive_int("n_modes", n_modes)
    if h.dim() != 2:
        raise ValueError(f"h must be (channels, L); got {tuple(h.shape)}")
    L = h.shape[-1]
    if L < 2 * n_modes + 1:
        raise ValueError(f"h must be at least 2 n_modes + 1 = {2 * n_modes + 1} long to fit {n_modes} modes; "
                         f"got L={L}")
    device = h.device
    h = h.detach().to("cpu", torch.float64)  # a small fit: on the CPU, where lstsq has the SVD driver
    # columns of the Hankel matrix (rows L - pencil): any n <= pencil <= L - n identifies n exact modes; a
    # capped pencil keeps the SVD at O(L pencil^2) for filters thousands of taps long
    pencil = min(L // 2, max(4 * n_modes, 64))
    idx = torch.arange(L - pencil)[:, None] + torch.arange(pencil + 1)[None, :]
    hankel = h[:, idx]  # (channels, L - pencil, pencil + 1)
    _, _, Vh = torch.linalg.svd(hankel, full_matrices=False)
    V = Vh[:, :n_modes].transpose(-1, -2)  # (channels, pencil + 1, n): dominant right singular vectors
    M = torch.linalg.lstsq(V[:, :-1], V[:, 1:], driver="gelsd").solution  # V[1:] = V[:-1] M
    poles = torch.linalg.eigvals(M)  # (channels, n)
    radius = poles.abs()
    poles = torch.where(radius > max_radius, poles / radius * max_radius, poles)
    t = torch.arange(L, dtype=torch.float64)
    vander = torch.exp(torch.log(poles)[:, None, :] * t[:, None])  # (channels, L, n)
    # h real: solve over the real and imaginary parts of R at once (Re(V R) = Re V Re R - Im V Im R)
    real_system = torch.cat([vander.real, -vander.imag], -1)  # (channels, L, 2n)
    # a conjugate pair makes these columns dependent: the SVD driver (gelsd) takes the minimum-norm solution,
    # the default QR driver (gelsy) was seen to return a wrong one here
    sol = torch.linalg.lstsq(real_system, h[..., None], driver="gelsd").solution[..., 0]
    residues = torch.complex(sol[:, :n_modes], sol[:, n_modes:])
    fitted = (real_system @ sol[..., None])[..., 0]
    error = (fitted - h).norm(dim=-1) / h.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    return poles.to(device), residues.to(device), error.to(device)
