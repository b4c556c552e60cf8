"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236).

With a feature map phi, softmax(q k^T) is replaced by phi(q) phi(k)^T, so causal attention becomes a
recurrence with a state of fixed size (paper eqs. (16)-(20)):

    S_t = S_{t-1} + phi(k_t) v_t^T        z_t = z_{t-1} + phi(k_t)
    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)          (normalize=True)
    y_t = phi(q_t)^T S_t                                    (normalize=False)

Three forms compute the same numbers:

* :func:`linear_attention_ref`, the specification: a plain loop over time;
* :func:`linear_attention_step`, the recurrent form: one token, for decoding;
* :func:`linear_attention_chunked`, the parallel form: the sequence is cut into chunks of T tokens; inside a
  chunk the masked quadratic form (phi(Q) phi(K)^T, lower triangle including the diagonal) times V, plus the
  contribution of the state entering the chunk, phi(Q) S_c; the states S_c are prefix sums over chunks of
  phi(K_c)^T V_c. The denominators are the same products with v replaced by 1. Cost O(L T d) + O(L dk dv)
  instead of O(L^2 d); no tensor of size (L, dk, dv) is formed.

The functions take the features already mapped (``q`` is phi(q), ``k`` is phi(k)); :func:`feature_map`
applies one of the maps the layer offers. With ``normalize`` the features should be non-negative ("elu",
"relu"): with "identity" the denominator phi(q)^T z can cancel to zero or turn negative.

Glossary (code name -> paper symbol):
    q, k        phi(Q_i), phi(K_j): the mapped queries and keys, (batch, heads, L, dk)
    v           V_j, (batch, heads, L, dv)
    S           S_i = sum_{j<=i} phi(K_j) V_j^T, (batch, heads, dk, dv)
    z           Z_i = sum_{j<=i} phi(K_j), (batch, heads, dk)
    eps         a small constant added to the denominator (keeps it away from zero)
    T           chunk_size
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._checks import check_choice, check_positive_int, check_same_device, check_shape, check_tensor
from ._precision import compute_dtype

FEATURE_MAPS = ("elu", "relu", "identity")
DEFAULT_EPS = 1e-6
LinearAttentionState = Tuple[torch.Tensor, torch.Tensor]  # (S (batch, heads, dk, dv), z (batch, heads, dk))


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """phi(x), elementwise: "elu" = elu(x) + 1 (positive; the paper's choice, eq. (11)), "relu", "identity"."""
    check_choice("feature_map", kind, FEATURE_MAPS)
    if kind == "elu":
        return F.elu(x) + 1
    if kind == "relu":
        return F.relu(x)
    return x


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0; got {eps!r}")
    return float(eps)


def _check_state(state, batch: int, heads: int, dk: int, dv: int, dtype_of: torch.Tensor) -> None:
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"initial_state must be a pair (S, z); got {type(state).__name__}")
    S, z = state
    check_tensor("S", S)
    check_shape("S", S, (batch, heads, dk, dv), f"(batch={batch}, heads={heads}, dk={dk}, dv={dv})")
    check_tensor("z", z)
    check_shape("z", z, (batch, heads, dk), f"(batch={batch}, heads={heads}, dk={dk})")
    check_same_device({"q": dtype_of, "S": S, "z": z})


def check_linear_attention_inputs(q, k, v, initial_state=None, eps=DEFAULT_EPS, chunk_size=None):
    """Validate the arguments of the sequence forms; return ``(batch, heads, L, dk, dv)``."""
    check_tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, heads, L, dk); got {tuple(q.shape)}")
    batch, heads, length, dk = q.shape
    if length < 1:
        raise ValueError(f"q must have L >= 1; got {tuple(q.shape)}")
    check_tensor("k", k)
    check_shape("k", k, tuple(q.shape), f"q's shape {tuple(q.shape)}")
    check_tensor("v", v)
    if v.dim() != 4 or tuple(v.shape[:3]) != (batch, heads, length):
        raise ValueError(f"v must be (batch={batch}, heads={heads}, L={length}, dv); got {tuple(v.shape)}")
    dv = v.shape[3]
    for name, value in (("k", k), ("v", v)):
        if value.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}); got {value.dtype}")
    check_same_device({"q": q, "k": k, "v": v})
    if initial_state is not None:
        _check_state(initial_state, batch, heads, dk, dv, q)
    _check_eps(eps)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    return batch, heads, length, dk, dv


def check_step_inputs(q, k, v, state, eps=DEFAULT_EPS):
    """Validate the arguments of :func:`linear_attention_step`; return ``(batch, heads, dk, dv)``."""
    check_tensor("q", q)
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, heads, dk); got {tuple(q.shape)}")
    batch, heads, dk = q.shape
    check_tensor("k", k)
    check_shape("k", k, tuple(q.shape), f"q's shape {tuple(q.shape)}")
    check_tensor("v", v)
    if v.dim() != 3 or tuple(v.shape[:2]) != (batch, heads):
        raise ValueError(f"v must be (batch={batch}, heads={heads}, dv); got {tuple(v.shape)}")
    _check_state(state, batch, heads, dk, v.shape[2], q)
    check_same_device({"q": q, "k": k, "v": v})
    _check_eps(eps)
    return batch, heads, dk, v.shape[2]


def _zero_state(batch, heads, dk, dv, dtype, device) -> LinearAttentionState:
    return (torch.zeros(batch, heads, dk, dv, dtype=dtype, device=device),
            torch.zeros(batch, heads, dk, dtype=dtype, device=device))


