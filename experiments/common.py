"""Helpers shared by the reproduction scripts in ``experiments/``.

Each script trains a few models of similar size on one task for a fixed wall-clock budget, evaluates them
and writes ``experiments/results/<name>.json`` (plus a PNG where a curve says more than a table). This
module holds what they have in common:

* :func:`parse_args` - the shared command line (``--budget`` seconds of training per model, ``--threads``,
  ``--models``, ``--out``);
* :func:`setup` - threads, denormal flushing and a description of the machine, recorded in every result;
* :func:`preset` - the model presets of ``ssmkit compare`` (d_model 64, 2 layers, similar parameter
  counts), so that the experiments and the main job compare the same networks;
* :func:`train_for_budget` - times a few steps, sizes ``train.steps`` to the budget (the cosine schedule
  must know its end) and calls :func:`ssmkit.train.train`;
* :func:`markdown_table`, :func:`write_results` - the printed table and the JSON file.

Training runs (checkpoints, metrics.jsonl, curves) go under ``outputs/experiments/<name>/<model>``, which
git ignores; only the small JSON and PNG summaries under ``experiments/results`` are meant to be kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "experiments" / "results"
RUNS_DIR = REPO / "outputs" / "experiments"

if str(REPO / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

from ssmkit.compare import _preset_spec  # noqa: E402
from ssmkit.train import ModelSpec, RunConfig, TaskSpec, TrainConfig, TrainResult, forward_batch, model_config_for, train  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Command line and machine
# --------------------------------------------------------------------------------------------------
def parse_args(doc: str, default_budget: float, default_models: Sequence[str],
               extra: Optional[Callable] = None) -> argparse.Namespace:
    """The shared options; ``extra(parser)`` adds a script's own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=default_budget,
                        help=f"seconds of training per model (default {default_budget:g})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--models", nargs="+", default=list(default_models),
                        help=f"which models (default: {' '.join(default_models)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="result JSON (default experiments/results/<name>.json)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds; got {args.budget}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    return args


