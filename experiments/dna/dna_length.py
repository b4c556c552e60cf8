"""DNA: accuracy vs sequence length, 10^3 to 10^5 bp, for Mamba, S4D, Hyena, attention and Caduceus-style RC.

    python experiments/dna/dna_length.py                     # --steps 400 --threads 1
    python experiments/dna/dna_length.py --models mamba s4d --steps 200 --lengths 1000 10000

The task is GENERATED (``generated_a_tract_phasing``, src/ssmkit/tasks/dna.py: no labelled genome ships in a
package we can install): is the DNA curved? Pairs of A-tracts (AAAAAA, or TTTTTT on the other strand) whose
centres are one helical turn apart (in phase: the bends add up, class 1) or a turn and a half (out of phase:
they cancel, class 0), one pair per 100 bp with as many lone tracts as decoys, on a background of GC content
0.41. The proportion is the same at every length, so a model that learnt the spacing at one length can be
asked at any other: each model trains ``--steps`` steps at ``--train-length`` bases (500) and is then tested
at every ``--lengths`` (500 to 100,000 bases) on ``--eval-examples`` test sequences per length.

Inputs are one token per base (``--k 1``; ``--k 4`` reads non-overlapping 4-mers). Every model is a
bidirectional classifier (each layer also reads the sequence backwards; mean over positions, then a linear
layer) of 2 layers at d_model 32; ``caduceus`` is the Mamba one with ``rc_equivariant=True`` (the same network
on both strands, its predictions exactly equal for a sequence and its reverse complement). Hyena's implicit
filters are made for the longest test length (``l_max``).

Attention (causal softmax in each direction, RoPE) costs L^2 time. On the CPU, torch's scaled_dot_product_attention
takes its flash kernel, whose memory grows only as L, so attention does not run out of memory here: it runs
out of time. The script stops attention at the first length whose predicted test time (the previous length's
scaled by L^2) passes ``--attention-limit`` seconds, and records the memory that the score matrix alone
(batch x heads x L^2 float32, per direction and layer) would take on the plain (math) path, which is what
fails first on a GPU without a fused kernel.

Times were measured on a shared 2-core machine (other jobs running), 1 thread: they are not benchmarks.
Writes experiments/results/dna_length.json and dna_length.png.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/common.py

from common import RESULTS_DIR, RUNS_DIR, markdown_table, parse_args, run_summary, save_figure, setup, train_for_budget, write_results  # noqa: E402
from ssmkit.tasks import make_task  # noqa: E402
from ssmkit.train import ModelSpec, evaluate  # noqa: E402

NAME = "dna_length"
TASK = "generated_a_tract_phasing"
MODELS = ("mamba", "s4d", "hyena", "attention", "caduceus")
LENGTHS = (500, 1_000, 10_000, 30_000, 100_000)
D_MODEL = 32


def spec(name: str, max_tokens: int) -> ModelSpec:
    """2 bidirectional layers at d_model 32 (Caduceus: Mamba with rc_equivariant)."""
    mixers = {
        "mamba": ("mamba", {"d_state": 16}),
        "caduceus": ("mamba", {"d_state": 16}),
        "s4d": ("s4d", {"d_state": 32}),
        "hyena": ("hyena", {"l_max": max_tokens}),
        "attention": ("attention", {"n_heads": 2}),
    }
    mixer, kwargs = mixers[name]
    mlp = dict(mlp="gated", mlp_hidden=64) if name in ("s4d", "attention") else {}
    return ModelSpec(d_model=D_MODEL, n_layers=2, mixer=mixer, mixer_kwargs={mixer: kwargs}, bidirectional=True,
                     rc_equivariant=name == "caduceus", **mlp)


def main() -> None:
    def extra(p):
        p.add_argument("--train-length", type=int, default=500, help="bases per training sequence")
        p.add_argument("--steps", type=int, default=400, help="optimiser steps per model")
        p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="test lengths in bases")
        p.add_argument("--k", type=int, default=1, help="bases per token (non-overlapping k-mers)")
        p.add_argument("--bp-per-pair", type=int, default=100, help="bases per binding-site pair")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--lr", type=float, default=3e-3)
        p.add_argument("--eval-examples", type=int, default=64)
        p.add_argument("--attention-limit", type=float, default=120.0,
                       help="seconds: skip attention at lengths predicted to take longer to test")
        p.add_argument("--replot", action="store_true", help="redraw the PNG from the result JSON and stop")

    args = parse_args(__doc__, 90.0, MODELS, extra)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}: choose from {list(MODELS)}")
    if args.replot:
        import json

        saved = json.loads(Path(args.out or RESULTS_DIR / f"{NAME}.json").read_text())
        results = {name: {**r, "by_length": {int(n): row for n, row in r["by_length"].items()}}
                   for name, r in saved["results"].items()}
        args.train_length = saved["train_length_bp"]
        _plot(results, sorted(next(iter(results.values()))["by_length"]), args)
        return
    machine = setup(args.threads)
    started = time.perf_counter()
    max_tokens = max(args.lengths + [args.train_length]) // args.k
    task_kwargs = {"k": args.k, "bp_per_pair": args.bp_per_pair, "length": args.train_length, "seed": args.seed}
    task = make_task(TASK, **task_kwargs)
    results = {}
    for name in args.models:
        print(f"\n== {name} ==", flush=True)
        model_spec = spec(name, max_tokens)
        trained = train_for_budget(NAME, name, TASK, task_kwargs, model_spec, args.budget,
                                   batch_size=args.batch_size, lr=args.lr, threads=args.threads, seed=args.seed,
                                   weight_decay=0.05, eval_split="test", eval_batches=2, eval_batch_size=32,
                                   steps=args.steps)
        model = trained["result"].model
        by_length, previous = {}, None
        for length in sorted(args.lengths):
            tokens = length // args.k
            batch_size = max(1, min(16, 64_000 // tokens))  # about 64k tokens per test batch
            batches = math.ceil(args.eval_examples / batch_size)
            row = {"tokens": tokens}
            if name == "attention":
                row["math_path_score_bytes"] = batch_size * 2 * tokens ** 2 * 4  # B x heads x L^2 float32
                if previous is not None:
                    predicted = previous[1] * (tokens / previous[0]) ** 2 * args.eval_examples
                    if predicted > args.attention_limit:
                        row.update(skipped=True, predicted_seconds=round(predicted))
                        by_length[length] = row
                        print(f"[{name}] {length} bp: skipped (predicted {predicted:.0f} s > "
                              f"{args.attention_limit:g} s)", flush=True)
                        continue
            tic = time.perf_counter()
            with torch.no_grad():
                metrics = evaluate(model, task, split="test", batches=batches, batch_size=batch_size, length=length)
            seconds = time.perf_counter() - tic
            previous = (tokens, seconds / metrics["count"])
            row.update(accuracy=metrics["accuracy"], loss=metrics["loss"], examples=int(metrics["count"]),
                       test_seconds=round(seconds, 1))
            by_length[length] = row
            print(f"[{name}] {length:>7} bp ({tokens} tokens): accuracy {metrics['accuracy']:.3f} "
                  f"({seconds:.0f} s)", flush=True)
        results[name] = {**run_summary(trained), "model": name, "by_length": by_length}
        _report(results, args, machine, started, done=name == args.models[-1])  # after every model: partial results


def _report(results, args, machine, started, done: bool) -> None:
    lengths = sorted(args.lengths)
    table = markdown_table(["model", "params", "steps", "train s"] + [f"{n:,} bp" for n in lengths],
                           [[name, f"{r['params']:,}", r["steps"], f"{r['train_seconds']:.0f}"]
                            + [_cell(r["by_length"][n]) for n in lengths] for name, r in results.items()])
    print("\n" + table)
    _plot(results, lengths, args)
    write_results(NAME, {"experiment": NAME, "task": TASK, "generated_data": True, "machine": machine,
                         "note": "times measured on a shared 2-core machine with other jobs running",
                         "complete": done, "train_length_bp": args.train_length, "k": args.k,
                         "bp_per_pair": args.bp_per_pair, "steps": args.steps, "batch_size": args.batch_size,
                         "lr": args.lr, "eval_examples": args.eval_examples, "results": results, "table": table,
                         "total_seconds": round(time.perf_counter() - started, 1),
                         "runs_dir": str(RUNS_DIR / NAME)}, args.out)


def _cell(row) -> str:
    if row.get("skipped"):
        return f"skipped (~{row['predicted_seconds']} s)"
    return f"{row['accuracy']:.3f}"


def _plot(results, lengths, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, result in results.items():
        points = [(n, result["by_length"][n]["accuracy"]) for n in lengths if "accuracy" in result["by_length"][n]]
        ax.plot(*zip(*points), marker="o", label=name)
        skipped = [n for n in lengths if result["by_length"][n].get("skipped")]
        if skipped:
            ax.plot([skipped[0]], [0.5], marker="x", color=ax.lines[-1].get_color(), markersize=9)
            ax.annotate(f"{name}: out of time", (skipped[0], 0.5), textcoords="offset points", xytext=(-60, 8),
                        fontsize=8)
    ax.axvline(args.train_length, color="grey", linestyle=":", linewidth=1)
    ax.text(args.train_length, 0.42, " trained here", color="grey", fontsize=8)
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_ylim(0.4, 1.02)
    ax.set_xlabel("sequence length (bp)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Generated A-tract phasing (curved DNA?): accuracy vs length, chance 0.5", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, NAME, args.out)


if __name__ == "__main__":
    main()