# --------------------------------------------------------------------------------------------------
# The specification
# --------------------------------------------------------------------------------------------------
def linear_attention_ref(q, k, v, normalize: bool = True, eps: float = DEFAULT_EPS,
                         initial_state: Optional[LinearAttentionState] = None, return_final_state: bool = False):
    """Sequential-loop causal linear attention (the specification of the other forms).

    Args:
        q, k: (batch, heads, L, dk), the mapped features phi(q), phi(k).
        v: (batch, heads, L, dv).
        normalize: divide by phi(q_t)^T z_t + eps.
        eps: added to the denominator.
        initial_state: (S (batch, heads, dk, dv), z (batch, heads, dk)) before the first token; zeros if None.
        return_final_state: also return (S, z) after the last token.

    Returns:
        y (batch, heads, L, dv) in q's dtype, or ``(y, (S, z))`` with the state in the compute dtype
        (float32, or float64 for float64 inputs).
    """
    batch, heads, length, dk, dv = check_linear_attention_inputs(q, k, v, initial_state, eps)
    ctype = compute_dtype(q.dtype)
    if initial_state is None:
        S, z = _zero_state(batch, heads, dk, dv, ctype, q.device)
    else:
        S, z = (s.to(ctype) for s in initial_state)
    ys = []
    for q_t, k_t, v_t in zip(q.to(ctype).unbind(2), k.to(ctype).unbind(2), v.to(ctype).unbind(2)):
        S = S + k_t[..., :, None] * v_t[..., None, :]                  # (batch, heads, dk, dv)
        z = z + k_t
        y_t = torch.einsum("bhk,bhkv->bhv", q_t, S)
        if normalize:
            y_t = y_t / ((q_t * z).sum(-1, keepdim=True) + eps)
        ys.append(y_t)
    y = torch.stack(ys, dim=2).to(q.dtype)
    return (y, (S, z)) if return_final_state else y


# --------------------------------------------------------------------------------------------------
# The recurrent form
# --------------------------------------------------------------------------------------------------
def linear_attention_step(q, k, v, state: LinearAttentionState, normalize: bool = True,
                          eps: float = DEFAULT_EPS):
    """One token of the recurrence (paper eq. (18)-(20)).

    Args:
        q, k: (batch, heads, dk), the mapped features of this token.
        v: (batch, heads, dv).
        state: (S (batch, heads, dk, dv), z (batch, heads, dk)) before this token.

    Returns:
        y (batch, heads, dv) in q's dtype, and the new state (S, z) in the compute dtype.
    """
    check_step_inputs(q, k, v, state, eps)
    ctype = compute_dtype(q.dtype)
    S, z = (s.to(ctype) for s in state)
    qc, kc, vc = q.to(ctype), k.to(ctype), v.to(ctype)
    S = S + kc[..., :, None] * vc[..., None, :]
    z = z + kc
    y = (qc[..., None, :] @ S).squeeze(-2)                             # (batch, heads, dv)
    if normalize:
        y = y / ((qc * z).sum(-1, keepdim=True) + eps)
    return y.to(q.dtype), (S, z)


# --------------------------------------------------------------------------------------------------
# The chunked parallel form
# --------------------------------------------------------------------------------------------------
def linear_attention_chunked(q, k, v, normalize: bool = True, eps: float = DEFAULT_EPS, chunk_size: int = 64,
                             initial_state: Optional[LinearAttentionState] = None,
                             return_final_state: bool = False):
    """Chunked causal linear attention; arguments and results as :func:`linear_attention_ref`, plus
    ``chunk_size`` (T). Any L: the sequence is padded to a multiple of T with zero features, which add
    nothing to S or z, so the final state is exact; padded outputs are dropped.
    """
    batch, heads, length, dk, dv = check_linear_attention_inputs(q, k, v, initial_state, eps, chunk_size)
    ctype = compute_dtype(q.dtype)
    T = min(chunk_size, length)
    chunks = -(-length // T)
    extra = chunks * T - length

    def to_chunks(t):                                                  # (b, h, L, d) -> (b, h, c, T, d)
        t = F.pad(t.to(ctype), (0, 0, 0, extra)) if extra else t.to(ctype)
        return t.reshape(batch, heads, chunks, T, t.shape[-1])

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    if initial_state is None:
        S0, z0 = _zero_state(batch, heads, dk, dv, ctype, q.device)
    else:
        S0, z0 = (s.to(ctype) for s in initial_state)

    # States entering each chunk: S0 plus the exclusive prefix sum of the chunks' own contributions.
    chunk_S = kc.transpose(-1, -2) @ vc                                # (b, h, c, dk, dv)
    chunk_z = kc.sum(dim=3)                                            # (b, h, c, dk)
    total_S, total_z = chunk_S.cumsum(dim=2), chunk_z.cumsum(dim=2)
    S_in = S0[:, :, None] + F.pad(total_S[:, :, :-1], (0, 0, 0, 0, 1, 0))
    z_in = z0[:, :, None] + F.pad(total_z[:, :, :-1], (0, 0, 1, 0))

    # Inside a chunk: the masked quadratic form, the diagonal included (S_t already holds token t).
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)     # (b, h, c, T, T)
    y = qc @ S_in + scores @ vc                                        # (b, h, c, T, dv)
    if normalize:
        denominator = (qc @ z_in[..., None]).squeeze(-1) + scores.sum(-1)  # (b, h, c, T)
        y = y / (denominator[..., None] + eps)
    y = y.reshape(batch, heads, chunks * T, dv)[:, :, :length].to(q.dtype)
    if not return_final_state:
        return y
    return y, (S0 + total_S[:, :, -1], z0 + total_z[:, :, -1])
