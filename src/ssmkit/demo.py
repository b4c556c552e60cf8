"""The foundation demo: one S4 layer computed two ways, and HiPPO's online memory of a signal.

    python -m ssmkit.demo --out outputs

1. An S4 layer (HiPPO-LegS init, DPLR kernel) runs over a sequence in parallel, as a long FFT convolution,
   and token by token, as a recurrence with a constant-size state; the two agree to rounding.
2. HiPPO-LegS / LegT / FouT compress band-limited white noise online into N = 64 numbers; the history is
   reconstructed from the final state alone and plotted (PNG).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import ssmkit
from ssmkit.ops.hippo_reconstruction import band_limited_noise, hippo_reconstruct, relative_error


def s4_two_ways(length: int, d_model: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    layer = ssmkit.build_mixer("s4", d_model, d_state=64).to(dtype)
    x = torch.randn(1, length, d_model, dtype=dtype)
    with torch.no_grad():
        start = time.perf_counter()
        y_conv, state_conv = layer(x, return_state=True)
        conv_s = time.perf_counter() - start
        state = layer.init_state(1, dtype=dtype)
        start = time.perf_counter()
        steps = []
        for x_t in x.unbind(1):
            y_t, state = layer.step(x_t, state)
            steps.append(y_t)
        rec_s = time.perf_counter() - start
    y_rec = torch.stack(steps, 1)
    return dict(
        dtype=str(dtype).replace("torch.", ""),
        max_abs_diff=(y_conv - y_rec).abs().max().item(),
        output_scale=y_conv.abs().max().item(),
        state_diff=max((state_conv[k] - state[k]).abs().max().item() for k in state),
        conv_ms=conv_s * 1e3,
        recurrence_ms=rec_s * 1e3,
    )


def reconstruction_figure(out: Path, T: float = 3.0, dt: float = 1e-3, N: int = 64) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = band_limited_noise(T=T, dt=dt, cutoff=3.0, seed=0)
    t = torch.arange(u.shape[-1], dtype=torch.float64) * dt
    errors = {}
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    for ax, measure in zip(axes, ["legs", "legt", "fout"]):
        result = hippo_reconstruct(u, dt=dt, measure=measure, N=N, theta=1.0)
        errors[measure] = relative_error(result.reconstruction, result.target).item()
        ax.plot(t, u, color="0.6", lw=1.0, label="signal")
        ax.plot(result.times, result.reconstruction, color="C3", lw=1.2, label=f"reconstruction from {N} numbers")
        span = "the whole history" if measure == "legs" else "the last second"
        ax.set_title(f"HiPPO-{measure.upper()} ({span}): relative RMSE {errors[measure]:.4f}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("time (s)")
    fig.suptitle("Online memory: the history reconstructed from the final state only", fontsize=11)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "hippo_reconstruction.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)
    return dict(path=str(path), errors=errors)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="ssmkit foundation demo (S4 two ways, HiPPO reconstruction)")
    parser.add_argument("--out", default="outputs", help="folder for the PNG (default: outputs)")
    parser.add_argument("--length", type=int, default=2048)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.set_flush_denormal(True)

    print(f"ssmkit {ssmkit.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"1. An S4 layer (d_model 8, N 64, HiPPO-LegS) over L = {args.length}: convolution vs recurrence")
    for dtype in (torch.float64, torch.float32):
        r = s4_two_ways(args.length, 8, dtype)
        print(f"   {r['dtype']:8} max |y_conv - y_recurrent| = {r['max_abs_diff']:.2e} "
              f"(outputs up to {r['output_scale']:.2f}; final states differ by {r['state_diff']:.1e}); "
              f"convolution {r['conv_ms']:.0f} ms, recurrence {r['recurrence_ms']:.0f} ms")
    print("\n2. HiPPO online memory of band-limited noise (T = 3 s, dt = 1 ms, cutoff 3 Hz, N = 64)")
    fig = reconstruction_figure(Path(args.out))
    for measure, err in fig["errors"].items():
        print(f"   {measure}: relative RMSE of the reconstruction {err:.4f}")
    print(f"   plot: {fig['path']}")


if __name__ == "__main__":
    main()
