"""Streaming audio classification: per-chunk latency and real-time factor at 2 threads.

    python benchmarks/bench_audio_streaming.py                              # s4d and mamba, chunks 10-100 ms
    python benchmarks/bench_audio_streaming.py --checkpoint outputs/experiments/spoken_digits/s4d/final
    python benchmarks/bench_audio_streaming.py --smoke                      # a few chunks: checks it runs

A causal classifier (the architecture of experiments/audio/spoken_digits.py: 2 layers, d_model 64, 80 raw
samples per step at 8 kHz, i.e. one 10 ms frame) reads ``--seconds`` of audio as it would arrive from a
microphone, in chunks of 10, 20, 50 and 100 ms, through :class:`ssmkit.models.streaming.StreamingClassifier`
(each chunk runs in parallel from the state the previous chunk left). For each chunk size it reports the latency of one chunk (median, 95th
percentile and maximum, in ms: the time from a chunk's arrival to the updated prediction) and the real-time
factor RTF = compute time / audio time (below 1: faster than real time). The first second of chunks is a
warm-up and is not counted.

The signal is generated speech (``generated_spoken_digits`` test examples laid end to end; needs espeak-ng) or,
with ``--signal noise``, white noise (the cost does not depend on what the samples are). Without
``--checkpoint`` the weights are random, which costs the same. Run on a quiet machine: the numbers are only
as good as the machine is idle. Prints one JSON object (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import setup  # noqa: E402
from ssmkit.models import ModelConfig  # noqa: E402
from ssmkit.models.model import SSMModel  # noqa: E402
from ssmkit.models.streaming import StreamingClassifier  # noqa: E402

SAMPLE_RATE = 8_000
SAMPLES_PER_STEP = 80
ARCHITECTURES = {
    "s4d": dict(mixer="s4d", mixer_kwargs={"s4d": {"d_state": 64}}, mlp="gated", mlp_hidden=96),
    "mamba": dict(mixer="mamba", mixer_kwargs={"mamba": {"d_state": 16}}),
}


def build_model(name: str, checkpoint: str = None) -> SSMModel:
    if checkpoint:
        return SSMModel.from_pretrained(checkpoint).eval()
    torch.manual_seed(0)
    config = ModelConfig(d_model=64, n_layers=2, input_dim=SAMPLES_PER_STEP, head="classifier", num_classes=10,
                         **ARCHITECTURES[name])
    return SSMModel(config).eval()


def make_signal(kind: str, seconds: float) -> torch.Tensor:
    """(1, seconds * 8000 / 80, 80): raw samples, 80 per model step."""
    steps = int(seconds * SAMPLE_RATE) // SAMPLES_PER_STEP
    if kind == "noise":
        return 0.1 * torch.randn(1, steps, SAMPLES_PER_STEP, generator=torch.Generator().manual_seed(0))
    from ssmkit.tasks import make_task

    task = make_task("generated_spoken_digits", samples_per_step=SAMPLES_PER_STEP)
    examples = -(-steps // (task.default_length // SAMPLES_PER_STEP))
    waveform = task.batch("test", 0, examples).inputs.reshape(1, -1, SAMPLES_PER_STEP)
    return waveform[:, :steps]


def measure(model: SSMModel, signal: torch.Tensor, chunk_ms: float) -> dict:
    steps_per_chunk = max(1, round(chunk_ms / 1000 * SAMPLE_RATE / SAMPLES_PER_STEP))
    chunks = list(signal.split(steps_per_chunk, dim=1))
    warmup = max(1, round(1000 / chunk_ms))
    stream = StreamingClassifier(model, batch_size=1)
    latencies = []
    for i, chunk in enumerate(chunks):
        start = time.perf_counter()
        stream.push(chunk)
        if i >= warmup or len(chunks) <= warmup:
            latencies.append(time.perf_counter() - start)
    counted = len(latencies)
    audio_seconds = counted * steps_per_chunk * SAMPLES_PER_STEP / SAMPLE_RATE
    ordered = sorted(latencies)
    return {"chunk_ms": chunk_ms, "chunk_samples": steps_per_chunk * SAMPLES_PER_STEP, "chunks_timed": counted,
            "latency_ms_median": round(1e3 * statistics.median(ordered), 3),
            "latency_ms_p95": round(1e3 * ordered[min(counted - 1, int(0.95 * counted))], 3),
            "latency_ms_max": round(1e3 * ordered[-1], 3),
            "real_time_factor": round(sum(latencies) / audio_seconds, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--checkpoint", default=None, help="a trained classifier (then --models is ignored)")
    parser.add_argument("--chunk-ms", type=float, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--seconds", type=float, default=20.0, help="audio streamed per chunk size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--signal", choices=("speech", "noise"), default="speech")
    parser.add_argument("--smoke", action="store_true", help="2 s of audio, chunks 10 and 100 ms: checks it runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.chunk_ms = 2.0, [10, 100]
    if not all(10 <= c <= 100 for c in args.chunk_ms):
        parser.error(f"--chunk-ms must lie in 10..100 ms; got {args.chunk_ms}")
    setup(args.threads)
    signal = make_signal(args.signal, args.seconds)
    names = ["checkpoint"] if args.checkpoint else args.models
    report = {"benchmark": "audio_streaming", "threads": torch.get_num_threads(), "sample_rate": SAMPLE_RATE,
              "samples_per_step": SAMPLES_PER_STEP, "audio_seconds": args.seconds, "signal": args.signal,
              "smoke": args.smoke, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "results": {}}
    for name in names:
        model = build_model(name, args.checkpoint)
        report["results"][name] = {"params": sum(p.numel() for p in model.parameters()),
                                   "by_chunk": [measure(model, signal, c) for c in args.chunk_ms]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
