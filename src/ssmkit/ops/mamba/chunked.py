"""Selective scan in pure PyTorch, chunked over time, with a hand-written backward: no compiler needed.

Same equations and glossary as :mod:`.reference` (Mamba, Gu & Dao 2023, Eq. (2) and Algorithm 2). The time
axis is cut into chunks of ``chunk_size`` steps. Per chunk the discretised operands

    Abar_t = exp(Delta_t A)            Bbar_t u_t = Delta_t u_t B_t               (chunk, batch, dim, N)

are formed by one vectorised call each, the recurrence ``h_t = Abar_t h_{t-1} + Bbar_t u_t`` runs as one
fused ``addcmul`` per step on contiguous (batch, dim, N) slices (the reference's own arithmetic, so the
result is exact to float rounding; no cumulative products or log-space tricks that overflow for large
Delta), and the readout ``y_t = <C_t, h_t>`` is one batched matrix product per chunk.

Autograd would keep every step's state, O(batch * dim * L * N) memory (and on CPU, that much freshly
faulted-in memory per call). Instead the recurrence is a ``torch.autograd.Function`` that stores only the
state at each chunk start and, in the backward, walks the chunks from last to first: it recomputes the
chunk's states from its checkpoint, runs the adjoint recurrence

    mu_t = C_t dy_t + Abar_{t+1} mu_{t+1}        (mu_t = d loss / d h_t; mu_L includes d loss / d h_L)

as one ``addcmul`` per step, and forms every gradient from the chunk's tensors in bulk:
dC_t = sum_d dy_t h_t,  dA = sum_t E_t Delta_t,  dDelta_t = sum_n E_t A + u_t <mu_t, B_t>,
du_t = Delta_t <mu_t, B_t>,  dB_t = sum_d mu_t Delta_t u_t,  dh_0 = Abar_1 mu_1,  with E_t = mu_t h_{t-1} Abar_t.
So no (batch, dim, L, N) tensor exists in forward or backward; the largest temporaries are a few
(chunk, batch, dim, N) buffers, reused from chunk to chunk. The elementwise parts around the recurrence
(delta_bias, softplus, D, the silu(z) gate) are ordinary autograd operations on (batch, dim, L) tensors.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .._precision import compute_dtype
from .args import check_scan_args

#: steps per chunk: long enough to amortise the per-chunk calls, short enough that the
#: (chunk, batch, dim, N) buffers stay cache-sized
DEFAULT_CHUNK_SIZE = 32


def _flush_enabled() -> bool:
    """Whether denormals are flushed to zero on this thread now (probed: torch has no getter)."""
    tiny = torch.tensor([1e-30], dtype=torch.float32)
    return bool((tiny * 1e-15).item() == 0.0)


@contextlib.contextmanager
def flush_denormals():
    """Flush denormal floats to zero (CPU) inside the block, restoring the caller's setting afterwards.

    Decaying states (exp(Delta A) < 1 applied for many steps) reach denormal magnitudes, which the CPU
    handles many times slower than normal floats (a ~6x slowdown of a whole scan was measured). Flushing
    them changes results only below ~1e-38 (float32) / 1e-308 (float64).
    """
    previously = _flush_enabled()
    if not previously:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not previously:
            torch.set_flush_denormal(False)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(T, batch, dim, ...) -> (T * batch * groups, dim // groups, ...): one matrix per group and step."""
    T, batch, dim = x.shape[:3]
    return x.reshape(T * batch * groups, dim // groups, *x.shape[3:])


def _column(bc: torch.Tensor) -> torch.Tensor:
    """(T, batch, groups, N) -> (T * batch * groups, N, 1) as a transposed view of rows: the strided
    operand makes BLAS take its fast matrix-vector path (2x faster than a contiguous column here)."""
    return bc.reshape(-1, 1, bc.shape[-1]).transpose(1, 2)


def _buffers(count: int, chunk: int, batch: int, dim: int, d_state: int, like: torch.Tensor):
    """``count`` work buffers of (chunk + 1, batch, dim, N), allocated once per call and reused by every chunk."""
    return [like.new_empty(chunk + 1, batch, dim, d_state) for _ in range(count)]


def _recompute_chunk(h_start, delta_c, delta_u_c, A, B_c, A_bar, operand, states):
    """Fill A_bar[:T], operand[:T] (Bbar u) and states[0..T] (states[0] = h_start) for one chunk.

    delta_c, delta_u_c: (T, batch, dim); B_c: (T, batch, groups, N); buffers: (>= T + 1, batch, dim, N).
    """
    T, batch, dim = delta_c.shape
    groups, d_state = B_c.shape[2], B_c.shape[3]
    A_bar = A_bar[:T]
    torch.mul(delta_c[..., None], A, out=A_bar)
    A_bar.exp_()
    operand = operand[:T]
    torch.mul(delta_u_c.view(T, batch, groups, dim // groups, 1), B_c.view(T, batch, groups, 1, d_state),
              out=operand.view(T, batch, groups, dim // groups, d_state))
    states[0].copy_(h_start)
    for t in range(T):  # h_t = Abar_t h_{t-1} + Bbar_t u_t, (batch, dim, N)
        torch.addcmul(operand[t], A_bar[t], states[t], out=states[t + 1])


class _ChunkedRecurrence(torch.autograd.Function):
    """(Delta, u, A, B, C, h0) in time-major layout -> (y (L, batch, dim), h_L (batch, dim, N))."""

    @staticmethod
    def forward(ctx, delta_tm, u_tm, A, B_tm, C_tm, h0, chunk):
        ctx.set_materialize_grads(False)
        length, batch, dim = delta_tm.shape
        d_state = A.shape[1]
        groups_c = C_tm.shape[2]
        T = min(chunk, length)
        delta_u_tm = delta_tm * u_tm
        A_bar, operand, states = _buffers(3, T, batch, dim, d_state, delta_tm)
        starts = range(0, length, T)
        checkpoints = delta_tm.new_empty(len(starts), batch, dim, d_state)
        y_tm = delta_tm.new_empty(length, batch, dim)
        h = h0 if h0 is not None else delta_tm.new_zeros(batch, dim, d_state)
        with flush_denormals() if delta_tm.device.type == "cpu" else contextlib.nullcontext():
            for index, start in enumerate(starts):
                stop = min(start + T, length)
                steps = stop - start
                checkpoints[index].copy_(h)
                _recompute_chunk(h, delta_tm[start:stop], delta_u_tm[start:stop], A, B_tm[start:stop],
                                 A_bar, operand, states)
                # y_t = <C_t, h_t>, one matrix-vector product per (step, batch, group)
                torch.bmm(_grouped(states[1:steps + 1], groups_c), _column(C_tm[start:stop]),
                          out=y_tm[start:stop].view(steps * batch * groups_c, dim // groups_c, 1))
                h = states[steps].clone()
        ctx.save_for_backward(delta_tm, u_tm, A, B_tm, C_tm, checkpoints)
        ctx.chunk = T
        ctx.has_h0 = h0 is not None
        return y_tm, h

    @staticmethod
    def backward(ctx, grad_y_tm, grad_last):
        delta_tm, u_tm, A, B_tm, C_tm, checkpoints = ctx.saved_tensors
        T = ctx.chunk
        length, batch, dim = delta_tm.shape
        d_state = A.shape[1]
        groups_b, groups_c = B_tm.shape[2], C_tm.shape[2]
        delta_u_tm = delta_tm * u_tm
        A_bar, work, states, exponent_grad = _buffers(4, T, batch, dim, d_state, delta_tm)
        if grad_y_tm is not None:
            grad_y_tm = grad_y_tm.contiguous()
        grad_delta = torch.empty_like(delta_tm)
        grad_u = torch.empty_like(u_tm)
        grad_A = torch.zeros_like(A)
        grad_B = torch.empty_like(B_tm)
        grad_C = torch.empty_like(C_tm)
        # d loss / d h at the end of the chunk being processed, from the steps after it
        carry = grad_last if grad_last is not None else delta_tm.new_zeros(batch, dim, d_state)
        starts = list(range(0, length, T))
        with flush_denormals() if delta_tm.device.type == "cpu" else contextlib.nullcontext():
            for index in reversed(range(len(starts))):
                start = starts[index]
                stop = min(start + T, length)
                steps = stop - start
                delta_c, delta_u_c, u_c = delta_tm[start:stop], delta_u_tm[start:stop], u_tm[start:stop]
                B_c, C_c = B_tm[start:stop], C_tm[start:stop]
                _recompute_chunk(checkpoints[index], delta_c, delta_u_c, A, B_c, A_bar, work, states)
                h_prev, h_now = states[:steps], states[1:steps + 1]
                mu = work[:steps]  # d loss / d h_t, built in place over the no longer needed Bbar u
                if grad_y_tm is not None:
                    gy_c = grad_y_tm[start:stop]
                    torch.mul(gy_c.reshape(steps, batch, groups_c, dim // groups_c, 1),
                              C_c.view(steps, batch, groups_c, 1, d_state),
                              out=mu.view(steps, batch, groups_c, dim // groups_c, d_state))
                    # dC_t = sum over the group's channels of dy_t h_t
                    torch.bmm(gy_c.reshape(steps * batch * groups_c, 1, dim // groups_c), _grouped(h_now, groups_c),
                              out=grad_C[start:stop].view(steps * batch * groups_c, 1, d_state))
                else:
                    mu.zero_()
                    grad_C[start:stop].zero_()
                mu[steps - 1].add_(carry)
                for t in range(steps - 2, -1, -1):  # mu_t = C_t dy_t + Abar_{t+1} mu_{t+1}
                    mu[t].addcmul_(A_bar[t + 1], mu[t + 1])
                carry = A_bar[0] * mu[0]  # d loss / d h before the chunk
                # E_t = d loss / d(Delta_t A) = mu_t h_{t-1} Abar_t
                E = exponent_grad[:steps]
                torch.mul(mu, h_prev, out=E)
                E.mul_(A_bar[:steps])
                scratch = states[:steps]  # the states are no longer needed
                torch.mul(E, delta_c[..., None], out=scratch)
                grad_A.add_(scratch.sum((0, 1)))
                mu_dot_B = torch.bmm(_grouped(mu, groups_b), _column(B_c)).view(steps, batch, dim)
                torch.mul(delta_c, mu_dot_B, out=grad_u[start:stop])
                torch.sum(E.mul_(A), -1, out=grad_delta[start:stop])  # sum_n E_t A
                grad_delta[start:stop].addcmul_(u_c, mu_dot_B)
                # dB_t = sum over the group's channels of mu_t Delta_t u_t
                torch.bmm(delta_u_c.reshape(steps * batch * groups_b, 1, dim // groups_b), _grouped(mu, groups_b),
                          out=grad_B[start:stop].view(steps * batch * groups_b, 1, d_state))
        grad_h0 = carry if ctx.has_h0 else None
        return grad_delta, grad_u, grad_A, grad_B, grad_C, grad_h0, None


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Selective scan, chunked over time, differentiable (checkpointed backward, see the module docstring).

    Arguments and returns as :func:`ssmkit.ops.mamba.selective_scan_ref`; ``chunk_size`` (>= 1)
    sets the number of time steps whose operands are formed together (and between stored states).
    """
    args = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
    dtype_in = u.dtype
    work = compute_dtype(dtype_in)
    u_w, delta, A = u.to(work), delta.to(work), A.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # time-major, contiguous: (L, batch, dim) and (L, batch, groups, N), so that a step is one contiguous slice
    delta_tm = delta.permute(2, 0, 1).contiguous()
    u_tm = u_w.permute(2, 0, 1).contiguous()
    B_tm = args.B.to(work).permute(3, 0, 1, 2).contiguous()
    C_tm = args.C.to(work).permute(3, 0, 1, 2).contiguous()
    h0 = initial_state.to(work).contiguous() if initial_state is not None else None
    y_tm, last = _ChunkedRecurrence.apply(delta_tm, u_tm, A.contiguous(), B_tm, C_tm, h0, chunk_size)
    y = y_tm.permute(1, 2, 0)  # (batch, dim, L)
    if D is not None:
        y = y + D.to(work)[:, None] * u_w
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y  # the state in the compute dtype, as the reference
