"""Induction heads: train short, test up to 2^16 tokens (Mamba paper, sec. 4.1.2 and Table 2).

    python experiments/induction_heads.py                  # --budget 45 --threads 1: about 8 minutes here
    python experiments/induction_heads.py --long-length 256 --out experiments/results/induction_heads_curriculum.json
    python experiments/induction_heads.py --models mamba transformer --budget 30

Each model (2 layers, d_model 64, vocabulary 16: the ``ssmkit compare`` presets) trains for ``--budget``
seconds (45) on sequences of ``--train-length`` tokens (32; batch 32, lr 3e-3, warm-up + cosine). With
``--long-length N`` the same run (one schedule) then trains ``--long-seconds`` more (45) on sequences of N
tokens: a length curriculum, since trained at 256 from scratch Mamba stayed on the loss plateau here (0.16
accuracy after 90 s). Then each model is asked for the key at test lengths 2^6 .. 2^16:

* SSMs (Mamba, Mamba-2, S4D) read the test sequences in their recurrent form: ``model.prefill`` in chunks of
  ``--chunk`` tokens, each chunk run in parallel and the state carried to the next, so memory does not grow
  with the length (only the last position is scored, which is all the task asks). A check at the first
  test length compares this with a token-by-token ``model.step`` loop and with the plain forward pass.
* Attention (RoPE) reads each test sequence in one parallel pass. Its cost grows as L^2, so the script
  stops at the first length whose predicted time (the previous per-example time scaled by L^2, times the
  examples) passes ``--attention-limit`` seconds (60), and records where and why it stopped.

Measured here (1 thread; experiments/results/induction_heads.json, and induction_heads_curriculum.json for
the 32 -> 256 curriculum; tables in experiments/README.md): every model is perfect at the training length
32. Mamba holds 99% to 2^7 (4x) and falls to ~0.3 by 2^11; Mamba-2 holds 100% to 2^9 (16x); attention and
S4D fall toward chance (1/15) past 2x. With the curriculum Mamba holds 98% to 2^10 (4x its longest training
length). Published (trained at 256 to convergence, tested to 2^20): Mamba 100% at every length; MHA-RoPE
83.6% at 2^9, 31.3% at 2^10, 5.5% at 2^14.

Writes experiments/results/induction_heads.json and induction_heads.png.
"""

from __future__ import annotations

import math
import time

import torch

from common import (RUNS_DIR, list_models, markdown_table, parse_args, preset, run_summary, save_figure, setup,
                    seconds_per_step, train_for_budget, write_results)
from ssmkit.tasks import make_task  # noqa: E402  (common puts src/ on the path when needed)
from ssmkit.tasks.synthetic import InductionHeads  # noqa: E402

NAME = "induction_heads"
MODELS = ("mamba", "transformer", "s4d", "mamba2")
#: the rest of the family (issue 13): registered mixers at their default sizes, Griffin as a preset
FAMILY = ("h3", "hyena", "rwkv7", "hawk", "griffin", "mamba3")
PARALLEL_ONLY = ("transformer",)  # read in one parallel pass at test time; every other model recurrently
VOCAB = 16
PUBLISHED = {
    "source": "Gu & Dao 2023 (Mamba), Table 2: trained at L=256, vocab 16, 2 layers, D=64",
    "mamba": "100% at every test length 2^6 .. 2^20",
    "mha_rope": {"2^9": 83.6, "2^10": 31.3, "2^14": 5.5},
    "attention": "MHA-Abs / RoPE / xPos fall below 70% beyond 2x the training length",
}


class LengthCurriculum(InductionHeads):
    """Induction heads whose training batches switch to ``long_length`` tokens from batch ``switch`` on
    (evaluation and the other splits keep the requested or default length)."""

    def __init__(self, long_length: int, switch: int, **kwargs):
        super().__init__(**kwargs)
        self.long_length, self.switch = long_length, switch

    def batch(self, split, index, batch_size, length=None):
        if split == "train" and length is None and index >= self.switch:
            length = self.long_length
        return super().batch(split, index, batch_size, length)


