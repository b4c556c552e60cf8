"""Where ``model.generate()``'s time goes on a GPU: the prompt pass and the decoding step, profiled per kernel.

    python benchmarks/gpu_profile_generate.py --size 1.4b --batch 64 --prompt 2048 --new-tokens 128

Builds a Mamba language model of the 130M or 1.4B shape (random weights, bf16, vocab 50277 padded to
50280), times ``model.prefill`` and ``model.generate`` (CUDA-graph decoding, and ``decode_backend="module"``
for comparison), and lists the CUDA kernels of one prompt pass and of one eager decoding step (the graph
replays the same kernels), so the figures in docs/gpu_benchmarks.md come with the profile that explains them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import ssmkit  # noqa: E402

SHAPES = {"130m": (768, 24), "1.4b": (2048, 48)}


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def kernel_table(fn, top: int):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    total = sum(getattr(e, "self_device_time_total", 0) for e in rows)
    count = sum(e.count for e in rows)
    rows.sort(key=lambda e: -getattr(e, "self_device_time_total", 0))
    lines = [f"  {count} kernel launches, {total / 1e3:.2f} ms of kernel time"]
    for e in rows[:top]:
        t = getattr(e, "self_device_time_total", 0)
        lines.append(f"  {t / 1e3:9.3f} ms {100 * t / max(total, 1):5.1f}%  x{e.count:<5} {e.key[:90]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="1.4b")
    parser.add_argument("--mixer", choices=["mamba", "mamba2"], default="mamba")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    d_model, n_layers = SHAPES[args.size]
    torch.manual_seed(0)
    cfg = dict(d_model=d_model, n_layers=n_layers, vocab_size=50277, pad_vocab_size_multiple=8, mixer=args.mixer)
    if args.mixer == "mamba2":
        cfg["mixer_kwargs"] = dict(d_state=128, headdim=64)
    with torch.device("cuda"):
        model = ssmkit.from_config(cfg).to(torch.bfloat16).eval()
    print(f"{args.mixer} {args.size}: {model.num_parameters() / 1e6:.0f}M parameters, bf16, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for batch in args.batch:
        prompt = torch.randint(0, 50277, (batch, args.prompt), device="cuda")
        rows = list(prompt)
        with torch.no_grad():
            model.prefill(rows)
            _, pre = timed(lambda: model.prefill(rows))
        model.generate(prompt, args.new_tokens)                       # records the graph of this batch size
        _, t_graph = timed(lambda: model.generate(prompt, args.new_tokens))
        backend = model.last_decode_backend
        model.generate(prompt[:, :16], 2, decode_backend="module")
        _, t_module = timed(lambda: model.generate(prompt, args.new_tokens, decode_backend="module"))
        tok = batch * args.new_tokens
        print(f"batch {batch}: prefill {pre:.3f} s ({batch * args.prompt / pre:,.0f} tok/s) | generate e2e "
              f"{tok / t_graph:,.0f} tok/s, decode {tok / max(t_graph - pre, 1e-9):,.0f} tok/s "
              f"({1e3 * (t_graph - pre) / args.new_tokens:.3f} ms/step, {backend}) | module decode "
              f"{tok / max(t_module - pre, 1e-9):,.0f} tok/s", flush=True)
        print(" prompt pass kernels:")
        with torch.no_grad():
            print(kernel_table(lambda: model.prefill(rows), args.top))
        state = model.init_state(batch, device="cuda")
        ids = prompt[:, 0]
        with torch.no_grad():
            model.step(ids, state)
            print(" one eager decoding step (module):")
            print(kernel_table(lambda: model.step(ids, state), args.top))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
