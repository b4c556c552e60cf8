"""S4's diagonal plus low-rank (DPLR) state space kernel, in pure PyTorch (Gu, Goel, Re, ICLR 2022,
"Efficiently Modeling Long Sequences with Structured State Spaces", Sec. 3.2-3.3 and Algorithm 1).

Each of H channels is a single-input single-output SSM whose A is diagonal plus low rank (S4 eq. 6):

    x' = A x + b u,   y = c^T x,   A = diag(lambda) - sum_r p_r q_r^*

Conjugate symmetry. A real system of size N has its modes in conjugate pairs, so only M = N / 2 of them are
stored (``Lambda``, ``P``, ``Q``, ``B``, ``C`` below) and the other half is their complex conjugate:

    lambda = [Lambda, conj Lambda],  p_r = [P_r, conj P_r],  q_r = [Q_r, conj Q_r],  b = [B, conj B],  c = [C, conj C]

Everything here works on these N complex modes explicitly (every sum over modes runs over both halves), never
on "2 Re of the kept half" alone: the low-rank term p q^* couples each mode to its conjugate, so the kept half
is not closed under complex-linear maps. The same system in real coordinates z = [Re x_1..M, Im x_1..M]
(x_{M+m} = conj x_m) is a real N x N system, :func:`dplr_real_system`; the recurrent form, the state and the
naive reference use that basis (:func:`discretize_dplr`).

Kernel (Algorithm 1). With the bilinear rule dA = (I - dt/2 A)^{-1} (I + dt/2 A), dB = (I - dt/2 A)^{-1} dt b,
the kernel K_k = c^T dA^k dB (k < L) has, at the L roots of unity omega = exp(-2 pi i m / L), the truncated
generating function

    K^(omega) = sum_{k<L} K_k omega^k = c~^T (I - omega dA)^{-1} dB = 2/(1+omega) c~^T (g(omega) - A)^{-1} b,
    c~ = (I - dA^L)^T c,   g(omega) = (2/dt) (1 - omega)/(1 + omega) = (2i/dt) tan(pi m / L),

so ``c~`` makes the inverse FFT return exactly the first L terms. The resolvent of a DPLR matrix is a
diagonal one corrected by the Woodbury identity, R = diag(1 / (g - lambda)):

    c~^T (g - A)^{-1} b = k00 - k01 (I + k11)^{-1} k10,   k_xy = sum_n x_n y_n / (g - lambda_n)  (Cauchy sums)

with x in {c~, conj q}, y in {b, p}. Only the frequencies of the real FFT (m = 0 .. L // 2) are evaluated;
at omega = -1 (m = L / 2, L even) g is infinite and the limit K^(-1) = dt/2 c~^T b is used instead.

Glossary (code name: paper symbol):

==========  ============================================================================================
``H``       channels (d_model)
``N``       real state size per channel; ``M`` = N / 2 complex modes stored
``r``       rank of the low-rank correction (1 for HiPPO-LegS)
``Lambda``  Lambda, (H, M) complex: the diagonal part
``P, Q``    P, Q, (r, H, M) complex: A = Lambda - P Q^* (Q = P unless given: S4 ties them)
``B, C``    B, C, (..., H, M) complex; extra leading dimensions give several kernels at once
``dt``      Delta, (H,) positive step
``dA, dB``  \\bar A, \\bar B: the bilinear discretisation, here in the real basis (H, N, N), (..., H, N)
``C~``      \\tilde C = C (I - \\bar A^L), the truncated output vector of Algorithm 1
``g``       the points where the resolvent is evaluated: the bilinear image of the roots of unity
==========  ============================================================================================

The specification of the fast path is plain powering, :func:`ssmkit.ops.lti_kernels.kernel_ref` on the
dense real system of :func:`discretize_dplr`; :func:`cauchy_ref` is the specification of :func:`cauchy`.

Memory. The Cauchy sums are evaluated in blocks of frequencies (:func:`cauchy`), forward and backward, so no
(H, N, L) tensor exists; the largest tensors are a few (rows, H, L/2) complex arrays, the size of the output.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .._checks import check_positive_int, check_tensor
from .discretize import discretize_dense
from .lti_kernels import block_split

__all__ = [
    "cauchy_ref",
    "cauchy",
    "dplr_real_system",
    "discretize_dplr",
    "DiscreteDPLR",
    "kernel_dplr",
    "dplr_state_input",
    "final_state_dense",
    "complex_to_real",
    "real_to_complex",
    "output_to_real",
]

#: default number of complex entries in one (lead, chunk, N) block of the Cauchy sums
BLOCK_ELEMENTS = 1 << 18


# ------------------------------------------------------------------------------------------------------
# Cauchy sums
# ------------------------------------------------------------------------------------------------------
def cauchy_ref(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """r_l = sum_n v_n / (z_l - w_n), all at once (the specification of :func:`cauchy`).

    Args:
        v: (..., N) weights.  z: (..., L) evaluation points.  w: (..., N) nodes. Leading dims broadcast.

    Returns:
        (..., L). Memory: the whole (..., L, N) matrix of 1 / (z_l - w_n).
    """
    return (v[..., None, :] / (z[..., :, None] - w[..., None, :])).sum(-1)


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, *, chunk: Optional[int] = None) -> torch.Tensor:
    """r_l = sum_n v_n / (z_l - w_n), evaluated ``chunk`` points at a time, forward and backward.

    The points z and nodes w are shared by every row of v, so each block forms 1 / (z_l - w_n) once,
    (lead, chunk, N), and contracts it with all rows of v in one matrix product. The backward pass (a custom
    autograd function) recomputes the blocks instead of storing them.

    Args:
        v: (..., *lead, N) complex: any number of rows in front of the dimensions shared with z and w.
        z: (*lead, L) complex points.  w: (*lead, N) complex nodes; z and w broadcast against each other.
        chunk: points per block; default: as many as keep one block within ``BLOCK_ELEMENTS`` entries.

    Returns:
        (..., *lead, L) complex, like :func:`cauchy_ref` (the same broadcasting).
    """
    for name, value in (("v", v), ("z", z), ("w", w)):
        check_tensor(name, value, complex_ok=True)
        if not value.is_complex():
            raise TypeError(f"{name} must be a complex tensor; got dtype {value.dtype}")
        if value.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension; got a scalar")
    if not v.dtype == z.dtype == w.dtype:
        raise TypeError(f"v, z and w must share one complex dtype; got {v.dtype}, {z.dtype}, {w.dtype}")
    if v.shape[-1] != w.shape[-1]:
        raise ValueError(f"v must be (..., N={w.shape[-1]}) to match the nodes w; got {tuple(v.shape)}")
    if chunk is not None:
        check_positive_int("chunk", chunk)
    return _Cauchy.apply(v, z, w, chunk)


def _cauchy_layout(v, z, w, chunk):
    """Broadcast to v (R, G, N) rows, z (G, L), w (G, N) with G = prod(lead); the output shape; the chunk."""
    lead_zw = torch.broadcast_shapes(z.shape[:-1], w.shape[:-1])
    full = torch.broadcast_shapes(v.shape[:-1], lead_zw)
    n_rows_dims = len(full) - len(lead_zw)
    lead = full[n_rows_dims:]
    N, L = w.shape[-1], z.shape[-1]
    G = 1
    for s in lead:
        G *= s
    rows = 1
    for s in full[:n_rows_dims]:
        rows *= s
    v3 = v.expand(*full, N).reshape(rows, G, N)
    z2 = z.expand(*lead, L).reshape(G, L)
    w2 = w.expand(*lead, N).reshape(G, N)
    if chunk is None:
        chunk = max(1, BLOCK_ELEMENTS // max(1, G * N))
    return v3, z2, w2, full, chunk


def _split(t: torch.Tensor):
    """Contiguous real and imaginary parts of a complex tensor."""
    return t.real.contiguous(), t.imag.contiguous()


def _inverse_differences(zr, zi, wr, wi, start: int, stop: int):
    """(Re, Im) of c_ln = 1 / (z_l - w_n) for l in [start, stop), each (G, chunk, N) real.

    Computed as (dr - i di) / (dr^2 + di^2) on contiguous real tensors: PyTorch's complex elementwise
    subtraction and reciprocal are not vectorised on CPUs and took most of the kernel's time. The nodes w
    (Re w < 0) never meet the points z (on the unit circle's image, Re z >= 0), so the plain formula needs
    none of the overflow guards of a general complex division.
    """
    dr = zr[:, start:stop, None] - wr[:, None, :]
    di = zi[:, start:stop, None] - wi[:, None, :]
    scale = (dr * dr).add_(di * di).reciprocal_()
    return dr.mul_(scale), di.mul_(scale).neg_()


class _Cauchy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, z, w, chunk):
        v3, z2, w2, full, chunk = _cauchy_layout(v, z, w, chunk)
        ctx.save_for_backward(v, z, w)
        ctx.chunk = chunk
        vr, vi = _split(v3.permute(1, 2, 0))  # (G, N, R)
        zr, zi = _split(z2)
        wr, wi = _split(w2)
        L = z2.shape[-1]
        out = torch.empty(z2.shape[0], L, v3.shape[0], 2, dtype=vr.dtype, device=v.device)  # (G, L, R, re/im)
        for start in range(0, L, chunk):
            cr, ci = _inverse_differences(zr, zi, wr, wi, start, min(L, start + chunk))  # (G, chunk, N)
            # (cr + i ci) @ (vr + i vi) as four real products (real BLAS is far faster than complex here)
            out[:, start : start + chunk, :, 0] = cr @ vr - ci @ vi
            out[:, start : start + chunk, :, 1] = cr @ vi + ci @ vr
        return torch.view_as_complex(out).permute(2, 0, 1).reshape(*full, L)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        # PyTorch's complex convention: for holomorphic r(x), grad_x = sum conj(dr/dx) * grad_r.
        # dr_l/dv_n = c_ln, dr_l/dz_l = -sum_n v_n c_ln^2, dr_l/dw_n = v_n c_ln^2, with c_ln = 1/(z_l - w_n).
        v, z, w = ctx.saved_tensors
        v3, z2, w2, full, chunk = _cauchy_layout(v, z, w, ctx.chunk)
        need_v, need_z, need_w, _ = ctx.needs_input_grad
        G, L = z2.shape
        R, N = v3.shape[0], w2.shape[-1]
        g = grad.reshape(R, G, L).permute(1, 2, 0)  # (G, L, R)
        vt = v3.permute(1, 2, 0)  # (G, N, R)
        gv = torch.zeros(G, N, R, dtype=v.dtype, device=v.device) if need_v else None
        gw = torch.zeros(G, N, R, dtype=v.dtype, device=v.device) if need_w else None
        gz = torch.empty(G, L, dtype=v.dtype, device=v.device) if need_z else None
        zr, zi = _split(z2)
        wr, wi = _split(w2)
        for start in range(0, L, chunk):
            stop = min(L, start + chunk)
            c = torch.complex(*_inverse_differences(zr, zi, wr, wi, start, stop))  # (G, chunk, N)
            gb = g[:, start:stop]  # (G, chunk, R)
            if need_v:
                gv += c.conj().transpose(1, 2) @ gb
            if need_z or need_w:
                c2 = c * c
                if need_z:
                    gz[:, start:stop] = -(gb * (c2 @ vt).conj()).sum(-1)
                if need_w:
                    gw += c2.conj().transpose(1, 2) @ gb
        grads = [None, None, None, None]
        if need_v:
            grads[0] = gv.permute(2, 0, 1).reshape(*full, N).sum_to_size(v.shape)
        lead = full[len(full) - len(torch.broadcast_shapes(z.shape[:-1], w.shape[:-1])) :]
        if need_z:
            grads[1] = gz.reshape(*lead, L).sum_to_size(z.shape)
        if need_w:
            gw = (gw * vt.conj()).sum(-1)  # sum over rows of conj(v_n) sum_l g_l conj(c_ln^2)
            grads[2] = gw.reshape(*lead, N).sum_to_size(w.shape)
        return tuple(grads)


# ------------------------------------------------------------------------------------------------------
# The DPLR system in real coordinates
# ------------------------------------------------------------------------------------------------------
def complex_to_real(x: torch.Tensor) -> torch.Tensor:
    """Half-basis vector (..., M) of a conjugate-symmetric system -> real coordinates (..., 2M) = [Re, Im].

    Used for input vectors (B) and states: x_full = [x, conj x] has real coordinates [Re x, Im x]."""
    return torch.cat([x.real, x.imag], -1)


def real_to_complex(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`complex_to_real`: (..., 2M) real -> (..., M) complex."""
    M = z.shape[-1] // 2
    return torch.complex(z[..., :M], z[..., M:])


def output_to_real(C: torch.Tensor) -> torch.Tensor:
    """Output vector (..., M) complex -> (..., 2M) real with c^T x_full = output_to_real(C) . z,
    i.e. 2 Re(C . x) = [2 Re C, -2 Im C] . [Re x, Im x]."""
    return 2 * torch.cat([C.real, -C.imag], -1)


def _check_modes(Lambda, P, Q, **vectors):
    check_tensor("Lambda", Lambda, complex_ok=True)
    if not Lambda.is_complex() or Lambda.dim() != 2:
        raise ValueError(f"Lambda must be a complex (H, M) tensor; got {Lambda.dtype} {tuple(Lambda.shape)}")
    H, M = Lambda.shape
    for name, value in (("P", P), ("Q", Q)):
        if value is None:
            continue
        check_tensor(name, value, complex_ok=True)
        if value.dtype != Lambda.dtype or value.dim() != 3 or tuple(value.shape[1:]) != (H, M):
            raise ValueError(f"{name} must be a {Lambda.dtype} (rank, H={H}, M={M}) tensor; "
                             f"got {value.dtype} {tuple(value.shape)}")
    if Q is not None and Q.shape != P.shape:
        raise ValueError(f"Q must have the shape of P {tuple(P.shape)}; got {tuple(Q.shape)}")
    for name, value in vectors.items():
        check_tensor(name, value, complex_ok=True)
        if value.dtype != Lambda.dtype or value.dim() < 2 or tuple(value.shape[-2:]) != (H, M):
            raise ValueError(f"{name} must be a {Lambda.dtype} (..., H={H}, M={M}) tensor; "
                             f"got {value.dtype} {tuple(value.shape)}")
    return H, M


def _check_dt(dt, Lambda):
    check_tensor("dt", dt)
    H = Lambda.shape[0]
    if tuple(dt.shape) != (H,) or dt.dtype != Lambda.real.dtype:
        raise ValueError(f"dt must be a {Lambda.real.dtype} (H={H},) tensor; got {dt.dtype} {tuple(dt.shape)}")


def dplr_real_system(Lambda: torch.Tensor, P: torch.Tensor, Q: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The continuous A of the conjugate-symmetric DPLR system in real coordinates.

    With x_full = [x, conj x] and z = [Re x, Im x]: diag(lambda) becomes the rotation-scaling blocks
    [[Re Lambda, -Im Lambda], [Im Lambda, Re Lambda]], and p_r q_r^* becomes [Re P_r; Im P_r] [2 Re Q_r; 2 Im Q_r]^T.

    Args:
        Lambda: (H, M) complex.  P: (r, H, M) complex.  Q: like P, or None for Q = P.

    Returns:
        A (H, N, N) real, N = 2M, similar to diag(lambda) - sum_r p_r q_r^* over the N complex modes.
    """
    _check_modes(Lambda, P, Q)
    Q = P if Q is None else Q
    re, im = torch.diag_embed(Lambda.real), torch.diag_embed(Lambda.imag)
    A = torch.cat([torch.cat([re, -im], -1), torch.cat([im, re], -1)], -2)  # (H, N, N)
    left = complex_to_real(P)  # (r, H, N)
    right = 2 * complex_to_real(Q)
    return A - torch.einsum("rhi,rhj->hij", left, right)


class DiscreteDPLR(NamedTuple):
    """The bilinear discretisation of a DPLR system in real coordinates: h_k = dA h_{k-1} + dB u_k,
    y_k = C h_k (the real basis of :func:`dplr_real_system`)."""

    dA: torch.Tensor  # (H, N, N)
    dB: torch.Tensor  # (H, N)
    C: torch.Tensor  # (..., H, N)


def discretize_dplr(Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor,
                    Q: Optional[torch.Tensor] = None) -> DiscreteDPLR:
    """Dense discrete matrices of the DPLR system for the recurrent step (bilinear rule, S4 eq. 3).

    Args:
        Lambda: (H, M) complex.  P, Q: (r, H, M) complex (Q = P if None).  B: (H, M) complex.
        C: (..., H, M) complex.  dt: (H,) real.

    Returns:
        :class:`DiscreteDPLR` (dA (H, N, N), dB (H, N), C (..., H, N)), all real, N = 2M; the kernel of
        this system, C dA^k dB, is what :func:`kernel_dplr` computes.
    """
    H, M = _check_modes(Lambda, P, Q, B=B, C=C)
    if B.dim() != 2:
        raise ValueError(f"B must be (H={H}, M={M}) for the recurrent matrices; got {tuple(B.shape)}")
    _check_dt(dt, Lambda)
    A = dplr_real_system(Lambda, P, Q)
    dA, dB = discretize_dense(A, complex_to_real(B), dt, "bilinear")
    return DiscreteDPLR(dA, dB, output_to_real(C))


# ------------------------------------------------------------------------------------------------------
# The kernel
# ------------------------------------------------------------------------------------------------------
def kernel_dplr(Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor,
                L: int, *, Q: Optional[torch.Tensor] = None, chunk: Optional[int] = None) -> torch.Tensor:
    """S4 convolution kernel K_k = C dA^k dB, k < L, by Algorithm 1 (truncated generating function at the
    roots of unity, Cauchy sums, Woodbury identity, inverse real FFT); see the module docstring.

    Args:
        Lambda: (H, M) complex diagonal part.  P: (r, H, M) complex low-rank part; Q likewise (None: Q = P).
        B: (..., H, M) complex input vectors.  C: (..., H, M) complex output vectors; the leading dims of B
            and C broadcast, so B (S, H, M) gives S kernels (e.g. the input's, and the free responses of S - 1
            initial states from :func:`dplr_state_input`) and C (2, H, M) two (both directions).
        dt: (H,) real step.  L: kernel length >= 1.
        chunk: frequencies per block of the Cauchy sums (memory, not the result; default from
            ``BLOCK_ELEMENTS``).

    Returns:
        K (..., H, L) real, in the real dtype of Lambda. Each kernel is that of the real system with the
        conjugate halves included (the module docstring), equal to ``kernel_ref(*discretize_dplr(...), L)``.
    """
    H, M = _check_modes(Lambda, P, Q, B=B, C=C)
    _check_dt(dt, Lambda)
    check_positive_int("L", L)
    Q = P if Q is None else Q
    r = P.shape[0]
    real = Lambda.real.dtype

    # C~ = C (I - dA^L), computed in the real basis, where it is a row vector times a real matrix
    A = dplr_real_system(Lambda, P, Q)
    dA, _ = discretize_dense(A, A.new_zeros(H, 2 * M), dt, "bilinear")  # dA does not depend on B
    C_real = output_to_real(C)
    C_real = C_real - (C_real[..., None, :] @ torch.linalg.matrix_power(dA, L))[..., 0, :]
    C_tilde = (C_real[..., :M] - 1j * C_real[..., M:]) / 2  # inverse of output_to_real

    def full(x):  # the N complex modes: the kept half and its conjugate
        return torch.cat([x, x.conj()], -1)

    nodes = full(Lambda)  # (H, N)
    Cf, Bf, Pf, Qf_conj = full(C_tilde), full(B), full(P), full(Q).conj()

    # frequencies m = 0 .. L//2 of the real FFT, without omega = -1 (m = L/2 for even L: handled below)
    n_freq = L // 2 + 1
    m = torch.arange(n_freq - (1 - L % 2), dtype=real, device=Lambda.device)
    tan = torch.tan(torch.pi * m / L)  # (1 - omega) / (1 + omega) = i tan(pi m / L)
    g = (2 / dt)[:, None] * torch.complex(torch.zeros_like(tan), tan)  # (H, F)

    # All Cauchy sums share points g and nodes lambda: stack their weight rows and contract once.
    SB = torch.broadcast_shapes(B.shape[:-2], C.shape[:-2])
    Sb, Sc = B.shape[:-2], C.shape[:-2]
    rows00 = (Cf * Bf).reshape(-1, H, 2 * M)  # c~ b
    rows01 = (Cf[..., None, :, :] * Pf).reshape(-1, H, 2 * M)  # c~ p_r
    rows10 = (Qf_conj * Bf[..., None, :, :]).reshape(-1, H, 2 * M)  # conj(q_r) b
    rows11 = (Qf_conj[:, None] * Pf[None, :]).reshape(-1, H, 2 * M)  # conj(q_r) p_s
    sizes = [rows00.shape[0], rows01.shape[0], rows10.shape[0], rows11.shape[0]]
    k = cauchy(torch.cat([rows00, rows01, rows10, rows11]), g, nodes, chunk=chunk)
    k00, k01, k10, k11 = k.split(sizes)
    # resolvent sums carry 1/(g - lambda); cauchy computes sum v / (z - w) with z = g, w = lambda: same sign
    k00 = k00.reshape(*SB, H, -1)
    k01 = k01.reshape(*Sc, r, H, -1)
    k10 = k10.reshape(*Sb, r, H, -1)
    k11 = k11.reshape(r, r, H, -1)
    if r == 1:
        resolvent = k00 - k01[..., 0, :, :] * k10[..., 0, :, :] / (1 + k11[0, 0])
    else:
        eye = torch.eye(r, dtype=k11.dtype, device=k11.device)
        X = torch.linalg.solve(eye + k11.permute(2, 3, 0, 1), k10.movedim(-3, -1)[..., None])[..., 0]  # (..., H, F, r)
        resolvent = k00 - (k01.movedim(-3, -1) * X).sum(-1)
    K_hat = resolvent * torch.complex(torch.ones_like(tan), tan)  # 2 / (1 + omega) = 1 + i tan(pi m / L)
    if L % 2 == 0:
        # omega = -1: (I + dA)^{-1} dB = dt b / 2 for any A
        K_hat = torch.cat([K_hat, ((dt / 2) * (Cf * Bf).sum(-1))[..., None]], -1)
    return torch.fft.irfft(K_hat, n=L)


def dplr_state_input(Lambda: torch.Tensor, P: torch.Tensor, h0: torch.Tensor, dt: torch.Tensor,
                     Q: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The input vector whose kernel is the free response of an initial state: C dA^{k+1} h0, k < L.

    With b' = (I + dt/2 A) h0 / dt the bilinear dB' = (I - dt/2 A)^{-1} (I + dt/2 A) h0 = dA h0, so
    ``kernel_dplr(..., B=dplr_state_input(...))`` gives y_k's share of the state held before u_0.

    Args:
        Lambda: (H, M) complex.  P, Q: (r, H, M).  h0: (..., H, N) real state (real coordinates of
            :func:`dplr_real_system`).  dt: (H,) real.

    Returns:
        (..., H, M) complex, to pass as (rows of) ``B`` to :func:`kernel_dplr`.
    """
    H, M = _check_modes(Lambda, P, Q)
    _check_dt(dt, Lambda)
    check_tensor("h0", h0)
    if h0.dim() < 2 or tuple(h0.shape[-2:]) != (H, 2 * M):
        raise ValueError(f"h0 must be (..., H={H}, N={2 * M}); got {tuple(h0.shape)}")
    A = dplr_real_system(Lambda, P, Q)
    w = h0 + (dt / 2)[:, None] * (A @ h0[..., None])[..., 0]
    return real_to_complex(w / dt[:, None])


# ------------------------------------------------------------------------------------------------------
# The final state of a dense LTI system
# ------------------------------------------------------------------------------------------------------
def final_state_dense(dA: torch.Tensor, dB: torch.Tensor, u: torch.Tensor, h0: Optional[torch.Tensor] = None, *,
                      block: Optional[int] = None) -> torch.Tensor:
    """State after the last input of h_k = dA h_{k-1} + dB u_k: h_{L-1} = dA^L h0 + sum_j dA^{L-1-j} dB u_j.

    Two levels, as in :func:`ssmkit.ops.lti_kernels.final_state`: with L-1-j = cT + i, the within-block
    vectors dA^i dB (i < T, built by doubling) are contracted with the time-reversed input cut into blocks
    of T, and the ceil(L/T) block sums are combined by Horner's rule with dA^T. Nothing of size (batch, H,
    N, L) is formed; the sequential part has ceil(L/T) steps.

    Args:
        dA: (H, N, N) real.  dB: (H, N) real.  u: (batch, H, L) real.  h0: (batch, H, N) or None (zeros).
        block: T (default ceil(sqrt(L))).

    Returns:
        (batch, H, N).
    """
    check_tensor("dA", dA)
    check_tensor("u", u)
    if dA.dim() != 3 or dA.shape[-1] != dA.shape[-2]:
        raise ValueError(f"dA must be (H, N, N); got {tuple(dA.shape)}")
    H, N, _ = dA.shape
    if tuple(dB.shape) != (H, N):
        raise ValueError(f"dB must be (H={H}, N={N}); got {tuple(dB.shape)}")
    if u.dim() != 3 or u.shape[1] != H:
        raise ValueError(f"u must be (batch, H={H}, L); got {tuple(u.shape)}")
    batch, _, L = u.shape
    T, n_blocks = block_split(L, block)
    within = dB[:, None, :]  # (H, 2^j, N): rows dA^i dB
    power = dA  # dA^(rows so far)
    while within.shape[1] < T:
        within = torch.cat([within, within @ power.transpose(-1, -2)], 1)
        power = power @ power
    within = within[:, :T]
    rev = F.pad(u.flip(-1), (0, n_blocks * T - L)).reshape(batch, H, n_blocks, T)  # rev_{cT+i} = u_{L-1-cT-i}
    sums = (rev @ within).unbind(-2)  # n_blocks of (batch, H, N): sum_i u_{L-1-cT-i} dA^i dB
    step = torch.linalg.matrix_power(dA, T).transpose(-1, -2)
    h = sums[-1]
    for s in reversed(sums[:-1]):
        h = (h[..., None, :] @ step)[..., 0, :] + s
    if h0 is not None:
        if tuple(h0.shape) != (batch, H, N):
            raise ValueError(f"h0 must be (batch={batch}, H={H}, N={N}); got {tuple(h0.shape)}")
        h = h + (h0[..., None, :] @ torch.linalg.matrix_power(dA, L).transpose(-1, -2))[..., 0, :]
    return h
