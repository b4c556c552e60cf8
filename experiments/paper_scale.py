"""The Mamba paper's two synthetic tasks at the paper's own lengths, on a GPU (issue 17, item 2).

    python experiments/paper_scale.py induction --device cuda --budget 120          # trained at 256, tested to 2^20
    python experiments/paper_scale.py copying --device cuda --budget 60 --length 4096
    python experiments/paper_scale.py induction --device cpu --quick                # a smoke test of the script

The CPU reproductions (experiments/induction_heads.py, selective_copying.py) train for seconds of one CPU
thread at 32-256 tokens. This script takes the paper's settings (Gu & Dao 2023, sec. 4.1 and Tables 1-2;
2 layers, d_model 64, vocabulary 16) and gives each model the same wall-clock budget on one device:

* ``induction``: trained on sequences of 256 tokens (the first ``--warmup-fraction`` of the steps at 64
  tokens, a length curriculum that gets the model off the loss plateau sooner; the rest at 256), then asked
  for the key at test lengths 2^6 .. 2^``--max-log2`` (20 by default, 4096x the training length). The SSMs
  read each test sequence in their recurrent form (chunked ``prefill`` carrying the state: memory does not
  grow with the length); attention reads it in one parallel pass and stops when a length is predicted to take
  more than ``--attention-limit`` seconds. Then accuracy against the distance from the body's trigger to the
  query at one length (``--distance-length``): it separates forgetting (fails beyond a distance) from a long
  prefix disturbing the state. Weight decay is off by default here: with AdamW's 0.1 on the projection
  matrices Mamba forgets the key beyond a few training distances (and training on after the task is solved
  shrinks that horizon, with or without decay; experiments/README.md).
* ``copying``: selective copying at ``--length`` tokens (4096 as in the paper) with 16 data tokens, every model
  trained for ``--budget`` seconds and scored on 16 batches of the test split (accuracy over the copied tokens).

The step count of each model is its budget divided by its measured seconds per step on the device, so
models are compared at equal time, not equal steps; the paper trains each to convergence (steps stated in
the JSON). On a GPU shared with other jobs give ``--steps`` instead (seconds measured under load mean
nothing), and for a run longer than one device session ``--checkpoint-every N --resume --runs-dir DIR``: a
killed run continues from its newest checkpoint when the same command is given again. ``--curriculum``
trains copying at shorter lengths first (a departure from the paper, recorded in the JSON). Results go to
``experiments/results/paper_scale_<task>.json`` (``--out``) with the published numbers beside ours.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from common import RUNS_DIR, markdown_table, setup, write_results
from ssmkit.compare import _preset_spec
from ssmkit.tasks import make_task
from ssmkit.train import RunConfig, TaskSpec, TrainConfig, forward_batch, model_config_for, train

VOCAB = 16
PUBLISHED = {
    "induction": {"source": "Gu & Dao 2023 (Mamba), Table 2: trained at L=256, vocab 16, 2 layers, D=64",
                  "mamba": "100% at every test length 2^6 .. 2^20",
                  "mha_rope": {"2^9": 83.6, "2^10": 31.3, "2^14": 5.5}},
    "copying": {"source": "Gu & Dao 2023 (Mamba), Table 1: L=4096, vocab 16, 16 tokens, 2 layers, D=64",
                "accuracy_percent": {"S4 no gate": 18.3, "S6 no gate": 97.0, "H3 (S4)": 57.0,
                                     "Mamba with S4": 56.4, "Mamba with Hyena": 28.4, "H3 with S6": 99.7,
                                     "Mamba (S6)": 99.8}},
}
DISTANCES = (16, 64, 128, 256, 384, 512, 1024, 2048, 4000)  # trigger-to-query distances of the induction sweep
SSMS_NOT = ("transformer",)  # models read in one parallel pass at test time (attention); the rest recurrently


class Curriculum:
    """A task whose training batches are shorter early on: ``stages`` is a list of (length, until_batch):
    training batch ``i`` has the first stage's length whose ``until_batch`` is above ``i``, and the task's own
    length after the last stage. Every other call (evaluation, other splits) goes to the task unchanged."""

    def __init__(self, task, stages):
        self.task, self.stages = task, sorted(stages, key=lambda s: s[1])

    def __getattr__(self, name):
        return getattr(self.task, name)

    def batch(self, split, index, batch_size, length=None):
        if split == "train" and length is None:
            length = next((short for short, until in self.stages if index < until), None)
        return self.task.batch(split, index, batch_size, length)


def parse_curriculum(text: str, steps: int):
    """``"256:0.1,1024:0.1"`` -> [(256, 0.1 * steps), (1024, 0.2 * steps)]: each length for its fraction."""
    stages, until = [], 0.0
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            length, fraction = part.split(":")
            length, fraction = int(length), float(fraction)
        except ValueError:
            raise SystemExit(f"--curriculum: expected LENGTH:FRACTION[,LENGTH:FRACTION...]; got {text!r}")
        until += fraction
        stages.append((length, int(until * steps)))
    return stages


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(spec, task, batch_size: int, device: torch.device, repeats: int = 6) -> float:
    """Median time of one optimiser step of a fresh model on ``device`` (the first two not counted)."""
    from ssmkit.models import from_config

    model = from_config(model_config_for(task, spec)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 2):
        batch = task.batch("train", 10_000_000 + i, batch_size).to(device)
        _sync(device)
        start = time.perf_counter()
        task.loss(forward_batch(model, batch).logits, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def planned_steps(args, spec, task, device: torch.device) -> tuple:
    """(steps, seconds per step or None): ``--steps`` when given, else ``--budget`` / the measured step time."""
    if args.steps:
        return args.steps, None
    step_s = seconds_per_step(spec, task, args.batch_size, device)
    return max(20, int(args.budget / step_s)), step_s


def train_model(args, experiment: str, name: str, task_name: str, task_kwargs: dict, task, steps: int,
                step_s=None, **train_overrides):
    """Train the ``ssmkit compare`` preset (or registered mixer) ``name`` for ``steps`` steps; with
    ``--resume`` from the newest checkpoint of its run directory (one every ``--checkpoint-every`` steps),
    so a run longer than one session on a device continues in the next."""
    spec = _preset_spec(name)
    out_dir = Path(args.runs_dir or RUNS_DIR) / experiment / name
    batch_size, lr, device, seed = args.batch_size, args.lr, args.device, args.seed
    run = RunConfig(task=TaskSpec(name=task_name, kwargs=dict(task_kwargs)), model=spec,
                    train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=args.weight_decay,
                                      warmup_steps=max(1, steps // 10), eval_every=0,
                                      checkpoint_every=args.checkpoint_every, keep_last=1,
                                      out_dir=str(out_dir), seed=seed, device=device, progress=False,
                                      tensorboard=False, log_every=max(1, steps // 20), **train_overrides))
    timing = f"{step_s * 1e3:.1f} ms/step -> " if step_s else ""
    print(f"[{name}] {timing}{steps} steps of batch {batch_size}", flush=True)
    result = train(run, resume="auto" if args.resume else False, task=task)
    summary = run_summary(out_dir)
    print(f"[{name}] {result.num_parameters:,} parameters, trained {summary['train_seconds']:.0f} s in "
          f"{summary['segments']} segment(s), last logged loss {summary['final_train_loss']:.4f}", flush=True)
    return result, steps, run, summary


def run_summary(out_dir: Path) -> dict:
    """Training seconds summed over every segment of a (possibly resumed) run and its last logged loss,
    read from the run's metrics.jsonl."""
    seconds, segments, loss = 0.0, 0, float("nan")
    with open(out_dir / "metrics.jsonl") as f:
        for line in f:
            event = json.loads(line)
            if event.get("event") == "end":
                seconds += event.get("train_seconds", 0.0)
                segments += event.get("train_seconds", 0.0) > 0
            elif "loss" in event and event.get("event") in (None, "train"):
                loss = event["loss"]
    return {"train_seconds": round(seconds, 1), "segments": segments, "final_train_loss": loss}


