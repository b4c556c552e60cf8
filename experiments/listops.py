"""ListOps at reduced scale: S4D vs Transformer vs Mamba (Long Range Arena, Tay et al. 2021).

    python experiments/listops.py                        # --budget 150 --threads 1: about 8 minutes here
    python experiments/listops.py --min-length 500 --max-length 2000 --budget 600   # LRA's lengths

Nested expressions such as ``[MAX 2 9 [MIN 4 7 ] 0 ]`` (LRA's generator and grammar, 10 classes) are kept
when their token count lies in ``--min-length`` .. ``--max-length`` (100..300 here instead of LRA's
500..2000, so that a model trains in a few CPU minutes). The script draws ``--train-examples`` training
expressions and the 2000 test expressions once, before any model trains (the generator is Python, ~3 ms per
expression), so every model reads the same data and no model pays for it. Each model (2 layers,
d_model 64: the ``ssmkit compare`` presets; a classifier over the mean of the valid positions) trains for
``--budget`` seconds (batch 32, lr 3e-3) and is scored on the 2000 test expressions.

Measured here (1 thread, 150 s each, 1.6-2.2 epochs; experiments/results/listops.json): Transformer
0.331, S4D 0.320, Mamba 0.282 (chance 0.10, majority class 0.168). Published LRA ListOps (lengths
500-2000, 96k expressions, full training): Transformer 36.37, S4 59.60, S5 62.15.

Writes experiments/results/listops.json.
"""

from __future__ import annotations

import time
from collections import Counter

from common import (RUNS_DIR, list_models, markdown_table, parse_args, preset, run_summary, setup, train_for_budget,
                    write_results)
from ssmkit.tasks.listops import ListOps  # noqa: E402  (common puts src/ on the path when needed)

NAME = "listops"
MODELS = ("s4d", "transformer", "mamba", "mamba2")
PUBLISHED = {"source": "LRA ListOps accuracy %, lengths 500-2000 (REFERENCE.md)",
             "Transformer": 36.37, "S4 (v3)": 59.60, "S5": 62.15}


class PregeneratedListOps(ListOps):
    """ListOps whose examples are drawn once and then kept in memory (same examples as ``ListOps``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._drawn = {}

    def example(self, split, index):
        key = (split, index)
        if key not in self._drawn:
            self._drawn[key] = super().example(split, index)
        return self._drawn[key]

    def pregenerate(self, split: str) -> float:
        """Draw every example of ``split``; returns the seconds it took."""
        start = time.perf_counter()
        for i in range(self.num_examples(split)):
            self.example(split, i)
        return time.perf_counter() - start


def main() -> None:
    def extra(p):
        p.add_argument("--min-length", type=int, default=100)
        p.add_argument("--max-length", type=int, default=300)
        p.add_argument("--train-examples", type=int, default=12000)
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--lr", type=float, default=3e-3)

    args = parse_args(__doc__, 150.0, MODELS[:3], extra)
    models = list_models(args.models, MODELS)
    machine = setup(args.threads)
    started = time.perf_counter()
    task_kwargs = {"min_length": args.min_length, "max_length": args.max_length, "num_train": args.train_examples,
                   "num_val": 500, "num_test": 2000, "seed": args.seed}
    task = PregeneratedListOps(**task_kwargs)
    seconds = task.pregenerate("train") + task.pregenerate("test")
    labels = Counter(task.example("test", i)[1] for i in range(2000))
    lengths = [len(task.example("train", i)[0]) for i in range(args.train_examples)]
    majority = labels.most_common(1)[0][1] / 2000
    print(f"drew {args.train_examples} train + 2000 test expressions in {seconds:.0f} s; mean length "
          f"{sum(lengths) / len(lengths):.0f} tokens; majority class of test {majority:.3f}", flush=True)
    results = {}
    for name in models:
        print(f"\n== {name} ==", flush=True)
        trained = train_for_budget(NAME, name, "listops", task_kwargs, preset(name), args.budget,
                                   batch_size=args.batch_size, lr=args.lr, threads=args.threads, seed=args.seed,
                                   eval_split="test", eval_batches=20, eval_batch_size=100, task=task)
        metrics = trained["result"].final_metrics
        epochs = trained["steps"] * args.batch_size / args.train_examples
        results[name] = {**run_summary(trained), "epochs": round(epochs, 2), "test_accuracy": metrics["test_accuracy"],
                         "test_loss": metrics["test_loss"]}
        print(f"[{name}] test accuracy {metrics['test_accuracy']:.3f} after {epochs:.1f} epochs", flush=True)

    table = markdown_table(["model", "params", "steps", "epochs", "train s", "tokens/s", "test acc"],
                           [[n, f"{r['params']:,}", r["steps"], f"{r['epochs']:.1f}", f"{r['train_seconds']:.0f}",
                             f"{r['tokens_per_s']:,}", r["test_accuracy"]] for n, r in results.items()])
    print("\n" + table + f"\nchance 0.100, majority class {majority:.3f}")
    write_results(NAME, {"experiment": NAME, "machine": machine, "budget_per_model_s": args.budget,
                         "task": task_kwargs, "mean_train_length": round(sum(lengths) / len(lengths), 1),
                         "data_generation_seconds": round(seconds, 1), "batch_size": args.batch_size, "lr": args.lr,
                         "chance_accuracy": 0.1, "majority_class_accuracy": majority, "results": results,
                         "table": table, "published": PUBLISHED,
                         "total_seconds": round(time.perf_counter() - started, 1), "runs_dir": str(RUNS_DIR / NAME)},
                  args.out)


if __name__ == "__main__":
    main()