def examples_at(length: int, cap: int) -> int:
    """Examples scored at a test length: up to ``cap``, fewer for long sequences (2^19 tokens per length,
    at least 16), so every length costs about the same time."""
    return max(16, min(cap, 2 ** 19 // length))


@torch.no_grad()
def recurrent_last_logits(model, inputs: torch.Tensor, chunk: int, rows: int) -> torch.Tensor:
    """Logits (B, V) at the last position, reading ``inputs`` (B, L) with chunked prefill, ``rows`` at a time."""
    out = []
    for part in inputs.split(rows):
        logits, _ = model.prefill(list(part), chunk_size=chunk)
        out.append(logits)
    return torch.cat(out)


@torch.no_grad()
def parallel_last_logits(model, inputs: torch.Tensor, rows: int) -> torch.Tensor:
    out = []
    for part in inputs.split(rows):
        out.append(model(part).logits[:, -1].float())
    return torch.cat(out)


@torch.no_grad()
def check_recurrence(model, task, length: int) -> float:
    """Largest |difference| between the last logits of step-by-step decoding, chunked prefill and the
    parallel forward, on 4 validation examples of ``length`` tokens (all three must agree)."""
    ids = task.batch("val", 0, 4, length).inputs
    parallel = model(ids).logits[:, -1].float()
    chunked, _ = model.prefill(list(ids), chunk_size=max(1, length // 3))
    state = model.init_state(ids.shape[0])
    for token in ids.unbind(1):
        logits, state = model.step(token, state)
    return max(float((parallel - chunked).abs().max()), float((parallel - logits.float()).abs().max()))


def evaluate_lengths(name: str, model, task, lengths, cap: int, chunk: int, limit: float):
    """Accuracy at each length; returns (rows, stop note or None)."""
    model.eval()
    rows, note = [], None
    per_example = None
    for length in lengths:
        n = examples_at(length, cap)
        if name in PARALLEL_ONLY and per_example is not None:
            predicted = per_example * (length / previous) ** 2 * n
            if predicted > limit:
                note = (f"stopped before L={length}: one parallel pass over {n} examples was predicted to take "
                        f"{predicted:.0f} s (> {limit:.0f} s; attention costs O(L^2) time)")
                print(f"  [{name}] {note}", flush=True)
                break
        batch = task.batch("test", 0, n, length)
        start = time.perf_counter()
        if name not in PARALLEL_ONLY:
            rows_at_once = max(1, min(n, 2 ** 17 // min(length, chunk)))
            try:
                logits = recurrent_last_logits(model, batch.inputs, chunk, rows_at_once)
            except ValueError as error:  # e.g. Hyena's implicit filters end at l_max: the model refuses longer input
                note = f"stopped at L={length}: {error}"
                print(f"  [{name}] {note}", flush=True)
                break
        else:
            logits = parallel_last_logits(model, batch.inputs, max(1, min(n, 2 ** 16 // length)))
        seconds = time.perf_counter() - start
        accuracy = float((logits[:, :VOCAB].argmax(-1) == batch.targets[:, -1]).float().mean())
        per_example, previous = seconds / n, length
        rows.append({"length": length, "accuracy": accuracy, "examples": n, "seconds": round(seconds, 2),
                     "mode": "parallel" if name in PARALLEL_ONLY else "recurrent (chunked prefill)"})
        print(f"  [{name}] L={length:>6}: accuracy {accuracy:.3f} on {n} examples ({seconds:.1f} s)", flush=True)
    return rows, note


def main() -> None:
    def extra(p):
        p.add_argument("--train-length", type=int, default=32)
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--lr", type=float, default=3e-3)
        p.add_argument("--long-length", type=int, default=0,
                       help="after the budget at --train-length, train --long-seconds more at this length")
        p.add_argument("--long-seconds", type=float, default=45.0)
        p.add_argument("--max-log2", type=int, default=16, help="longest test length is 2^this (default 16)")
        p.add_argument("--examples", type=int, default=128, help="examples per test length (at most)")
        p.add_argument("--chunk", type=int, default=4096, help="prefill chunk for the recurrent evaluation")
        p.add_argument("--attention-limit", type=float, default=60.0,
                       help="seconds one attention test length may take (predicted) before stopping")

    args = parse_args(__doc__, 45.0, MODELS, extra)
    models = list_models(args.models, MODELS + FAMILY)
    machine = setup(args.threads)
    started = time.perf_counter()
    lengths = [2 ** k for k in range(6, args.max_log2 + 1)]
    task_kwargs = {"vocab_size": VOCAB, "length": args.train_length, "seed": args.seed}
    results = {}
    for name in models:
        print(f"\n== {name} ==", flush=True)
        task = make_task("induction_heads", **task_kwargs)
        curriculum, steps = None, None
        if args.long_length:
            # first the budget at the training length, then --long-seconds at --long-length (same run, one
            # schedule): the short phase learns the lookup fast, the long phase teaches the state to hold it
            short_steps = int(args.budget / seconds_per_step(task, preset(name), args.batch_size, seed=args.seed))
            long_task = make_task("induction_heads", **dict(task_kwargs, length=args.long_length))
            long_steps = int(args.long_seconds / seconds_per_step(long_task, preset(name), args.batch_size,
                                                                  seed=args.seed))
            steps = short_steps + long_steps
            curriculum = {"short_length": args.train_length, "short_steps": short_steps,
                          "long_length": args.long_length, "long_steps": long_steps}
            task = LengthCurriculum(args.long_length, short_steps, **task_kwargs)
            print(f"[{name}] curriculum: {short_steps} steps at L={args.train_length}, then {long_steps} at "
                  f"L={args.long_length}", flush=True)
        trained = train_for_budget(NAME, name, "induction_heads", task_kwargs, preset(name),
                                   args.budget + (args.long_seconds if args.long_length else 0),
                                   batch_size=args.batch_size, lr=args.lr, threads=args.threads, seed=args.seed,
                                   task=task, steps=steps)
        model = trained["result"].model
        train_accuracy = trained["result"].final_metrics.get("val_accuracy")
        print(f"  [{name}] accuracy at the training length {args.train_length}: {train_accuracy:.3f}")
        eval_start = time.perf_counter()
        consistency = check_recurrence(model, task, lengths[0]) if name not in PARALLEL_ONLY else None
        if consistency is not None:
            print(f"  [{name}] step-by-step vs chunked prefill vs parallel: max |diff| {consistency:.2e}")
        rows, note = evaluate_lengths(name, model, task, lengths, args.examples, args.chunk, args.attention_limit)
        results[name] = {**run_summary(trained), "train_length": args.train_length, "curriculum": curriculum,
                         "accuracy_at_train_length": train_accuracy, "test": rows, "stopped": note,
                         "recurrence_check_max_abs_diff": consistency,
                         "eval_seconds": round(time.perf_counter() - eval_start, 1)}

    headers = ["model", "params", "train s", f"acc@{args.train_length}"] + [f"2^{int(math.log2(L))}" for L in lengths]
    table = []
    for name, r in results.items():
        by_length = {row["length"]: row["accuracy"] for row in r["test"]}
        table.append([name, f"{r['params']:,}", f"{r['train_seconds']:.0f}", r["accuracy_at_train_length"]]
                     + [by_length.get(L, "-") for L in lengths])
    text = markdown_table(headers, table)
    print("\n" + text)
    for name, r in results.items():
        if r["stopped"]:
            print(f"{name}: {r['stopped']}")
    write_results(NAME, {"experiment": NAME, "machine": machine, "budget_per_model_s": args.budget,
                         "train_length": args.train_length, "test_lengths": lengths, "vocab_size": VOCAB,
                         "batch_size": args.batch_size, "lr": args.lr, "results": results, "table": text,
                         "published": PUBLISHED, "total_seconds": round(time.perf_counter() - started, 1),
                         "runs_dir": str(RUNS_DIR / NAME)}, args.out)
    plot(results, args.train_length, args.out)


def plot(results, train_length: int, out=None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, r in results.items():
        xs = [train_length] + [row["length"] for row in r["test"]]
        ys = [r["accuracy_at_train_length"]] + [row["accuracy"] for row in r["test"]]
        ax.plot(xs, ys, marker="o", label=f"{name} ({r['params'] / 1e3:.0f}K)")
    ax.axvline(train_length, color="grey", lw=0.8, ls=":")
    ax.axhline(1 / (VOCAB - 1), color="grey", lw=0.8, ls="--", label="chance (1/15)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"test sequence length (trained at {train_length})")
    ax.set_ylabel("accuracy")
    ax.set_title("Induction heads: length generalisation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, NAME, out)
    plt.close(fig)


if __name__ == "__main__":
    main()
