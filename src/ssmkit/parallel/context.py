"""Context (sequence) parallelism by passing recurrent states from rank to rank.

A mixer with a constant-size state (the contract of :mod:`ssmkit.layers.base`: ``forward`` takes an initial
state, returns the final state, and gradients flow through both) computes a slice of a sequence exactly as
it would inside the whole sequence, once it starts from the state in which the previous slice ended. So
the R ranks of a *context group* each hold one contiguous slice of every sequence (rank r: positions
``sequence_bounds(L, R, r)``) and only states travel between them, never activations of the whole sequence:

    y[slice r], s_r = layer(x[slice r], s_{r-1})          s_{-1} = None (the zero state of a fresh sequence)

The state of a layer is everything its ``state_spec`` lists: for Mamba the SSM state (d_inner, N) and the
short convolution's last d_conv - 1 inputs; for Mamba-2 (nheads, headdim, N) and its conv state. It is
packed into one flat buffer per layer and sent with point-to-point ``send``/``recv`` on the group.

Order of communication (the sequential scheme; no deadlock with blocking sends)
------------------------------------------------------------------------------
Forward, on every rank, layers in order l = 0 .. n_layers - 1:

    recv s^l_{r-1} from rank r-1   ->   run layer l on the slice   ->   send s^l_r to rank r+1

Rank 0 never waits, rank r waits only for rank r-1 *on the same layer*, so the layers form a pipeline over
the ranks (rank 0 runs layer l + 1 while rank 1 runs layer l): the forward takes (n_layers + R - 1) slice-
layer times instead of n_layers, an idle fraction of (R - 1) / (n_layers + R - 1).

Backward (autograd), layers in reverse order:

    recv dLoss/ds^l_r from rank r+1   ->   backprop layer l   ->   send dLoss/ds^l_{r-1} to rank r-1

The two autograd functions below put these messages where the autograd engine must meet them in that order:
``_SendState`` passes the layer's *output* h through (identity), so its backward (the receive of the state
gradient) runs only once the gradient of h is complete, i.e. after every later layer has been backpropagated;
``_ReceiveState`` passes the layer's *input* through, so its backward (the send) runs only once the layer's
backward is complete. Every rank therefore receives layer l's gradient before it sends layer l - 1's, and the
last rank, which receives nothing, starts the chain.

Every rank of a context group must call ``backward`` on a loss that depends on its slice's output (the
trainer's per-rank loss always does), else the ranks before it wait forever.

The two-pass scheme
-------------------
For a layer whose state update is affine in the state given its inputs, s_r = M_r s_{r-1} + c_r, the ranks
could instead (1) run their slices from a zero SSM state, giving c_r, and the transitions M_r, (2) combine
the R pairs (an all-gather and an R-step prefix product) and (3) re-run (or correct) their slices from the
true incoming states. For Mamba M_r = exp(A * sum_t Delta_t) per (channel, state) and for Mamba-2
exp(A_h * sum_t Delta_t) per head; the conv state is not affine in that sense but needs no combination (it
is the last d_conv - 1 inputs of the previous slice, a halo exchange). The mixer contract exposes neither
M_r nor a cheap correction of the outputs, so through the contract step (3) is a second full forward of the
mixer: see docs/parallel.md for when that pays (it does not for models with more layers than ranks) and
why ssmkit implements the sequential pipeline only.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

State = Dict[str, torch.Tensor]


def sequence_bounds(length: int, size: int, rank: int) -> Tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous slice of a sequence of ``length`` split over ``size``
    ranks: the first ``length % size`` ranks hold one position more than the others."""
    if isinstance(length, bool) or not isinstance(length, int) or length < size:
        raise ValueError(f"length must be an int >= the context size {size} (each rank needs at least one "
                         f"position); got {length!r}")
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}); got {rank}")
    base, extra = divmod(length, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_context_parallel(model) -> None:
    """Raise ValueError unless every layer of ``model`` (an SSMModel) can run context-parallel: a recurrent
    mixer with a constant-size state, no bidirectional layers, no classifier pooling over the whole sequence
    and no mixture-of-experts (its load-balancing loss is not a sum over positions)."""
    config = model.config
    if config.bidirectional:
        raise ValueError("context parallelism needs causal layers; this model is bidirectional "
                         "(its layers read the future): use parallel.context=1")
    if config.head == "classifier":
        raise ValueError("context parallelism needs per-position outputs; head='classifier' pools over the whole "
                         "sequence: use parallel.context=1")
    if "moe" in config.layer_mlps():
        raise ValueError("context parallelism does not support mlp='moe': the load-balancing loss is not a sum "
                         "over positions, so per-slice losses would not add up to the whole sequence's")
    for index, layer in enumerate(model.backbone.layers):
        mixer = layer.mixer
        if mixer is None:
            raise ValueError(f"layer {index} is an MLP-only layer (mixer 'none'); context parallelism does not pass "
                             "through such layers yet: use parallel.context=1")
        try:
            spec = mixer.state_spec(1)
        except NotImplementedError:
            raise ValueError(f"layer {index} ({mixer.name}) has no recurrent state, so it cannot continue a "
                             "sequence from another rank's state") from None
        growing = [key for key, (shape, kind) in spec.items() if None in shape or kind == "index"]
        if growing:
            raise ValueError(
                f"layer {index} ({mixer.name}) keeps a state that grows with the sequence ({growing}); context "
                "parallelism passes constant-size states only and ring attention is not implemented: use "
                "parallel.context=1 or a model without such layers")


# --------------------------------------------------------------------------------------------------
# Point-to-point messages wrapped for autograd
# --------------------------------------------------------------------------------------------------
class _ReceiveState(torch.autograd.Function):
    """Forward: h -> (h, state received from the previous rank). Backward: send the state's gradient back."""

    @staticmethod
    def forward(ctx, h, link, numel, dtype):
        ctx.link, ctx.numel, ctx.dtype = link, numel, dtype
        flat = torch.empty(numel, dtype=dtype, device=h.device)
        link.recv(flat, link.prev_rank)
        return h.view_as(h), flat

    @staticmethod
    def backward(ctx, grad_h, grad_flat):
        ctx.link.send(grad_flat.contiguous(), ctx.link.prev_rank)
        return grad_h, None, None, None


class _SendState(torch.autograd.Function):
    """Forward: send the packed final state to the next rank, pass h through. Backward: receive the state's
    gradient from the next rank (runs once h's gradient is complete, see the module docstring)."""

    @staticmethod
    def forward(ctx, h, flat, link):
        ctx.link, ctx.numel, ctx.dtype = link, flat.numel(), flat.dtype
        link.send(flat.detach().contiguous(), link.next_rank)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        grad_flat = torch.empty(ctx.numel, dtype=ctx.dtype, device=grad_h.device)
        ctx.link.recv(grad_flat, ctx.link.next_rank)
        return grad_h, grad_flat, None


def _real_view(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def pack_state(state: State, keys: List[str]) -> torch.Tensor:
    """The tensors of ``state`` (complex ones as (re, im) pairs) flattened into one 1-D buffer, in ``keys``
    order; differentiable."""
    return torch.cat([_real_view(state[key]).reshape(-1) for key in keys])


def unpack_state(flat: torch.Tensor, template: State, keys: List[str]) -> State:
    """The inverse of :func:`pack_state`: tensors of ``template``'s shapes and dtypes, views of ``flat``."""
    out: State = {}
    offset = 0
    for key in keys:
        like = template[key]
        shape = tuple(like.shape) + ((2,) if like.is_complex() else ())
        n = 1
        for s in shape:
            n *= s
        piece = flat[offset:offset + n].view(shape)
        out[key] = torch.view_as_complex(piece) if like.is_complex() else piece
        offset += n
    if offset != flat.numel():
        raise ValueError(f"state buffer holds {flat.numel()} numbers but the layer's state needs {offset}")
    return out


# --------------------------------------------------------------------------------------------------
class ContextParallel:
    """This rank's place in a context group, and the hook that :meth:`SSMModel.forward` calls per layer.

        cp = ContextParallel(group)                # a torch.distributed group of R ranks (None: the world)
        ids_r = cp.split(input_ids)                # (B, L) -> (B, L_r), this rank's slice of every row
        out = model(ids_r, context=cp)             # logits of the slice; layers pass states rank to rank
        out = model(ids_r, context=cp, return_state=True)   # out.state: the states after this slice
                                                   # (on the last rank: the whole sequence's final states)

    The group's ranks hold the slices in their group-rank order. ``last_exchanged`` counts the numbers
    (state entries) sent per forward, for reports.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ContextParallel needs an initialised torch.distributed process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        whole = group if group is not None else dist.group.WORLD
        self.prev_rank = dist.get_global_rank(whole, self.rank - 1) if self.rank > 0 else None
        self.next_rank = dist.get_global_rank(whole, self.rank + 1) if self.rank < self.size - 1 else None
        self.last_exchanged = 0

    # -- slicing ---------------------------------------------------------------------------------------
    def bounds(self, length: int) -> Tuple[int, int]:
        return sequence_bounds(length, self.size, self.rank)

    def split(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous slice of ``tensor`` along ``dim`` (the sequence axis)."""
        start, stop = self.bounds(tensor.shape[dim])
        return tensor.narrow(dim, start, stop - start)

    # -- messages ----------------------------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor, dst=dst, group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        dist.recv(tensor, src=src, group=self.group)

    # -- the model hook ----------------------------------------------------------------------------------
    @property
    def sends_state(self) -> bool:
        """Whether the layers must return their final states (all ranks but the last)."""
        return self.next_rank is not None

    def receive(self, layer_index: int, block, h: torch.Tensor) -> Tuple[torch.Tensor, Optional[State]]:
        """Before layer ``layer_index``: (h passed through, the state the previous rank's slice ended in),
        or (h, None) on the first rank (a fresh sequence)."""
        if layer_index == 0:
            self.last_exchanged = 0
        if self.prev_rank is None:
            return h, None
        # the block hands its mixer norm(h), in the norm weight's dtype: the state must match it
        template = block.mixer.init_state(h.shape[0], device=h.device, dtype=block.norm.weight.dtype)
        keys = sorted(template)
        numel = sum(_real_view(template[k]).numel() for k in keys)
        dtype = _real_view(template[keys[0]]).dtype
        h, flat = _ReceiveState.apply(h, self, numel, dtype)
        return h, unpack_state(flat, template, keys)

    def send_state(self, layer_index: int, h: torch.Tensor, state: Optional[State]) -> torch.Tensor:
        """After layer ``layer_index``: send its final state to the next rank (nothing on the last rank);
        returns h passed through."""
        if self.next_rank is None:
            return h
        if state is None:
            raise ValueError(f"layer {layer_index} returned no state to pass to the next rank")
        flat = pack_state(state, sorted(state))
        self.last_exchanged += flat.numel()
        return _SendState.apply(h, flat, self)


def make_context_groups(context_size: int) -> Tuple[int, int, Optional[dist.ProcessGroup]]:
    """Split the world into ``world / context_size`` data-parallel replicas of ``context_size`` consecutive
    ranks each (rank = data_rank * context_size + context_rank, so a context group stays on one host when it
    fits). Every rank must call this, in the same order (``new_group`` is collective).

    Returns ``(data_rank, data_size, context_group)``.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise ValueError(f"parallel.context must be a positive int; got {context_size!r}")
    if world % context_size:
        raise ValueError(f"parallel.context={context_size} must divide the world size {world} "
                         "(world = data-parallel replicas x context ranks)")
    mine = None
    for data_rank in range(world // context_size):
        ranks = list(range(data_rank * context_size, (data_rank + 1) * context_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return rank // context_size, world // context_size, mine
