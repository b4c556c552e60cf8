"""Causal multi-head softmax attention as a mixer: RoPE, grouped-query heads, optional sliding window, and
the KV cache as its state.

    q = x W_q,  k = x W_k,  v = x W_v            (per head; k, v have n_kv_heads heads)
    q, k <- RoPE(q, k) at absolute positions      (Su et al. 2021)
    y_i = softmax(q_i k_j^T * scale over allowed j)  (scale 1 / sqrt(head_dim) unless given) v_j,   out = concat_heads(y) W_o

Allowed keys: every j <= i (causal, Vaswani et al. 2017), or with ``window`` = w only i - w < j <= i
(sliding window, Beltagy et al. 2020 / Mistral). With ``causal=False`` every token attends to every token
(an encoder, as in ViT; Dosovitskiy et al. 2021): it reads the future, so it has no step, state or KV cache,
and it is not a mixer of causal models; the vision classifier (:mod:`ssmkit.models.vision`) builds it. Grouped-query attention (Ainslie et al. 2023): query head h
reads key/value head h // (n_heads / n_kv_heads).

State (the KV cache), keys prefixed "attention.":
    k, v   (batch, n_kv_heads, T, head_dim): keys (already rotated) and values of the cached tokens;
           T grows with the sequence, or stays at most window - 1 with a sliding window (the next token
           attends to itself and the window - 1 before it, so older tokens can never be read again and are
           dropped: memory is constant);
    pos    (batch,) int64: the number of tokens seen so far; RoPE positions of the next tokens start there
           (it differs from T once the window has dropped tokens).

Decoding without a window appends to the cache in place: the cache returned is a view of the first T
entries of a buffer with room to grow (capacity T + max(256, T / 8)), so a step writes one new entry instead
of copying the whole cache. Only the state that last grew a buffer may append to it: stepping twice from the
same state (branching) copies, and so does any call that records gradients. Grouped heads are read through
``scaled_dot_product_attention(enable_gqa=True)`` (torch >= 2.5) instead of being copied H / H_kv times.

Glossary (code name -> symbol): d_model = D; n_heads = H; n_kv_heads = H_kv; head_dim = d_h; window = w.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int
from ..ops.rope import apply_rope
from .base import Mixer, State
from .registry import register_mixer

# scaled_dot_product_attention reads grouped key/value heads itself from torch 2.5 on (enable_gqa)
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
_FILLED = "_ssmkit_cache_filled"  # attribute of a cache buffer: how many entries along dim 2 are in use


@register_mixer("attention")
class Attention(Mixer):
    """Causal multi-head attention with a KV cache (see the module docstring).

    Args:
        d_model: model width D.
        n_heads: query heads H.
        n_kv_heads: key/value heads (grouped-query attention when fewer than n_heads; must divide it);
            None = n_heads.
        head_dim: size of one head; None = d_model // n_heads (then n_heads must divide d_model).
        rope: rotate q and k by their positions (rotary embeddings; head_dim must be even).
        rope_base: theta_i = rope_base^(-2i / rope_dim).
        rope_dim: rotate only the first rope_dim features of each head (partial rotary, GPT-NeoX / Bamba;
            even); the rest pass unrotated. None = head_dim.
        window: sliding window w (each token attends to itself and the w - 1 tokens before it); None = all.
        bias: biases in the four projections.
        out_bias: a bias in the output projection o_proj; None = ``bias`` (RecurrentGemma: q, k, v without,
            o_proj with one).
        softmax_scale: the factor of q k^T in the softmax; None = 1 / sqrt(head_dim) (Zamba2's shared
            attention: 1 / sqrt(head_dim / 2)).
        out_dim: the width o_proj writes; None = d_model. Only a block that uses the attention inside itself
            (the shared block of :mod:`ssmkit.models.blocks`) sets it: a mixer's output is d_model wide.
        causal: False for full (encoder) attention: no step, state or window then.

    Shapes: forward x (batch, L, d_model) -> (batch, L, d_model); step x_t (batch, d_model).
    """

    pattern_letter = "A"
    contract_config = dict(n_heads=2)
    depth_scaled = ("o_proj.weight",)
    constant_state = False  # the KV cache grows with the sequence

    def __init__(self, d_model: int, n_heads: int = 8, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, rope: bool = True, rope_base: float = 10000.0,
                 window: Optional[int] = None, bias: bool = False, causal: bool = True,
                 rope_dim: Optional[int] = None, out_bias: Optional[bool] = None,
                 softmax_scale: Optional[float] = None, out_dim: Optional[int] = None):
        super().__init__(d_model)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
        if not causal and window is not None:
            raise ValueError(f"window needs causal=True (a sliding window of past tokens); got window={window}")
        self.causal = causal
        check_positive_int("n_heads", n_heads)
        if n_kv_heads is None:
            n_kv_heads = n_heads
        check_positive_int("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads must divide n_heads; got n_kv_heads={n_kv_heads}, n_heads={n_heads}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model must be divisible by n_heads when head_dim is not given; "
                                 f"got d_model={d_model}, n_heads={n_heads}")
            head_dim = d_model // n_heads
        check_positive_int("head_dim", head_dim)
        if not isinstance(rope, bool):
            raise TypeError(f"rope must be a bool; got {type(rope).__name__}")
        if rope and head_dim % 2:
            raise ValueError(f"head_dim must be even with rope=True (features are rotated in pairs); "
                             f"got head_dim={head_dim}")
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not rope_base > 1 \
                or not math.isfinite(rope_base):
            raise ValueError(f"rope_base must be a finite number > 1; got {rope_base!r}")
        if window is not None:
            check_positive_int("window", window)
        if rope_dim is not None:
            check_positive_int("rope_dim", rope_dim)
            if rope_dim % 2 or rope_dim > head_dim:
                raise ValueError(f"rope_dim must be even and at most head_dim={head_dim}; got {rope_dim}")
        if out_bias is None:
            out_bias = bias
        if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                          or not (math.isfinite(softmax_scale) and softmax_scale > 0)):
            raise ValueError(f"softmax_scale must be a positive finite number or None; got {softmax_scale!r}")
        self.softmax_scale = None if softmax_scale is None else float(softmax_scale)
        out_dim = d_model if out_dim is None else check_positive_int("out_dim", out_dim)
        if not isinstance(bias, bool) or not isinstance(out_bias, bool):
            raise TypeError(f"bias and out_bias must be bools; got bias={bias!r}, out_bias={out_bias!r}")
        self.rope_dim = head_dim if rope_dim is None else rope_dim
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope, self.rope_base, self.window = rope, float(rope_base), window
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, out_dim, bias=out_bias)

    @property
    def cache_limit(self) -> Optional[int]:
        """Most tokens the KV cache keeps between calls: window - 1, or None (unbounded) without a window."""
        return None if self.window is None else self.window - 1

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, rope={self.rope}, window={self.window}"
                + ("" if self.causal else ", causal=False")
                + (f", rope_dim={self.rope_dim}" if self.rope_dim != self.head_dim else "")
                + (f", softmax_scale={self.softmax_scale}" if self.softmax_scale is not None else "")
                + (f", bias={self.q_proj.bias is not None}, out_bias={self.o_proj.bias is not None}"
                   if (self.q_proj.bias is None) != (self.o_proj.bias is None) else ""))

    def state_spec(self, batch_size: int):
        cache = (batch_size, self.n_kv_heads, None, self.head_dim)
        return {"k": (cache, "cache"), "v": (cache, "cache"), "pos": ((batch_size,), "index")}

    # ----------------------------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, pos, deltas=None):
        """x (B, L, D), pos (B,) or 0 -> q (B, H, L, d_h), k and v (B, H_kv, L, d_h), rotated to pos + 0..L-1.

        ``deltas``: optional (dq, dk, dv) added to the three projections before the heads are split (the
        per-use low-rank adapters of a shared block)."""
        batch, length, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if deltas is not None:
            q, k, v = q + deltas[0], k + deltas[1], v + deltas[2]
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope and self.rope_dim == self.head_dim:
            q = apply_rope(q, pos, self.rope_base)
            k = apply_rope(k, pos, self.rope_base)
        elif self.rope:  # partial rotary: the first rope_dim features turn, the others pass as they are
            r = self.rope_dim
            q = torch.cat([apply_rope(q[..., :r], pos, self.rope_base), q[..., r:]], dim=-1)
            k = torch.cat([apply_rope(k[..., :r], pos, self.rope_base), k[..., r:]], dim=-1)
        return q, k, v

    @staticmethod
    def _append(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """cache (B, H_kv, T, d_h) + new (B, H_kv, L, d_h) -> (B, H_kv, T + L, d_h), in place when it may be.

        In place: ``cache`` is the first T entries of a buffer (its ``_base``) that no other state has grown
        past T, with room for L more, and no gradient is recorded. Otherwise a new buffer with headroom.
        """
        length, new_len = cache.shape[2], new.shape[2]
        if torch.is_grad_enabled() and (cache.requires_grad or new.requires_grad):
            return torch.cat([cache, new], dim=2)  # autograd: a plain, differentiable concatenation
        buf = cache._base
        if (buf is not None and getattr(buf, _FILLED, None) == length and buf.dim() == 4
                and buf.shape[2] >= length + new_len and buf.shape[:2] == cache.shape[:2]
                and buf.shape[3] == cache.shape[3] and buf.stride() == cache.stride()
                and buf.storage_offset() == cache.storage_offset() and buf.dtype == new.dtype):
            buf[:, :, length:length + new_len].copy_(new)
            setattr(buf, _FILLED, length + new_len)
            return buf[:, :, :length + new_len]
        total = length + new_len
        buf = cache.new_empty(cache.shape[0], cache.shape[1], total + max(256, total // 8), cache.shape[3])
        buf[:, :, :length].copy_(cache)
        buf[:, :, length:total].copy_(new)
        setattr(buf, _FILLED, total)
        return buf[:, :, :total]

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, T, d_h) -> (B, H, T, d_h), each kv head serving n_heads / n_kv_heads query heads."""
        if self.n_kv_heads == self.n_heads:
            return t
        batch, _, length, dim = t.shape
        group = self.n_heads // self.n_kv_heads
        return t[:, :, None].expand(batch, self.n_kv_heads, group, length, dim).reshape(
            batch, self.n_heads, length, dim)

    def _mask(self, length: int, cached: int, device) -> Optional[torch.Tensor]:
        """Boolean (L, cached + L) mask, True = may attend; None when no key is masked at all.

        Query i sits at index cached + i of the keys (the offset causal mask), and with a window it reads
        only the keys j with cached + i - window < j.
        """
        if length == 1 and (self.window is None or cached < self.window):
            return None  # one new token sees every cached key: decoding builds no mask
        query_at = torch.arange(length, device=device)[:, None] + cached
        key_at = torch.arange(cached + length, device=device)[None, :]
        allowed = key_at <= query_at
        if self.window is not None:
            allowed = allowed & (key_at > query_at - self.window)
        return allowed

    def _attend(self, q, k, v, padded: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q (B, H, L, d_h); k, v (B, H_kv, T + L, d_h), the last L being q's own tokens -> (B, L, H d_h).

        ``padded`` (B,): how many of the T cached entries of each row are left padding (rows whose history
        is shorter than the cache, after a batch of prompts of different lengths was stacked); they are masked.
        """
        length, cached = q.shape[2], k.shape[2] - q.shape[2]
        gqa = {}
        if self.n_kv_heads != self.n_heads and _SDPA_GQA:
            gqa = {"enable_gqa": True}  # sdpa reads query head h from kv head h // (H / H_kv), as _expand_kv
        else:
            k, v = self._expand_kv(k), self._expand_kv(v)
        opts = dict(gqa, scale=self.softmax_scale)
        if padded is not None and bool((padded > 0).any()):
            mask = self._mask(length, cached, q.device)
            key_at = torch.arange(cached + length, device=q.device)
            real = key_at[None, :] >= padded[:, None]  # (B, T + L)
            full = real[:, None, None, :] if mask is None else real[:, None, None, :] & mask[None, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=full, **opts)
        elif not self.causal:
            y = F.scaled_dot_product_attention(q, k, v, **opts)  # every query reads every key
        elif cached == 0 and self.window is None:
            # plain causal (torch's is_causal is the top-left aligned mask, right only without a cache):
            # let torch pick its fused causal path instead of reading an explicit mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, **opts)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(length, cached, q.device), **opts)
        return y.transpose(1, 2).reshape(q.shape[0], length, self.n_heads * self.head_dim)

    def _trim(self, t: torch.Tensor) -> torch.Tensor:
        limit = self.cache_limit
        if limit is None or t.shape[2] <= limit:
            return t
        return t[:, :, t.shape[2] - limit:]

    def _refuse_recurrence(self, what: str) -> None:
        if not self.causal:
            raise ValueError(f"non-causal Attention (causal=False) reads the whole sequence: {what} is not available")

    def step(self, x_t: torch.Tensor, state: State):
        self._refuse_recurrence("step()")
        return super().step(x_t, state)

    def _forward(self, x: torch.Tensor, state: Optional[State], return_state: bool, deltas=None):
        if state is not None:
            self._refuse_recurrence("an initial state")
        if return_state:
            self._refuse_recurrence("return_state")
        batch, length, _ = x.shape
        pos = None if state is None else state[self.state_key("pos")]
        q, k, v = self._project(x, 0 if pos is None else pos, deltas)
        padded = None
        if state is not None:
            cached = state[self.state_key("k")].shape[2]
            padded = cached - pos.clamp(max=cached)  # rows with a shorter history than the cache is long
            if self.window is None:  # the cache grows: append in place where it may (see _append)
                k = self._append(state[self.state_key("k")], k)
                v = self._append(state[self.state_key("v")], v)
            else:  # a window keeps at most window - 1 entries: a small copy
                k = torch.cat([state[self.state_key("k")], k], dim=2)
                v = torch.cat([state[self.state_key("v")], v], dim=2)
        y = self.o_proj(self._attend(q, k, v, padded))
        if not return_state:
            return y, None
        if pos is None:
            pos = torch.zeros(batch, dtype=torch.int64, device=x.device)
        return y, {self.state_key("k"): self._trim(k), self.state_key("v"): self._trim(v),
                   self.state_key("pos"): pos + length}

    def _step(self, x_t: torch.Tensor, state: State):
        y, new_state = self._forward(x_t[:, None], state, True)
        return y[:, 0], new_state