@torch.no_grad()
def last_logits(model, inputs: torch.Tensor, recurrent: bool, chunk: int, rows: int) -> torch.Tensor:
    """Logits (B, V) at the last position: chunked prefill carrying the state, or one parallel pass."""
    device = next(model.parameters()).device
    out = []
    for part in inputs.split(rows):
        if recurrent:
            logits, _ = model.prefill(list(part), chunk_size=chunk)
        else:
            logits = model(part.to(device), logits_to_keep=1).logits[:, -1].float()
        out.append(logits.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def recurrence_check(model, task, length: int) -> float:
    """Largest |difference| of the last logits: parallel pass vs chunked prefill vs token-by-token steps."""
    device = next(model.parameters()).device
    ids = task.batch("val", 0, 4, length).inputs.to(device)
    parallel = model(ids).logits[:, -1].float()
    chunked, _ = model.prefill(list(ids), chunk_size=max(1, length // 3))
    state = model.init_state(ids.shape[0], device=device)
    for token in ids.unbind(1):
        logits, state = model.step(token, state)
    return max(float((parallel - chunked).abs().max()), float((parallel - logits.float()).abs().max()))


@torch.no_grad()
def distance_sweep(model, task, length: int, distances, examples: int, recurrent: bool) -> list:
    """Accuracy vs the distance from the body's trigger to the final one, at a fixed ``length``: the test
    split's sequences with their trigger moved to ``length - 1 - d`` (its old place refilled with the token
    that now sits at the new one). A model that forgets the key after a number of steps fails from that
    distance on whatever the length; one that a long prefix disturbs fails at short distances too."""
    rows = []
    for d in distances:
        if not 1 <= d <= length - 3:
            continue
        batch = task.batch("test", 0, examples, length)
        x = batch.inputs.clone()
        old = (x[:, :-1] == task.trigger).int().argmax(1)
        new = length - 1 - d
        rows_idx = torch.arange(x.shape[0])
        x[rows_idx, old] = x[rows_idx, new]
        x[:, new] = task.trigger
        key = x[:, new + 1]
        logits = last_logits(model, x, recurrent, min(length, 2 ** 16), rows=max(1, min(examples, 2 ** 21 // length)))
        rows.append({"distance": d, "accuracy": float((logits[:, :VOCAB].argmax(-1) == key).float().mean())})
    return rows


def run_induction(args, device: torch.device) -> dict:
    lengths = [2 ** k for k in range(6, args.max_log2 + 1)]
    task_kwargs = {"vocab_size": VOCAB, "length": args.length, "seed": args.seed}
    results = {}
    for name in args.models:
        print(f"\n== {name} ==", flush=True)
        plain = make_task("induction_heads", **task_kwargs)
        # the curriculum's switch depends on the planned steps
        steps, step_s = planned_steps(args, _preset_spec(name), plain, device)
        switch = int(args.warmup_fraction * steps)
        task = Curriculum(plain, [(args.short_length, switch)])
        result, steps, run, summary = train_model(args, "paper_scale_induction", name, "induction_heads",
                                                  task_kwargs, task, steps, step_s=step_s, eval_batches=8)
        model = result.model.eval()
        at_train = result.final_metrics.get("val_accuracy")
        check = recurrence_check(model, task, 256) if name not in SSMS_NOT else None
        rows, note, per_example, previous = [], None, None, None
        for length in lengths:
            n = max(16, min(args.examples, 2 ** 19 // length))
            if name in SSMS_NOT and per_example is not None:
                predicted = per_example * (length / previous) ** 2 * n
                if predicted > args.attention_limit:
                    note = f"stopped before L={length}: predicted {predicted:.0f} s > {args.attention_limit:.0f} s"
                    print(f"  [{name}] {note}", flush=True)
                    break
            batch = task.batch("test", 0, n, length)
            _sync(device)
            start = time.perf_counter()
            recurrent = name not in SSMS_NOT
            chunk = min(length, args.chunk)
            logits = last_logits(model, batch.inputs, recurrent, chunk,
                                 rows=max(1, min(n, args.tokens_at_once // chunk)))
            _sync(device)
            seconds = time.perf_counter() - start
            accuracy = float((logits[:, :VOCAB].argmax(-1) == batch.targets[:, -1]).float().mean())
            per_example, previous = seconds / n, length
            rows.append({"length": length, "accuracy": accuracy, "examples": n, "seconds": round(seconds, 2),
                         "mode": "recurrent (chunked prefill)" if recurrent else "parallel"})
            print(f"  [{name}] L={length:>8}: accuracy {accuracy:.3f} on {n} examples ({seconds:.1f} s)", flush=True)
        results[name] = {"params": result.num_parameters, "steps": steps, "short_steps": switch,
                         "ms_per_step": round(step_s * 1e3, 2) if step_s else None,
                         "resumed_from": str(result.resumed_from) if result.resumed_from else None,
                         **summary,
                         "accuracy_at_train_length": at_train, "test": rows, "stopped": note,
                         "recurrence_check_max_abs_diff": check, "config": run.to_dict()}
        if args.distance_length:
            sweep = distance_sweep(model, task, args.distance_length, DISTANCES, min(args.examples, 64),
                                   name not in SSMS_NOT)
            results[name]["distance_sweep"] = {"length": args.distance_length, "rows": sweep}
            print(f"  [{name}] at L={args.distance_length}, accuracy by trigger-to-query distance: "
                  + ", ".join(f"{r['distance']}: {r['accuracy']:.2f}" for r in sweep), flush=True)
    headers = ["model", "params", "steps", f"acc@{args.length}"] + [f"2^{int(math.log2(L))}" for L in lengths]
    table = []
    for name, r in results.items():
        by_length = {row["length"]: row["accuracy"] for row in r["test"]}
        table.append([name, f"{r['params']:,}", r["steps"], r["accuracy_at_train_length"]]
                     + [by_length.get(L, "-") for L in lengths])
    return {"results": results, "table": markdown_table(headers, table), "test_lengths": lengths}


def run_copying(args, device: torch.device) -> dict:
    task_kwargs = {"vocab_size": VOCAB, "length": args.length, "num_tokens": args.num_tokens, "seed": args.seed}
    results = {}
    for name in args.models:
        print(f"\n== {name} ==", flush=True)
        plain = make_task("selective_copying", **task_kwargs)
        steps, step_s = planned_steps(args, _preset_spec(name), plain, device)
        stages = parse_curriculum(args.curriculum, steps) if args.curriculum else []
        task = Curriculum(plain, stages) if stages else plain
        result, steps, run, summary = train_model(args, "paper_scale_copying", name, "selective_copying",
                                                  task_kwargs, task, steps, step_s=step_s, eval_batches=16,
                                                  eval_split="test")
        metrics = result.final_metrics
        results[name] = {"params": result.num_parameters, "steps": steps,
                         "curriculum": [{"length": length, "until_step": until} for length, until in stages],
                         "ms_per_step": round(step_s * 1e3, 2) if step_s else None,
                         "resumed_from": str(result.resumed_from) if result.resumed_from else None,
                         **summary,
                         "test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"],
                         "config": run.to_dict()}
        print(f"[{name}] test accuracy {metrics['test_accuracy']:.4f}", flush=True)
    table = markdown_table(["model", "params", "steps", "train s", "test accuracy"],
                           [[n, f"{r['params']:,}", r["steps"], f"{r['train_seconds']:.0f}", r["test_accuracy"]]
                            for n, r in results.items()])
    return {"results": results, "table": table}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("induction", "copying"))
    parser.add_argument("--models", nargs="+", default=None,
                        help="presets or registered mixers (induction: mamba mamba2 transformer; copying: mamba "
                             "s4d mamba2 transformer)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of training per model")
    parser.add_argument("--steps", type=int, default=None,
                        help="fixed steps per model instead of --budget (for a GPU shared with other jobs)")
    parser.add_argument("--curriculum", default="",
                        help="copying: shorter training lengths first, LENGTH:FRACTION,... of the steps "
                             "(e.g. 256:0.1,1024:0.1); the rest at --length")
    parser.add_argument("--runs-dir", default=None, help="where the training runs go (outputs/experiments)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: final only)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each model from the newest checkpoint in its run directory, if any")
    parser.add_argument("--length", type=int, default=None, help="training length (induction 256, copying 4096)")
    parser.add_argument("--batch-size", type=int, default=None, help="induction 32, copying 16")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="AdamW weight decay of the matrices (never on A, D or the dt bias; ssmkit.train.optim): "
                             "induction 0 (with 0.1 Mamba forgets the key sooner), copying 0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short-length", type=int, default=64, help="induction: curriculum's first length")
    parser.add_argument("--warmup-fraction", type=float, default=0.2,
                        help="induction: fraction of the steps trained at --short-length")
    parser.add_argument("--max-log2", type=int, default=20)
    parser.add_argument("--examples", type=int, default=256, help="induction: examples per test length (at most)")
    parser.add_argument("--distance-length", type=int, default=4096,
                        help="induction: length of the trigger-to-query distance sweep (0: none)")
    parser.add_argument("--chunk", type=int, default=2 ** 16, help="induction: prefill chunk at test time")
    parser.add_argument("--tokens-at-once", type=int, default=2 ** 21,
                        help="induction: rows read together at test time x chunk")
    parser.add_argument("--attention-limit", type=float, default=30.0)
    parser.add_argument("--num-tokens", type=int, default=16, help="copying: data tokens to copy")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (cpu device)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny budget and lengths")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    induction = args.task == "induction"
    args.models = args.models or (["mamba", "mamba2", "transformer"] if induction
                                  else ["mamba", "s4d", "mamba2", "transformer"])
    args.length = args.length or (256 if induction else 4096)
    args.batch_size = args.batch_size or (32 if induction else 16)
    if args.weight_decay is None:
        args.weight_decay = 0.0 if induction else 0.1
    if args.quick:
        args.budget, args.max_log2, args.examples = 3.0, 9, 16
        args.distance_length = min(args.distance_length, 512)
        args.length = min(args.length, 64 if induction else 128)
        args.short_length = 32
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False; use --device cpu (with --quick)")
    machine = setup(args.threads or torch.get_num_threads())
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    started = time.perf_counter()
    device = torch.device(args.device)
    payload = run_induction(args, device) if induction else run_copying(args, device)
    print("\n" + payload["table"])
    name = f"paper_scale_{args.task}"
    out = args.out or str(Path(__file__).resolve().parent / "results" / f"{name}.json")
    write_results(name, {"experiment": name, "machine": machine, "args": vars(args), **payload,
                         "published": PUBLISHED[args.task], "total_seconds": round(time.perf_counter() - started, 1)},
                  out)
    print(f"written {out}")


if __name__ == "__main__":
    main()
