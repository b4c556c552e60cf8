"""The mixer family on the CPU, one layer each: forward and forward+backward time and peak memory, and decode
ms/token, against Mamba (issue 13).

Each mixer is one layer at d_model 768 with batch 1, timed at L = 1k, 4k and 16k: the median of ``--repeats``
calls after a short warm-up call, the peak being the resident-memory growth during the first timed call
(common.PeakMemory). Decoding: the state after a ``--prefix``-token forward, then ``--steps`` calls of
``step`` (mean ms per token; Hyena's state is a cache that grows with the steps). The tables print in markdown
with each figure's ratio to Mamba's at the same length. Run it on a quiet machine:

    python benchmarks/bench_family.py                      # 2 threads, all mixers, L 1024 4096 16384
    python benchmarks/bench_family.py --mixers mamba rwkv7 --lengths 1024 --threads 1
    python benchmarks/bench_family.py --quick              # tiny sizes, a smoke test of the script

Mixers and their settings at d_model 768 (the others at their defaults): mamba d_state 16 (the baseline);
mamba2 d_state 128, headdim 64, chunk 64 (as bench_mamba.py); hyena order 2 with l_max the longest length
plus the decode steps (its filters are defined up to l_max).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, machine_info, setup, write_json  # noqa: E402

import ssmkit  # noqa: E402

MIXERS = ("mamba", "mamba2", "h3", "hyena", "rwkv7", "hawk", "mamba3", "liquid_s4", "s4d")
BASELINE = "mamba"


def mixer_kwargs(name: str, quick: bool, l_max: int) -> dict:
    """Constructor kwargs of ``name`` (module docstring); quick: small states for a tiny width."""
    if name == "mamba":
        return dict(d_state=16)
    if name == "mamba2":
        return dict(d_state=16, headdim=16, chunk_size=16) if quick else dict(d_state=128, headdim=64, chunk_size=64)
    if name == "hyena":
        return dict(l_max=l_max)
    return {}


def measure(layer, x: torch.Tensor, backward: bool, repeats: int):
    """(median seconds, peak MB) of ``repeats`` forward (or forward+backward) calls on x, after a warm-up call
    on the first 64 positions."""

    def run(inputs):
        if backward:
            layer(inputs.detach().requires_grad_(True)).sum().backward()
            layer.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                layer(inputs)

    run(x[:, :64])
    times, peak = [], None
    for _ in range(max(1, repeats)):
        gc.collect()
        with PeakMemory() as mem:
            start = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - start)
        peak = mem.peak_mb if peak is None else peak
    return statistics.median(times), peak


@torch.no_grad()
def decode_ms(layer, d_model: int, prefix: int, steps: int) -> float:
    """Mean ms per ``step`` after a ``prefix``-token forward (one untimed step first)."""
    x = torch.randn(1, prefix + steps + 1, d_model)
    _, state = layer(x[:, :prefix], return_state=True)
    _, state = layer.step(x[:, prefix], state)
    start = time.perf_counter()
    for t in range(prefix + 1, prefix + 1 + steps):
        _, state = layer.step(x[:, t], state)
    return (time.perf_counter() - start) / steps * 1e3


def _ratio(value: float, base) -> str:
    return "-" if base is None else f"{value / base:.2f}x"


def markdown(rows: list, decode: list) -> str:
    """The two tables: passes per length, then decoding, each figure with its ratio to the baseline's."""
    base = {(r["length"], r["pass"]): r for r in rows if r["mixer"] == BASELINE}
    lines = ["| mixer | L | forward ms | vs Mamba | forward MB | fwd+bwd ms | vs Mamba | fwd+bwd MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(r["mixer"], r["length"], r["pass"]): r for r in rows}
    for mixer, length in dict.fromkeys((r["mixer"], r["length"]) for r in rows):
        cells = [mixer, str(length)]
        for what in ("forward", "fwd+bwd"):
            r, b = by_key[(mixer, length, what)], base.get((length, what))
            cells += [f"{r['ms']:.1f}", _ratio(r["ms"], b and b["ms"]), f"{r['peak_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    base_decode = next((d["ms_per_token"] for d in decode if d["mixer"] == BASELINE), None)
    lines += ["", "| mixer | decode ms/token | vs Mamba |", "|---|---:|---:|"]
    lines += [f"| {d['mixer']} | {d['ms_per_token']:.3f} | {_ratio(d['ms_per_token'], base_decode)} |"
              for d in decode]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefix", type=int, default=1024, help="tokens read before decoding")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: d_model 32, L 64 128, 1 repeat, prefix 16, 4 steps")
    parser.add_argument("--out", default="outputs/bench_family.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.lengths, args.repeats, args.prefix, args.steps = 32, [64, 128], 1, 16, 4
    setup(args.threads)
    print(f"threads {args.threads}, d_model {args.d_model}, batch 1, lengths {args.lengths}, torch {torch.__version__}")
    l_max = max(max(args.lengths), args.prefix + args.steps + 1)
    rows, decode = [], []
    for name in args.mixers:
        torch.manual_seed(0)
        kwargs = mixer_kwargs(name, args.quick, l_max)
        layer = ssmkit.build_mixer(name, args.d_model, **kwargs)
        for length in args.lengths:
            x = torch.randn(1, length, args.d_model)
            for backward in (False, True):
                seconds, peak = measure(layer, x, backward, args.repeats)
                rows.append(dict(mixer=name, length=length, ms=seconds * 1e3, peak_mb=peak,
                                 backends=dict(layer.last_backends), kwargs=kwargs,
                                 **{"pass": "fwd+bwd" if backward else "forward"}))
                print(f"  {name:10} L={length:6} {rows[-1]['pass']:8} {seconds * 1e3:9.1f} ms  +{peak:6.0f} MB",
                      flush=True)
        ms = decode_ms(layer, args.d_model, args.prefix, args.steps)
        decode.append(dict(mixer=name, ms_per_token=ms, prefix=args.prefix, steps=args.steps))
        print(f"  {name:10} decode {ms:8.3f} ms/token", flush=True)
        del layer
    print()
    print(markdown(rows, decode))
    write_json(args.out, dict(machine=machine_info(args.threads), args=vars(args), rows=rows, decode=decode))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
