"""Honest limits: where a fixed-state model falls short of attention (issue 17, item 1).

    OMP_NUM_THREADS=1 python experiments/limits.py                 # --budget 10, 39 points: roughly 10-15 minutes (not timed)
    OMP_NUM_THREADS=1 python experiments/limits.py --quick         # smoke run: two models, one point each
    ssmkit compare --task limits_mqar_many_keys                    # one point as the main job (all presets)

Two sweeps, every model the ``ssmkit compare`` preset (2 layers, d_model 64) trained for ``--budget``
seconds per point (batch 32, lr 3e-3, warm-up + cosine) and scored on held-out examples:

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

Not here (left for a later change): the needle-in-a-haystack retrieval on the bytes LM (issue 17, 1c).

Writes experiments/results/limits.json (or ``--out``).
"""

from __future__ import annotations

import time
from dataclasses import replace

from common import RUNS_DIR, markdown_table, parse_args, preset, run_summary, setup, train_for_budget, write_results
from ssmkit.compare import D_MODEL  # noqa: E402  (common puts src/ on the path when needed)
from ssmkit.train import ModelSpec  # noqa: E402

NAME = "limits"
MODELS = ("mamba", "mamba2", "s4d", "linear_attention", "transformer", "hybrid")
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
    trained = train_for_budget(NAME, label, task_name, task_kwargs, spec, args.budget, batch_size=32, lr=3e-3,
                               threads=args.threads, seed=args.seed, eval_batches=8, eval_split="test")
    metrics = trained["result"].final_metrics
    summary = run_summary(trained)
    summary.pop("config")
    print(f"[{label}] test accuracy {metrics['test_accuracy']:.3f}", flush=True)
    return {**summary, "test_accuracy": round(metrics["test_accuracy"], 4), "test_loss": round(metrics["test_loss"], 4)}


def main() -> None:
    def extra(p):
        p.add_argument("--kv", type=int, nargs="+", default=[4, 16, 32], help="MQAR key-value pairs")
        p.add_argument("--state-sizes", type=int, nargs="+", default=[4, 16, 64], help="Mamba d_state at max --kv")
        p.add_argument("--copy-lengths", type=int, nargs="+", default=[16, 64, 128], help="string copy L (even)")
        p.add_argument("--quick", action="store_true", help="smoke run: mamba and transformer, one point each, 2 s")

    args = parse_args(__doc__, 10.0, MODELS, extra)
    if args.quick:
        args.models, args.kv, args.state_sizes, args.copy_lengths = ["mamba", "transformer"], [4], [4], [16]
        args.budget = min(args.budget, 2.0)
    machine = setup(args.threads)
    started = time.perf_counter()
    mqar, state, copy = {}, {}, {}
    for kv in args.kv:
        kwargs = {"vocab_size": MQAR_VOCAB, "length": MQAR_LENGTH, "num_kv_pairs": kv, "seed": args.seed}
        for name in args.models:
            mqar.setdefault(name, {})[str(kv)] = one_point(f"mqar_kv{kv}_{name}", "mqar", kwargs, model_spec(name), args)
    kv = max(args.kv)
    kwargs = {"vocab_size": MQAR_VOCAB, "length": MQAR_LENGTH, "num_kv_pairs": kv, "seed": args.seed}
    for d_state in args.state_sizes:
        state[str(d_state)] = one_point(f"mqar_kv{kv}_mamba_N{d_state}", "mqar", kwargs,
                                        model_spec("mamba", d_state), args)
    for length in args.copy_lengths:
        kwargs = {"vocab_size": COPY_VOCAB, "length": length, "seed": args.seed}
        for name in args.models:
            copy.setdefault(name, {})[str(length)] = one_point(f"copy_L{length}_{name}", "string_copy", kwargs,
                                                               model_spec(name), args)

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
    write_results(NAME, {"experiment": NAME, "machine": machine, "quiet_machine": False,
                         "budget_per_point_s": args.budget, "batch_size": 32, "lr": 3e-3, "quick": args.quick,
                         "mqar_settings": {"vocab_size": MQAR_VOCAB, "length": MQAR_LENGTH},
                         "copy_settings": {"vocab_size": COPY_VOCAB},
                         "mqar": mqar, "mqar_state_size": state, "string_copy": copy, "tables": tables,
                         "published": PUBLISHED, "total_seconds": round(time.perf_counter() - started, 1),
                         "runs_dir": str(RUNS_DIR / NAME)}, args.out)


if __name__ == "__main__":
    main()
