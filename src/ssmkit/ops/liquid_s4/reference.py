"""The specification of Liquid-S4's core: the liquid (input-dependent) diagonal SSM, one token at a time.

Hasani, Lechner, Wang, Chahine, Amini, Rus 2023, "Liquid Structural State-Space Models" (ICLR 2023,
arXiv 2209.12951), Sec. 3. The linearised liquid time-constant (LTC) system

    x'(t) = [A + B u(t)] x(t) + B u(t),        y(t) = C x(t)

discretised (Abar, Bbar) and unrolled, gives the S4 convolution plus terms in products of inputs:

    x_k = (Abar + Bbar u_k) x_{k-1} + Bbar u_k
    y   = Kbar * u + Kbar_liquid * u_correlations

where the order-q correlation terms carry Bbar^q (q = 2..p, p the *liquid degree*). Both of the paper's
kernels are implemented, each with an exact recurrent form:

* ``"kb"``: Kbar_liquid^(q)_j = C Abar^j Bbar^q, so every correlation signal drives the same modes:

      h_k = Abar h_{k-1} + Bbar u_k + sum_{q=2..p} Bbar^q c^(q)_k,      s_k = 2 Re(C . h_k) + D u_k

* ``"polyb"`` (the PB kernel: the powers of Abar of the liquid kernel dropped, only the polynomial in B
  kept; the authors found it faster and as good or better): the correlation terms enter the output directly,

      h_k = Abar h_{k-1} + Bbar u_k,      s_k = 2 Re(C . h_k) + D u_k + sum_{q=2..p} 2 Re(C . Bbar^q) c^(q)_k

with the order-q correlation of the input taken over the last q inputs,

      c^(q)_k = u_k u_{k-1} ... u_{k-q+1}     (inputs before the first one are those kept in ``history``, else 0).

Per channel the system is diagonal with N2 complex modes, each standing for itself and its conjugate (as in
S4D, whose parameters the layer reuses), so Bbar^q is the elementwise power of the modal Bbar and
2 Re(.) sums each mode with its conjugate.

How this differs from the authors' code (raminmh/liquid-s4, ``S4.forward``), which computes the same two
kernels on top of the DPLR S4 kernel: (1) there the correlation signal is reversed in time before it is
used, so an output reads inputs from the end of the sequence; here it is not, so the layer stays causal and
has the recurrence above; (2) there, by default ("allcombs"), the order-q signal is made of products over
index combinations chosen near the end of the sequence, and otherwise by repeated shifting of the previous
order (u_k u_{k-1}^2 u_{k-2} at q = 3); here it is the product of the last q distinct inputs; (3) there the
liquid Bbar is the diagonal part of the DPLR discretisation; here the whole system is diagonal.

Glossary (code name: paper symbol):

===============  =============================================================================
``u``            u, the input (batch, H, L) or one step (batch, H)
``dtA``          log Abar (H, N2) complex; ``Abar`` = exp(dtA)
``Bbar``, ``C``  Bbar, C (H, N2) complex
``D``            D (H,), skip term
``degree``       p, the liquid degree (order of the highest input correlation), >= 1 (1: plain S4D)
``kernel``       "kb" (Kbar times B^q) or "polyb" (polynomial in B, the PB kernel)
``h``            the complex modal state x (batch, H, N2)
``history``      the last p - 1 inputs (batch, H, p - 1), oldest first: what c^(q) needs from the past
``c^(q)``        the order-q input correlation u_k ... u_{k-q+1}
===============  =============================================================================
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._checks import check_choice, check_positive_int, check_tensor

LIQUID_KERNELS = ("kb", "polyb")


def check_liquid_args(u: torch.Tensor, dtA: torch.Tensor, Bbar: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                      degree: int, kernel: str, h: Optional[torch.Tensor], history: Optional[torch.Tensor],
                      time: bool) -> Tuple[int, int]:
    """Validate the arguments of every Liquid-S4 function; returns (H, N2). ``time``: u is (batch, H, L)."""
    check_positive_int("degree", degree)
    check_choice("kernel", kernel, LIQUID_KERNELS)
    check_tensor("u", u)
    if u.dim() != (3 if time else 2):
        raise ValueError(f"u must be {'(batch, H, L)' if time else '(batch, H)'}; got {tuple(u.shape)}")
    if time and u.shape[-1] == 0:
        raise ValueError(f"u must hold at least one time step; got shape {tuple(u.shape)}")
    check_tensor("dtA", dtA, complex_ok=True)
    if not dtA.is_complex() or dtA.dim() != 2:
        raise ValueError(f"dtA must be a complex (H, N2) tensor; got {dtA.dtype} {tuple(dtA.shape)}")
    H, N2 = dtA.shape
    if u.shape[1] != H:
        raise ValueError(f"u must have H={H} channels (dim 1) to match dtA; got {tuple(u.shape)}")
    if u.dtype != dtA.real.dtype:
        raise TypeError(f"u must have dtype {dtA.real.dtype} to match dtA ({dtA.dtype}); got {u.dtype}")
    for name, value in (("Bbar", Bbar), ("C", C)):
        check_tensor(name, value, complex_ok=True)
        if value.dtype != dtA.dtype or tuple(value.shape) != (H, N2):
            raise ValueError(f"{name} must be {dtA.dtype} (H={H}, N2={N2}); got {value.dtype} {tuple(value.shape)}")
    check_tensor("D", D)
    if tuple(D.shape) != (H,) or D.dtype != u.dtype:
        raise ValueError(f"D must be {u.dtype} (H={H},); got {D.dtype} {tuple(D.shape)}")
    batch = u.shape[0]
    if h is not None:
        check_tensor("h", h, complex_ok=True)
        if tuple(h.shape) != (batch, H, N2) or h.dtype != dtA.dtype:
            raise ValueError(f"h must be {dtA.dtype} (batch={batch}, H={H}, N2={N2}); got {h.dtype} {tuple(h.shape)}")
    if history is not None:
        check_tensor("history", history)
        if tuple(history.shape) != (batch, H, degree - 1) or history.dtype != u.dtype:
            raise ValueError(f"history must be {u.dtype} (batch={batch}, H={H}, degree - 1={degree - 1}); "
                             f"got {history.dtype} {tuple(history.shape)}")
    return H, N2


def liquid_s4_step(u_t: torch.Tensor, h: Optional[torch.Tensor], history: Optional[torch.Tensor],
                   dtA: torch.Tensor, Bbar: torch.Tensor, C: torch.Tensor, D: torch.Tensor, degree: int,
                   kernel: str = "polyb") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the liquid recurrence (module docstring).

    Args:
        u_t: (batch, H) real.  h: (batch, H, N2) complex or None (zeros).
        history: (batch, H, degree - 1) the previous inputs, oldest first, or None (zeros).
        dtA, Bbar, C: (H, N2) complex.  D: (H,) real.  degree: p.  kernel: "kb" or "polyb".

    Returns:
        s_t (batch, H), the new h (batch, H, N2) and the new history (batch, H, degree - 1).
    """
    check_liquid_args(u_t, dtA, Bbar, C, D, degree, kernel, h, history, time=False)
    if history is None:
        history = u_t.new_zeros(u_t.shape[0], u_t.shape[1], degree - 1)
    drive = Bbar * u_t[..., None]                                            # (B, H, N2)
    liquid_out = torch.zeros_like(u_t)
    correlation = u_t
    for q in range(2, degree + 1):
        correlation = correlation * history[..., degree - q]                # u_k ... u_{k-q+1}
        Bq = Bbar ** q
        if kernel == "kb":
            drive = drive + Bq * correlation[..., None]
        else:
            liquid_out = liquid_out + 2 * (C * Bq).sum(-1).real * correlation
    h_new = drive if h is None else torch.exp(dtA) * h + drive
    s_t = 2 * (C * h_new).sum(-1).real + D * u_t + liquid_out
    new_history = torch.cat([history, u_t[..., None]], -1)[..., 1:]  # drop the oldest
    return s_t, h_new, new_history


def liquid_s4_ref(u: torch.Tensor, dtA: torch.Tensor, Bbar: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                  degree: int, kernel: str = "polyb", h0: Optional[torch.Tensor] = None,
                  history: Optional[torch.Tensor] = None):
    """The liquid recurrence over a sequence by a loop of :func:`liquid_s4_step`.

    Args:
        u: (batch, H, L) real, any layout.  Others as :func:`liquid_s4_step` (h0: the state before u[..., 0]).

    Returns:
        (s (batch, H, L), final h (batch, H, N2), final history (batch, H, degree - 1)).
    """
    check_liquid_args(u, dtA, Bbar, C, D, degree, kernel, h0, history, time=True)
    h, outputs = h0, []
    for t in range(u.shape[-1]):
        s_t, h, history = liquid_s4_step(u[..., t], h, history, dtA, Bbar, C, D, degree, kernel)
        outputs.append(s_t)
    return torch.stack(outputs, -1), h, history
