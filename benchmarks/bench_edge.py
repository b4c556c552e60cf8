"""Edge decoding: the exported one-token step in onnxruntime (fp32 and dynamic int8) against ssmkit eager.

For each shape and engine, at 1 and 2 threads: decode ms/token (median over ``--steps`` greedy steps after a
warm-up) and the resident memory of a fresh process that loaded the model and decoded (peak RSS). Each
(shape, engine, threads) runs in its own subprocess so memory figures do not mix.

Shapes (Mamba, random weights unless ``--checkpoint``):
  130m   24 layers, d_model 768, vocab 50280 (the mamba-130m shape)
  10m    10 layers, d_model 384, vocab 256 (about 10M parameters, a bytes LM)
  tiny   2 layers, d_model 32, vocab 256 (a correctness run of this script, seconds)

With ``--checkpoint`` (a bytes LM, e.g. outputs/bytes_mamba/final) the int8 export's quality is measured as
the quantisation issue does: bits per byte of eager, ONNX fp32 and ONNX int8 on ``--text`` (teacher forced),
and greedy agreement (the fraction of positions whose argmax equals eager's).

    python benchmarks/bench_edge.py                                  # 130m and 10m, 1 and 2 threads
    python benchmarks/bench_edge.py --shapes tiny --steps 20         # correctness run
    python benchmarks/bench_edge.py --shapes 10m --checkpoint outputs/bytes_mamba/final --text README.md
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"130m": dict(d_model=768, n_layers=24, vocab_size=50280),
          "10m": dict(d_model=384, n_layers=10, vocab_size=256),
          "tiny": dict(d_model=32, n_layers=2, vocab_size=256)}
ENGINES = ("eager", "onnx-fp32", "onnx-int8")


def build_model(shape: str, checkpoint):
    import torch

    from ssmkit import ModelConfig, from_config, from_pretrained

    if checkpoint:
        return from_pretrained(checkpoint).eval()
    torch.manual_seed(0)
    return from_config(ModelConfig(mixer="mamba", **SHAPES[shape])).eval()


def export_all(model, directory: Path) -> None:
    """step.onnx (fp32) and step.int8.onnx (onnxruntime dynamic quantisation of the weights to int8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ssmkit.deploy.export import export_recurrence

    export_recurrence(model, directory, format="onnx", prefill_chunk=16)
    quantize_dynamic(str(directory / "step.onnx"), str(directory / "step.int8.onnx"), weight_type=QuantType.QInt8)


def worker(args) -> dict:
    """One (engine, threads) measurement in this process: decode ms/token and peak RSS. The ONNX engines
    run on onnxruntime and numpy alone (torch is never imported), as on a device."""
    if args.engine == "eager":
        import torch

        from common import setup

        setup(args.threads)
        model = build_model(args.shape, args.checkpoint)
        state, token = model.init_state(1), torch.zeros(1, dtype=torch.long)

        def step(token, state):
            with torch.no_grad():
                logits, state = model.step(token, state)
            return logits.argmax(-1), state
    else:
        import numpy as np
        import onnxruntime as ort

        manifest = json.loads((Path(args.export_dir) / "manifest.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        name = "step.int8.onnx" if args.engine == "onnx-int8" else "step.onnx"
        session = ort.InferenceSession(str(Path(args.export_dir) / name), options, providers=["CPUExecutionProvider"])
        names = [e["name"] for e in manifest["state"]]
        state = [np.zeros(e["shape"] + ([2] if e["dtype"].startswith("complex") else []), dtype=np.float32)
                 for e in manifest["state"]]
        token = np.zeros(1, dtype=np.int64)

        def step(token, state):
            out = session.run(None, {"inputs": token, **dict(zip(names, state))})
            return out[0].argmax(-1).astype(np.int64), out[1:]
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        token, state = step(token, state)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"shape": args.shape, "engine": args.engine, "threads": args.threads,
            "decode_ms": statistics.median(times) * 1e3,
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: a child started from a big parent inherits
    the parent's maximum through fork and keeps it across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quality(model, export_dir: Path, text: bytes) -> dict:
    """Bits per byte (teacher forced) and greedy agreement with eager, for ONNX fp32 and int8."""
    import torch

    from ssmkit.deploy.export import ExportedRecurrence

    ids = torch.tensor(list(text), dtype=torch.long)
    runs = {"eager": None, "onnx-fp32": ExportedRecurrence(export_dir, threads=1),
            "onnx-int8": ExportedRecurrence(export_dir, threads=1, step_file="step.int8.onnx")}
    argmaxes, out = {}, {}
    for name, runner in runs.items():
        state = model.init_state(1) if runner is None else runner.init_state()
        nll, picks = 0.0, []
        for t in range(len(ids) - 1):
            if runner is None:
                with torch.no_grad():
                    logits, state = model.step(ids[t : t + 1], state)
            else:
                logits, state = runner._run("step", ids[t : t + 1], state)
            logp = torch.log_softmax(logits[0, :256].double(), -1)
            nll -= float(logp[ids[t + 1]])
            picks.append(int(logp.argmax()))
        argmaxes[name] = picks
        out[name] = {"bits_per_byte": nll / (len(ids) - 1) / math.log(2)}
    for name in ("onnx-fp32", "onnx-int8"):
        agree = sum(a == b for a, b in zip(argmaxes[name], argmaxes["eager"])) / len(argmaxes["eager"])
        out[name]["greedy_agreement"] = agree
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["130m", "10m"], choices=list(SHAPES))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--checkpoint", default=None, help="a trained bytes LM: also measure int8 quality")
    parser.add_argument("--text", default="README.md", help="text for bits per byte (first --text-bytes bytes)")
    parser.add_argument("--text-bytes", type=int, default=2000)
    parser.add_argument("--out", default="outputs/bench_edge.json")
    # internal: one measurement in a subprocess
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--export-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        print(json.dumps(worker(args)))
        return
    from common import machine_info, write_json

    rows, qualities = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            model = build_model(shape, args.checkpoint)
            export_dir = Path(tmp) / shape
            export_all(model, export_dir)
            params = model.num_parameters()
            for engine in args.engines:
                for threads in args.threads:
                    cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--engine", engine,
                           "--threads", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--export-dir", str(export_dir)] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
                    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    row = dict(json.loads(result.stdout.strip().splitlines()[-1]), params=params)
                    rows.append(row)
                    print(f"  {shape:5} {engine:10} threads {threads}: {row['decode_ms']:8.2f} ms/token, "
                          f"peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)
            if args.checkpoint:
                text = Path(args.text).read_bytes()[: args.text_bytes]
                qualities[shape] = quality(model, export_dir, text)
                print(f"  {shape} quality on {len(text)} bytes of {args.text}: {json.dumps(qualities[shape])}")
    write_json(args.out, dict(machine=machine_info(max(args.threads)), args=vars(args), rows=rows, quality=qualities))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
