"""Selective copying at reduced scale: S6 (Mamba) vs S4D vs attention (Mamba paper, sec. 3.1 and Table 1).

    python experiments/selective_copying.py               # --budget 360 --threads 1: about 17 minutes here
    python experiments/selective_copying.py --length 256 --models mamba s4d --budget 600

A sequence of ``--length`` tokens (128 by default) holds 16 data tokens (vocabulary 16: 0 noise, 1..14 data,
15 marker) at random positions among noise, then 16 markers; at the markers the model must output the data
tokens in order. A time-invariant model cannot tell data from noise by content, only by position. Each
model (2 layers, d_model 64: the ``ssmkit compare`` presets) trains for ``--budget`` seconds (batch 16,
lr 3e-3) and is scored on 256 test sequences (accuracy over their 4096 copied tokens; chance 1/14).

Measured here (1 thread, 360 s each; experiments/results/selective_copying.json): Transformer 0.989,
Mamba 0.891 (its loss still falling fast), S4D 0.752. At L=256 Mamba stayed at the chance loss for the
90-214 s we tried. Published (L=4096, trained to convergence on GPUs): Mamba (S6) 99.8, S6 without gate
97.0, S4 without gate 18.3, H3 57.0, Mamba with an S4 layer 56.4.

Writes experiments/results/selective_copying.json and selective_copying.png (loss curves).
"""

from __future__ import annotations

import json
import time

from common import (RUNS_DIR, list_models, markdown_table, parse_args, preset, run_summary, save_figure, setup,
                    train_for_budget, write_results)

NAME = "selective_copying"
MODELS = ("mamba", "s4d", "transformer", "mamba2")
FAMILY = ("h3", "hyena", "rwkv7", "hawk", "griffin", "mamba3")  # issue 13: the rest of the family
PUBLISHED = {"source": "Gu & Dao 2023 (Mamba), Table 1: L=4096, vocab 16, 16 tokens, 2 layers, D=64",
             "accuracy_percent": {"S4 no gate": 18.3, "S6 no gate": 97.0, "H3 (S4)": 57.0, "Mamba with S4": 56.4,
                                  "Mamba with Hyena": 28.4, "H3 with S6": 99.7, "Mamba (S6)": 99.8}}


def main() -> None:
    def extra(p):
        p.add_argument("--length", type=int, default=128)
        p.add_argument("--num-tokens", type=int, default=16)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--lr", type=float, default=3e-3)

    args = parse_args(__doc__, 360.0, MODELS[:3], extra)
    models = list_models(args.models, MODELS + FAMILY)
    machine = setup(args.threads)
    started = time.perf_counter()
    task_kwargs = {"vocab_size": 16, "length": args.length, "num_tokens": args.num_tokens, "seed": args.seed}
    results = {}
    for name in models:
        print(f"\n== {name} ==", flush=True)
        trained = train_for_budget(NAME, name, NAME, task_kwargs, preset(name), args.budget,
                                   batch_size=args.batch_size, lr=args.lr, threads=args.threads, seed=args.seed,
                                   eval_batches=16, eval_split="test")
        metrics = trained["result"].final_metrics
        results[name] = {**run_summary(trained), "test_accuracy": metrics["test_accuracy"],
                         "test_loss": metrics["test_loss"], "curve": _loss_curve(trained["result"].out_dir)}
        print(f"[{name}] test accuracy {metrics['test_accuracy']:.3f}", flush=True)

    table = markdown_table(["model", "params", "steps", "train s", "tokens/s", "test accuracy"],
                           [[n, f"{r['params']:,}", r["steps"], f"{r['train_seconds']:.0f}", f"{r['tokens_per_s']:,}",
                             r["test_accuracy"]] for n, r in results.items()])
    print("\n" + table)
    write_results(NAME, {"experiment": NAME, "machine": machine, "budget_per_model_s": args.budget,
                         "task": task_kwargs, "batch_size": args.batch_size, "lr": args.lr, "results": results,
                         "table": table, "published": PUBLISHED, "chance_accuracy": 1 / 14,
                         "total_seconds": round(time.perf_counter() - started, 1),
                         "runs_dir": str(RUNS_DIR / NAME)}, args.out)
    plot(results, args.length, args.out)


def _loss_curve(out_dir):
    """(train_seconds, loss) pairs from the run's metrics.jsonl."""
    points = []
    with open(out_dir / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if record.get("event") == "train":
                points.append([round(record["train_seconds"], 1), round(record["loss"], 4)])
    return points


def plot(results, length: int, out=None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, r in results.items():
        xs, ys = zip(*r["curve"]) if r["curve"] else ([], [])
        ax.plot(xs, ys, label=f"{name}: test acc {r['test_accuracy']:.2f}")
    ax.set_xlabel("training seconds (1 thread)")
    ax.set_ylabel("training loss (copied tokens)")
    ax.set_yscale("log")
    ax.set_title(f"Selective copying, L={length}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, NAME, out)
    plt.close(fig)


if __name__ == "__main__":
    main()