def setup(threads: int) -> Dict[str, Any]:
    """Set torch's threads and flush denormals; return a description of the machine for the results."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny state values in the scans otherwise run ~6x slower on CPUs
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import ssmkit

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "ssmkit": ssmkit.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}


# --------------------------------------------------------------------------------------------------
# Models and training
# --------------------------------------------------------------------------------------------------
def preset(name: str, **overrides) -> ModelSpec:
    """The ``ssmkit compare`` model ``name`` (d_model 64, 2 layers unless the preset says otherwise): a preset,
    or any registered mixer at its default sizes; with ModelSpec fields overridden."""
    return replace(_preset_spec(name), **overrides)


def seconds_per_step(task, spec: ModelSpec, batch_size: int, repeats: int = 4, seed: int = 0,
                     device: str = "cpu") -> float:
    """Median wall time of one optimiser step (forward, loss, backward, AdamW) of a fresh model on ``device``.

    The first step is not counted (it builds caches, e.g. the compiled scan); on a GPU each step is timed
    to the end of its kernels (synchronised)."""
    from ssmkit.models import from_config

    torch.manual_seed(seed)
    model = from_config(model_config_for(task, spec)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 1):
        batch = task.batch("train", 10_000_000 + i, batch_size).to(device)
        sync()
        start = time.perf_counter()
        task.loss(forward_batch(model, batch).logits, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def train_for_budget(experiment: str, label: str, task_name: str, task_kwargs: Dict[str, Any], spec: ModelSpec,
                     budget: float, *, batch_size: int, lr: float, threads: int, seed: int = 0,
                     weight_decay: float = 0.1, warmup_fraction: float = 0.1, min_steps: int = 20,
                     max_steps: Optional[int] = None, eval_batches: int = 4, eval_batch_size: Optional[int] = None,
                     eval_split: str = "val", eval_lengths: Sequence[int] = (), task=None,
                     steps: Optional[int] = None, device: str = "cpu", **train_overrides) -> Dict[str, Any]:
    """Train ``spec`` on the task for about ``budget`` seconds and return a summary with the result.

    The step count is ``budget / seconds_per_step`` measured just before (at least ``min_steps``, at most
    ``max_steps``), or ``steps`` when given (then ``budget`` is only reported); warm-up is
    ``warmup_fraction`` of it, then cosine decay; both the probe and the run are on ``device``. The run writes its logs and
    final checkpoint to ``outputs/experiments/<experiment>/<label>`` (replaced if present).

    Returns a dict: ``result`` (the :class:`~ssmkit.train.TrainResult`, with ``.model``), ``steps``,
    ``step_seconds`` (the probe), ``wall_seconds`` (of the whole call) and ``run`` (the RunConfig).
    """
    from ssmkit.tasks import make_task

    started = time.perf_counter()
    if task is None:
        task = make_task(task_name, **task_kwargs)
    if steps is None:
        step_s = seconds_per_step(task, spec, batch_size, seed=seed, device=device)
        steps = max(min_steps, int(budget / step_s))
        if max_steps is not None:
            steps = min(steps, max_steps)
    else:
        step_s = budget / steps
    out_dir = RUNS_DIR / experiment / label
    if out_dir.exists():
        shutil.rmtree(out_dir)  # our own earlier run of this script
    run = RunConfig(task=TaskSpec(name=task_name, kwargs=dict(task_kwargs)), model=spec,
                    train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                      warmup_steps=max(1, int(steps * warmup_fraction)), eval_every=0,
                                      eval_batches=eval_batches, eval_batch_size=eval_batch_size,
                                      eval_split=eval_split, eval_lengths=list(eval_lengths), checkpoint_every=0,
                                      out_dir=str(out_dir), seed=seed, threads=threads, device=device,
                                      progress=False, tensorboard=False, log_every=max(1, steps // 20),
                                      **train_overrides))
    print(f"[{label}] {step_s * 1e3:.0f} ms/step -> {steps} steps of batch {batch_size} "
          f"(~{steps * step_s:.0f} s)", flush=True)
    result: TrainResult = train(run, task=task)
    wall = time.perf_counter() - started
    print(f"[{label}] {result.num_parameters:,} parameters, trained {result.train_seconds:.0f} s "
          f"({result.tokens_per_second:,.0f} tokens/s), final loss {result.losses[-1]:.4f}", flush=True)
    return {"result": result, "steps": steps, "step_seconds": step_s, "wall_seconds": wall, "run": run}


def run_summary(trained: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON-able part of :func:`train_for_budget`'s return value."""
    result: TrainResult = trained["result"]
    losses = result.losses
    tail = losses[-max(1, len(losses) // 20):]
    return {"params": result.num_parameters, "steps": trained["steps"], "train_seconds": round(result.train_seconds, 1),
            "wall_seconds": round(trained["wall_seconds"], 1), "tokens_per_s": round(result.tokens_per_second),
            "final_train_loss": round(sum(tail) / len(tail), 4), "config": trained["run"].to_dict()}


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table; floats are shown with 3 decimals."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: Dict[str, Any], out: Optional[str] = None) -> Path:
    """Write ``payload`` as JSON to ``out`` or ``experiments/results/<name>.json`` (atomically)."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")
    return path


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_figure(fig, name: str, out: Optional[str] = None) -> Path:
    """Save a matplotlib figure as ``experiments/results/<name>.png``, or beside ``out`` (the result JSON
    given with ``--out``) with its stem (small: 90 dpi)."""
    path = Path(out).with_suffix(".png") if out else RESULTS_DIR / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def elapsed(start: float) -> str:
    return f"{time.perf_counter() - start:.0f} s"


def list_models(requested: List[str], allowed: Sequence[str]) -> List[str]:
    unknown = [m for m in requested if m not in allowed]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}: choose from {list(allowed)}")
    return requested
