"""Peak memory of one whole-model training step (forward + backward) on the CPU, each configuration in a fresh
process (the figure is the process's peak resident set, ``ru_maxrss``, so nothing earlier can inflate it).

    python benchmarks/bench_train_memory.py                          # Mamba and Mamba-2, 130M shape, L 4096
    python benchmarks/bench_train_memory.py --mixers mamba --lengths 1024 4096 --modes full chunked recompute

130M shape: d_model 768, 24 layers, vocab 50280, tied head, batch 1, float32. Modes:
  full       the loss on the full (L, V) logits (F.cross_entropy)
  chunked    the model's chunked LM loss (loss_chunk_size 1024): the logits never exist whole
  recompute  chunked, and every Mamba/Mamba-2 layer recomputes its core in the backward (set_recompute)

Memory figures hold on a busy machine; the time printed beside them does not (take it on a quiet one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

VOCAB = 50280
MODES = ("full", "chunked", "recompute")


def one_step(mixer: str, length: int, mode: str, layers: int, threads: int) -> dict:
    """Runs in the child process: build, one forward + backward, report peak RSS (MB) before and after."""
    import resource

    import torch
    import torch.nn.functional as F

    from ssmkit.models import ModelConfig, SSMModel, set_recompute

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    kwargs = {"mamba": dict(d_state=16)} if mixer == "mamba" else {"mamba2": dict(d_state=128, headdim=64,
                                                                                  chunk_size=64)}
    model = SSMModel(ModelConfig(d_model=768, n_layers=layers, vocab_size=VOCAB, mixer=mixer, mixer_kwargs=kwargs,
                                 tie_embeddings=True))
    if mode == "recompute":
        set_recompute(model)
    ids = torch.randint(0, VOCAB, (1, length))
    # warm-up at a short length (C++ extension load, allocator) so the peak is the step's, not set-up's
    model(ids[:, :64], labels=ids[:, :64], loss_chunk_size=64).loss.backward()
    model.zero_grad(set_to_none=False)  # gradients exist, as in training
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if mode == "full":
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    else:
        loss = model(ids, labels=ids, loss_chunk_size=1024).loss
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(mixer=mixer, length=length, mode=mode, layers=layers, threads=threads, peak_mb=peak,
                peak_before_step_mb=before, seconds=seconds, loss=float(loss))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", nargs="+", default=["mamba", "mamba2"], choices=["mamba", "mamba2"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096])
    parser.add_argument("--modes", nargs="+", default=["chunked", "recompute"], choices=MODES)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench_train_memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_step(**json.loads(args.child))))
        return
    results = []
    for mixer in args.mixers:
        for length in args.lengths:
            for mode in args.modes:
                spec = dict(mixer=mixer, length=length, mode=mode, layers=args.layers, threads=args.threads)
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True)
                if done.returncode != 0:
                    print(f"  {mixer:6} L={length:5} {mode:9} failed: {done.stderr.strip()[-400:]}")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(row)
                print(f"  {mixer:6} L={length:5} {mode:9} peak {row['peak_mb'] / 1024:5.2f} GB "
                      f"(after set-up {row['peak_before_step_mb'] / 1024:4.2f} GB); step {row['seconds']:6.1f} s; "
                      f"loss {row['loss']:.4f}", flush=True)
    write_json(args.out, dict(machine=machine_info(args.threads), args=vars(args), results=results))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
