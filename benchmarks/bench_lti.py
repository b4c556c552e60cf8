"""Forward time per token of the LTI layers (S4, S4D; S5 optional) for L from 1k to 64k.

The parallel pass is an FFT convolution, O(L log L), so the time per token should stay nearly flat:
the issue asks the per-token time at 64k to stay within 1.5x of the time at 1k.

    python benchmarks/bench_lti.py                       # S4 and S4D, d_model 256, N 64, 2 threads
    python benchmarks/bench_lti.py --layers s4d s5 --threads 1 --out outputs/bench_lti.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, peak_rss_mb, setup, time_call, write_json  # noqa: E402

import ssmkit  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=["s4", "s4d"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384, 65536])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="outputs/bench_lti.json")
    args = parser.parse_args(argv)
    setup(args.threads)

    rows = []
    print(f"{'layer':6} {'L':>7} {'forward ms':>11} {'us/token':>9} {'vs 1k':>6}")
    for name in args.layers:
        layer = ssmkit.build_mixer(name, args.d_model, d_state=args.d_state).eval()
        base = None
        for length in args.lengths:
            x = torch.randn(args.batch, length, args.d_model)
            with torch.no_grad():
                seconds = time_call(lambda: layer(x), repeats=args.repeats)
            per_token = seconds / (length * args.batch) * 1e6
            base = base or per_token
            rows.append(dict(layer=name, length=length, forward_ms=seconds * 1e3, us_per_token=per_token,
                             ratio_to_first=per_token / base))
            print(f"{name:6} {length:>7} {seconds * 1e3:>11.1f} {per_token:>9.2f} {per_token / base:>6.2f}")
    result = dict(machine=machine_info(args.threads), d_model=args.d_model, d_state=args.d_state,
                  batch=args.batch, peak_rss_mb=peak_rss_mb(), rows=rows)
    write_json(args.out, result)
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB; written {args.out}")
    return result


if __name__ == "__main__":
    main()
