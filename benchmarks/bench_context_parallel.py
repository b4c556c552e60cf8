"""Context parallelism at long lengths (issue 18, item 3): time and memory of one training step.

    # one GPU: the longest sequence that fits, and its speed
    python benchmarks/bench_context_parallel.py --lengths 16384 32768 65536 131072 262144 524288 1048576 --out $OUT
    # R GPUs of one host, each holding L / R positions (sequential state passing, ssmkit.parallel.context)
    torchrun --standalone --nproc-per-node 8 benchmarks/bench_context_parallel.py --lengths 131072 262144 524288 1048576 --out $OUT
    # smoke test on a CPU (gloo)
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_context_parallel.py --device cpu --d-model 32 --n-layers 2 --lengths 256 --steps 1

Model: the Mamba 130M shape (d_model 768, 24 layers, no MLP; ``--mixer mamba2`` for Mamba-2 with headdim 64,
N 128) over a 256-symbol vocabulary (a byte LM: a 50k vocabulary would make the logits of 1M positions
alone 200 GB), batch 1, bfloat16 autocast, AdamW. One step = forward + loss + backward + optimiser step
on random tokens (speed does not depend on the data). ``--checkpoint-blocks`` recomputes each block in the
backward pass (only the block inputs are kept; the state exchange stays outside the recomputed part, so no
message is sent twice).

Before timing, with R > 1 ranks, ``--verify L`` checks in float32 at length L that the slices' logits and the
summed gradients equal one device's on the whole sequence (relative 1e-4: these are the GPU kernels, which
the CPU tests do not run).

Reported per length: seconds per step (median of ``--steps`` after one warm-up), tokens/s over the whole
sequence, peak memory per GPU (``torch.cuda.max_memory_allocated``, rank 0 and the maximum over ranks), and
the numbers each rank sends per forward (the states: 24 x (d_inner x (N + d_conv - 1))). Lengths that do
not fit are reported as "OOM" and the longer ones skipped. Writes ``context_parallel-R{ranks}.json`` under
``--out`` (rank 0 only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ssmkit.models import ModelConfig  # noqa: E402
from ssmkit.models.model import SSMModel  # noqa: E402
from ssmkit.parallel import ContextParallel, check_context_parallel  # noqa: E402


class CheckpointedBlock(nn.Module):
    """A block recomputed in the backward pass; ``mixer`` and ``norm`` stay visible for the state exchange."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    @property
    def mixer(self):
        return self.block.mixer

    @property
    def norm(self):
        return self.block.norm

    def forward(self, h, state=None, return_state=False):
        return checkpoint(self.block, h, state, return_state, use_reentrant=False)


def build_model(args, device) -> SSMModel:
    kwargs = {"mamba": {"d_state": 16}, "mamba2": {"d_state": 128, "headdim": 64}}[args.mixer]
    config = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, vocab_size=256, mixer=args.mixer,
                         mixer_kwargs={args.mixer: kwargs})
    model = SSMModel(config).to(device)
    check_context_parallel(model)
    if args.checkpoint_blocks:
        model.backbone.layers = nn.ModuleList(CheckpointedBlock(b) for b in model.backbone.layers)
    return model


def one_length(model, optimizer, length, context, args, device):
    """Median seconds of a training step at ``length`` (this rank holds its slice), or None when out of memory."""
    g = torch.Generator().manual_seed(length)
    tokens = torch.randint(0, 256, (1, length + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if context is not None:
        inputs, targets = context.split(inputs), context.split(targets)
    inputs, targets = inputs.to(device), targets.to(device)
    scale = 1.0 / length  # the slice's share of the mean over the whole sequence

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(inputs, context=context)
            loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") * scale
        loss.backward()
        if context is not None:  # each rank holds the gradient of its slice: sum them (what DDP would do)
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=context.group)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    try:
        for i in range(args.steps + 1):
            if context is not None:
                dist.barrier(group=context.group)
            start = time.perf_counter()
            step()
            if i > 0:
                times.append(time.perf_counter() - start)
        oom = False
    except torch.OutOfMemoryError:
        oom = True
    if context is not None:  # every rank must agree, else the next length's messages would not match
        flag = torch.tensor([float(oom)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=context.group)
        oom = bool(flag.item())
    optimizer.zero_grad(set_to_none=True)
    return None if oom else statistics.median(times)


def verify(model, context, length, device) -> float:
    """Float32 check on this machine's kernels (Triton on GPUs): the slices' logits and the summed gradients
    equal one device running the whole sequence. Returns the largest relative difference (asserted < 1e-4)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, length + 1), generator=g).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_and_grads(ids, tgt, ctx):
        model.zero_grad(set_to_none=True)
        out = model(ids, context=ctx)
        loss = F.cross_entropy(out.logits.flatten(0, 1), tgt.flatten(), reduction="sum") / tgt.numel()
        loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    whole_logits, whole_grads = loss_and_grads(inputs, targets, None)
    scale = targets.numel() / context.split(targets).numel()  # the slice's loss is a share of the whole mean
    logits, grads = loss_and_grads(context.split(inputs), context.split(targets), context)
    worst = float((logits - context.split(whole_logits)).abs().max() / whole_logits.abs().max())
    for name, grad in grads.items():
        grad = grad / scale
        dist.all_reduce(grad, group=context.group)
        reference = whole_grads[name]
        worst = max(worst, float((grad - reference).abs().max() / reference.abs().max().clamp_min(1e-12)))
    model.zero_grad(set_to_none=True)
    assert worst < 1e-4, f"context-parallel run differs from the whole sequence by {worst:.2e} (relative)"
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    p.add_argument("--mixer", choices=["mamba", "mamba2"], default="mamba")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=24)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--checkpoint-blocks", action="store_true")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--verify", type=int, default=4096, metavar="L",
                   help="first check, in float32 at length L, that R ranks compute what one does (0: skip)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs")))
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    context = None
    if world > 1:
        # an out-of-memory error on one rank leaves the others waiting for its state: time out instead of hanging
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=3))
        context = ContextParallel()
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = build_model(args, device)
    if context is not None and args.verify:
        worst = verify(model, context, args.verify, device)
        if rank == 0:
            print(json.dumps({"verify_length": args.verify, "max_relative_difference": worst}), flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    parameters = sum(p.numel() for p in model.parameters())
    rows = []
    for length in sorted(args.lengths):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        seconds = one_length(model, optimizer, length, context, args, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        peaks = [peak]
        if context is not None:
            box = torch.tensor([peak], device=device)
            gathered = [torch.zeros_like(box) for _ in range(world)]
            dist.all_gather(gathered, box)
            peaks = [float(t) for t in gathered]
        row = {"length": length, "ranks": world, "positions_per_rank": length // world,
               "seconds_per_step": seconds, "tokens_per_s": None if seconds is None else length / seconds,
               "peak_gib_rank0": peaks[0], "peak_gib_max": max(peaks),
               "state_numbers_sent_per_forward": None if context is None else context.last_exchanged,
               "oom": seconds is None}
        rows.append(row)
        if rank == 0:  # written after every length: a later hang or crash keeps what was measured
            print(json.dumps(row), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            info = {"mixer": args.mixer, "d_model": args.d_model, "n_layers": args.n_layers,
                    "parameters": parameters, "checkpoint_blocks": args.checkpoint_blocks,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "rows": rows}
            (args.out / f"context_parallel-{args.mixer}-R{world}.json").write_text(json.dumps(info, indent=2))
        if seconds is None:
            break
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
