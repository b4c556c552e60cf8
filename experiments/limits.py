"""Honest limits: where a fixed-state model falls short of attention (issue 17, item 1).

    OMP_NUM_THREADS=1 python experiments/limits.py                 # --budget 10, 39 points: roughly 10-15 minutes (not timed)
    OMP_NUM_THREADS=1 python experiments/limits.py --quick         # smoke run: two models, one point each
    ssmkit compare --task limits_mqar_many_keys                    # one point as the main job (all presets)
    OMP_NUM_THREADS=2 python experiments/limits.py --needle --threads 2          # needle sweep: 12 points x 45 s
    OMP_NUM_THREADS=1 python experiments/limits.py --needle --quick              # its smoke run
    ssmkit compare --task limits_needle                            # one needle point as the main job
    python experiments/limits.py --device cuda --batch-size 64 --steps 4000 --kv 4 16 --state-kv 16 --copy-lengths
                                                                   # MQAR on a GPU (one process per point: README)

Two sweeps (and a third with ``--needle``), every model the ``ssmkit compare`` preset (2 layers, d_model 64)
trained for ``--budget`` seconds (or ``--steps``) per point (batch ``--batch-size``, default 32; lr 3e-3, warm-up
then cosine) and scored on held-out examples:

* **Multi-query associative recall** (Zoology, Arora et al. 2023, arXiv 2312.04927): L = 128, vocabulary 512,
  ``--kv`` key-value pairs (4, 16, 32) all queried later; accuracy over the answers. Models: Mamba, Mamba-2,
  S4D, linear attention, attention (transformer) and a Mamba/attention hybrid. Then the same at 32 pairs for
  Mamba with d_state 4, 16 and 64 (``--state-sizes``): recall vs state size.
* **Copying a random string** ("Repeat After Me", Jelassi et al. 2024, arXiv 2402.01032): a string of n
  tokens (vocabulary 31), a separator, then the copy; n = L/2 for L in ``--copy-lengths`` (16, 64, 128);
  accuracy over the copied tokens.

What to expect from the papers: attention solves MQAR at every size while gated-convolution / SSM models
need a width that grows with the number of pairs (Zoology, Fig. 2); transformers copy strings far longer
than GSSMs of the same size can, and fixed-state models fail once the string exceeds their state (Repeat
After Me, Fig. 1, Theorem 2.7). At minutes of CPU per point our numbers are short of convergence: they show
the direction of the gap at this scale, not its size at the papers'. Training times were taken on a shared
machine (other jobs running), so they are not benchmarks; the accuracies do not depend on them beyond the
number of steps each budget bought.

* **Needle in a haystack on the bytes LM** (``--needle``, run on its own): the ``needle_haystack`` task, a
  line ``STX key=value ETX`` (4 letters, 4 digits) hidden at a random depth of standard-library source
  bytes, then ``ENQ key=`` and the value to reproduce (:mod:`ssmkit.tasks.needle`). Mamba, attention
  (transformer) and the Mamba/attention hybrid are each trained ``--needle-budget`` seconds (batch ``--batch-size``) at
  every context length in ``--needle-lengths`` (128, 256, 512, 1024 bytes) and scored on test filler with the
  needle at depths 0, 0.25, 0.5, 0.75 and 1 (0: the first bytes, farthest from the query): accuracy over the
  value digits and exact match of the whole value (chance 1e-4). Each length is trained on its own, so no
  model is asked to read positions it never saw in training (RoPE attention would otherwise be measured on
  length extrapolation, not on recall). Published shape (RULER, Hsieh et al. 2024, arXiv 2404.06654, at LLM
  scale): single-needle retrieval is the easiest of its tasks for transformers within their trained context,
  and the non-transformer models it tests (RWKV-v5, Mamba) fall well short of transformers as the context
  grows. What the fixed state predicts: the needle must survive F bytes of filler in the state, attention
  looks the key up, so SSM accuracy should fall with length (and with distance from the query).

Writes experiments/results/limits.json (or ``--out``); ``--needle`` writes experiments/results/limits_needle.json.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from common import RUNS_DIR, markdown_table, parse_args, preset, run_summary, setup, train_for_budget, write_results
from ssmkit.compare import D_MODEL  # noqa: E402  (common puts src/ on the path when needed)
from ssmkit.train import ModelSpec  # noqa: E402

NAME = "limits"
NEEDLE_NAME = "limits_needle"
MODELS = ("mamba", "mamba2", "s4d", "linear_attention", "transformer", "hybrid")
NEEDLE_MODELS = ("mamba", "transformer", "hybrid")
NEEDLE_KEY_LEN, NEEDLE_VALUE_LEN = 4, 4
MQAR_VOCAB = 512
MQAR_LENGTH = 128
COPY_VOCAB = 32
PUBLISHED = {
    "zoology": "Arora et al. 2023 (arXiv 2312.04927), Fig. 2 / Sec. 3: attention reaches ~100% MQAR accuracy at "
               "every width and sequence length tried (64-512, up to 64 pairs); gated convolutions and SSMs (H3, "
               "Hyena, RWKV) need model width growing with the number of pairs, and fail at small width with many "
               "pairs",
    "repeat_after_me": "Jelassi et al. 2024 (arXiv 2402.01032), Fig. 1 / Sec. 4: transformers (~160M) copy strings "
                       "of hundreds of tokens after training on short ones, Mamba of similar size degrades as the "
                       "string grows; Theorem 2.7: a model with a fixed state of S bits cannot copy strings whose "
                       "information exceeds S",
    "ruler": "Hsieh et al. 2024 (arXiv 2404.06654), RULER: single-needle retrieval is the easiest of its tasks "
             "for transformer LLMs within their trained context; the non-transformer models it tests (RWKV-v5, "
             "Mamba) fall well short of transformers as the context grows",
}


def model_spec(name: str, d_state: int = None) -> ModelSpec:
    """The compare preset, or two layers of a registered mixer (linear attention) at d_model 64."""
    if name == "linear_attention":
        return ModelSpec(d_model=D_MODEL, n_layers=2, mixer="linear_attention", mlp="gated", mlp_hidden=128)
    spec = preset(name)
    if d_state is not None:
        spec = replace(spec, mixer_kwargs={name: dict(spec.mixer_kwargs[name], d_state=d_state)})
    return spec


def one_point(label: str, task_name: str, task_kwargs: dict, spec: ModelSpec, args) -> dict:
    trained = train_for_budget(NAME, label, task_name, task_kwargs, spec, args.budget, batch_size=args.batch_size,
                               lr=3e-3, threads=args.threads, seed=args.seed, eval_batches=8, eval_split="test",
                               device=args.device, steps=args.steps)
    metrics = trained["result"].final_metrics
    summary = run_summary(trained)
    summary.pop("config")
    print(f"[{label}] test accuracy {metrics['test_accuracy']:.3f}", flush=True)
    return {**summary, "test_accuracy": round(metrics["test_accuracy"], 4), "test_loss": round(metrics["test_loss"], 4)}


def needle_sweep(args) -> dict:
    """Train each model at each context length on ``needle_haystack``; score it on test filler at each depth."""
    from ssmkit.tasks import make_task
    from ssmkit.train import evaluate

    results = {}
    for length in args.needle_lengths:
        kwargs = {"length": length, "key_len": NEEDLE_KEY_LEN, "value_len": NEEDLE_VALUE_LEN, "seed": args.seed}
        for name in args.models:
            label = f"needle_L{length}_{name}"
            trained = train_for_budget(NEEDLE_NAME, label, "needle_haystack", kwargs, model_spec(name),
                                       args.needle_budget, batch_size=args.batch_size, lr=3e-3, threads=args.threads,
                                       seed=args.seed, eval_batches=2, eval_split="test", device=args.device,
                                       steps=args.steps)
            model = trained["result"].model
            by_depth = {}
            for depth in args.needle_depths:
                metrics = evaluate(model, make_task("needle_haystack", depth=depth, **kwargs), split="test",
                                   batches=args.needle_eval_batches, batch_size=32)
                by_depth[str(depth)] = {"accuracy": round(metrics["accuracy"], 4),
                                        "exact_match": round(metrics["exact_match"], 4)}
            summary = run_summary(trained)
            summary.pop("config")
            point = {**summary, "by_depth": by_depth,
                     "accuracy": round(sum(d["accuracy"] for d in by_depth.values()) / len(by_depth), 4),
                     "exact_match": round(sum(d["exact_match"] for d in by_depth.values()) / len(by_depth), 4)}
            results.setdefault(name, {})[str(length)] = point
            print(f"[{label}] test exact match {point['exact_match']:.3f} (digits {point['accuracy']:.3f}); by depth "
                  + ", ".join(f"{d}: {r['exact_match']:.2f}" for d, r in by_depth.items()), flush=True)
    return results


def needle_main(args, machine: dict) -> None:
    if args.quick:
        args.needle_lengths, args.needle_depths, args.needle_eval_batches = [64], [0.0, 1.0], 1
        args.needle_budget = min(args.needle_budget, 1.0)
    started = time.perf_counter()
    results = needle_sweep(args)
    lengths, deepest = args.needle_lengths, str(max(args.needle_lengths))
    tables = {
        "exact_match": markdown_table(["model", "params"] + [f"L={L}" for L in lengths],
                                      [[n, f"{next(iter(r.values()))['params']:,}"]
                                       + [r[str(L)]["exact_match"] for L in lengths] for n, r in results.items()]),
        "digit_accuracy": markdown_table(["model"] + [f"L={L}" for L in lengths],
                                         [[n] + [r[str(L)]["accuracy"] for L in lengths] for n, r in results.items()]),
        "by_depth": markdown_table([f"exact match at L={deepest}, needle depth"] + [str(d) for d in args.needle_depths],
                                   [[n] + [r[deepest]["by_depth"][str(d)]["exact_match"] for d in args.needle_depths]
                                    for n, r in results.items()]),
    }
    for title, table in tables.items():
        print(f"\n{title}\n{table}")
    write_results(NEEDLE_NAME, {"experiment": NEEDLE_NAME, "machine": machine, "quiet_machine": False,
                                "budget_per_point_s": None if args.steps else args.needle_budget,
                                "steps_per_point": args.steps, "batch_size": args.batch_size, "lr": 3e-3,
                                "quick": args.quick,
                                "task": {"name": "needle_haystack", "key_len": NEEDLE_KEY_LEN,
                                         "value_len": NEEDLE_VALUE_LEN, "filler": "standard-library sources"},
                                "lengths": lengths, "depths": args.needle_depths,
                                "eval_examples_per_depth": 32 * args.needle_eval_batches,
                                "needle": results, "tables": tables, "published": {"ruler": PUBLISHED["ruler"]},
                                "total_seconds": round(time.perf_counter() - started, 1),
                                "runs_dir": str(RUNS_DIR / NEEDLE_NAME)}, args.out)
    try:
        _plot_needle(results, lengths, args.out)
    except ImportError:
        print("matplotlib is not installed: no plot")


def _plot_needle(results: dict, lengths, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, by_length in results.items():
        ax.plot(lengths, [by_length[str(L)]["exact_match"] for L in lengths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (bytes; trained and tested at each)")
    ax.set_ylabel("exact match of the 4-digit value")
    ax.set_title("needle in a haystack, bytes LM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, NEEDLE_NAME, out)
    plt.close(fig)


def machine(args) -> dict:
    """``setup``'s description of the machine, with the GPU's name when the points run on one."""
    described = setup(args.threads)
    if args.device == "cuda":
        described["gpu"] = torch.cuda.get_device_name(0)
    return described


def main() -> None:
    def extra(p):
        # each list may be given empty (e.g. "--kv" alone) to skip that sweep: a sweep split over processes
        p.add_argument("--kv", type=int, nargs="*", default=[4, 16, 32], help="MQAR key-value pairs")
        p.add_argument("--state-sizes", type=int, nargs="*", default=[4, 16, 64],
                       help="Mamba d_state at --state-kv pairs")
        p.add_argument("--state-kv", type=int, default=None, help="pairs of the state-size sweep (default max --kv)")
        p.add_argument("--copy-lengths", type=int, nargs="*", default=[16, 64, 128], help="string copy L (even)")
        p.add_argument("--plot-from", default=None,
                       help="only draw limits.png from this results JSON (e.g. one merged from several processes)")
        p.add_argument("--quick", action="store_true", help="smoke run: mamba and transformer, one point each, 2 s "
                       "(with --needle: the three needle models at L=64, depths 0 and 1, 1 s each)")
        p.add_argument("--needle", action="store_true",
                       help=f"run only the needle-in-a-haystack sweep (models default to {' '.join(NEEDLE_MODELS)})")
        p.add_argument("--needle-lengths", type=int, nargs="+", default=[128, 256, 512, 1024],
                       help="context lengths, each trained and tested on its own")
        p.add_argument("--needle-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                       help="needle depths scored (0: start of the filler, 1: just before the query)")
        p.add_argument("--needle-budget", type=float, default=45.0, help="seconds of training per needle point")
        p.add_argument("--needle-eval-batches", type=int, default=4, help="test batches of 32 per depth")
        p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                       help="where every point trains and is scored (the step-time probe too)")
        p.add_argument("--batch-size", type=int, default=32,
                       help="training batch (on a GPU a small model's step costs about the same at 256)")
        p.add_argument("--steps", type=int, default=None,
                       help="train every point this many steps instead of --budget (--needle-budget) seconds: "
                            "equal data for every model, and for processes sharing one GPU, where a step time "
                            "probed at the start misjudges the load")

    args = parse_args(__doc__, 10.0, MODELS, extra)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1; got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    if args.plot_from:
        import json

        plot_limits(json.loads(open(args.plot_from).read()), args.out)
        return
    if args.needle:
        if args.models == list(MODELS):
            args.models = list(NEEDLE_MODELS)
        needle_main(args, machine(args))
        return
    if args.quick:
        args.models, args.kv, args.state_sizes, args.copy_lengths = ["mamba", "transformer"], [4], [4], [16]
        args.budget = min(args.budget, 2.0)
    described = machine(args)  # sets the threads before any training
    started = time.perf_counter()
    mqar, state, copy = {}, {}, {}
    for kv in args.kv:
        kwargs = {"vocab_size": MQAR_VOCAB, "length": MQAR_LENGTH, "num_kv_pairs": kv, "seed": args.seed}
        for name in args.models:
            mqar.setdefault(name, {})[str(kv)] = one_point(f"mqar_kv{kv}_{name}", "mqar", kwargs, model_spec(name), args)
    kv = args.state_kv or max(args.kv or [32])
    kwargs = {"vocab_size": MQAR_VOCAB, "length": MQAR_LENGTH, "num_kv_pairs": kv, "seed": args.seed}
    for d_state in args.state_sizes:
        state[str(d_state)] = one_point(f"mqar_kv{kv}_mamba_N{d_state}", "mqar", kwargs,
                                        model_spec("mamba", d_state), args)
    for length in args.copy_lengths:
        kwargs = {"vocab_size": COPY_VOCAB, "length": length, "seed": args.seed}
        for name in args.models:
            copy.setdefault(name, {})[str(length)] = one_point(f"copy_L{length}_{name}", "string_copy", kwargs,
                                                               model_spec(name), args)

    results = {"experiment": NAME, "machine": described, "quiet_machine": False,
               "budget_per_point_s": None if args.steps else args.budget, "steps_per_point": args.steps,
               "batch_size": args.batch_size, "lr": 3e-3, "quick": args.quick,
               "mqar_settings": {"vocab_size": MQAR_VOCAB, "length": MQAR_LENGTH, "state_kv": kv},
               "copy_settings": {"vocab_size": COPY_VOCAB},
               "mqar": mqar, "mqar_state_size": state, "string_copy": copy}
    tables = {
        "mqar": markdown_table(["model", "params"] + [f"kv={k}" for k in args.kv],
                               [[n, f"{next(iter(r.values()))['params']:,}"] + [r[str(k)]["test_accuracy"] for k in args.kv]
                                for n, r in mqar.items()]),
        "mqar_state": markdown_table(["Mamba d_state", "params", f"kv={kv}"],
                                     [[d, f"{r['params']:,}", r["test_accuracy"]] for d, r in state.items()]),
        "copy": markdown_table(["model"] + [f"n={L // 2} (L={L})" for L in args.copy_lengths],
                               [[n] + [r[str(L)]["test_accuracy"] for L in args.copy_lengths] for n, r in copy.items()]),
    }
    for title, table in tables.items():
        print(f"\n{title}\n{table}")
    results.update(tables=tables, published=PUBLISHED, total_seconds=round(time.perf_counter() - started, 1),
                   runs_dir=str(RUNS_DIR / NAME))
    write_results(NAME, results, args.out)
    plot_limits(results, args.out)


def per_point(results: dict) -> str:
    """How much training each point of a results JSON had: fixed steps (``--steps``) or a time budget."""
    if results.get("steps_per_point"):
        return f"{results['steps_per_point']} steps of batch {results.get('batch_size', '?')} per point"
    return f"{results.get('budget_per_point_s', '?')} s per point"


def plot_limits(results: dict, out=None) -> None:
    """Three panels: MQAR accuracy vs key-value pairs, vs Mamba's d_state, and copy accuracy vs string length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    from common import save_figure

    kv = results.get("mqar_settings", {}).get("state_kv", 32)
    state = results.get("mqar_state_size", {})
    panels = [(results.get("mqar", {}), "key-value pairs (MQAR, L=128)", False),
              ({"mamba": state} if state else {}, f"Mamba d_state (MQAR, {kv} pairs)", False),
              (results.get("string_copy", {}), "string length n (copy)", True)]
    panels = [p for p in panels if p[0]]  # a sweep split over processes may hold only some of them
    if not panels:
        print("no sweep in the results: no plot")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    for ax, (sweep, xlabel, halve) in zip(axes[0], panels):
        for name, points in sweep.items():
            xs = sorted(points, key=int)
            ax.plot([int(x) // 2 if halve else int(x) for x in xs], [points[x]["test_accuracy"] for x in xs],
                    marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy")
    fig.suptitle(f"Where a fixed state falls short ({per_point(results)})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, NAME, out)
    plt.close(fig)


if __name__ == "__main__":
    main()
