"""Where a GPU layer's time goes: ssmkit's Mamba / Mamba2 forward+backward, timed and profiled per kernel.

    python benchmarks/gpu_profile_layers.py --layers mamba2 --d-model 1024 --batch 8 --length 8192

Prints the median forward and forward+backward times (bf16 autocast, ``triton.testing.do_bench``) and the
CUDA kernels that take the most time in one forward+backward (``torch.profiler``), so a ratio against a peer
comes with the profile that explains it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ssmkit.layers import Mamba, Mamba2  # noqa: E402
from ssmkit.ops import record_backends  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=["mamba", "mamba2"])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    from triton.testing import do_bench

    for name in args.layers:
        torch.manual_seed(0)
        layer = (Mamba(args.d_model, d_state=16) if name == "mamba" else Mamba2(args.d_model, d_state=128)).cuda()
        layer.backend = "triton"
        x = torch.randn(args.batch, args.length, args.d_model, device="cuda", requires_grad=True)
        grad = torch.randn_like(x)

        def fwd():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return layer(x)

        def fwd_bwd():
            fwd().backward(grad)

        with record_backends() as ran:
            fwd_bwd()
        with torch.no_grad():
            t_fwd = do_bench(fwd, warmup=5, rep=30, return_mode="median")
        t_all = do_bench(fwd_bwd, warmup=5, rep=30, grad_to_none=[x, *layer.parameters()], return_mode="median")
        print(f"\n{name} d_model={args.d_model} batch={args.batch} L={args.length}: forward {t_fwd:.2f} ms, "
              f"forward+backward {t_all:.2f} ms; backends {sorted(set(ran))}")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fwd_bwd()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
