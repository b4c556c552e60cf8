"""``ssmkit compare``: the main job. Several architectures, one task, one table.

With no arguments it trains a Transformer, S4D, Mamba, Mamba-2 and a Mamba/attention hybrid of similar
size on induction heads at length 32 for the same wall-clock budget each, then measures, in the same run:
parameters, accuracy at the training length and at longer lengths (the recurrent models read the long
sequences exactly as they were trained to; attention meets positions it never saw), training tokens/s,
inference memory at a long context (the state each model carries: constant for SSMs, growing for
attention) and decode time per token at that context. It prints the table and writes a report
(markdown + PNG + JSON) under ``--out``.

Every number comes from this run on this machine; nothing is copied from elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .layers import MIXERS
from .models import from_config
from .train import ModelSpec, RunConfig, TaskSpec, TrainConfig, evaluate, forward_batch, model_config_for, train
from .utils.configs import load_config
from .utils.process import process_settings

D_MODEL = 64
#: architectures of similar parameter count (d_model 64, 2 layers); SSM-only blocks carry no MLP as in Mamba,
#: attention and S4D blocks get a gated MLP as in their papers' stacks.
PRESETS: Dict[str, Dict] = {
    "transformer": dict(mixer="attention", mixer_kwargs={"attention": {"n_heads": 4}}, mlp="gated", mlp_hidden=128),
    "s4d": dict(mixer="s4d", mixer_kwargs={"s4d": {"d_state": 64}}, mlp="gated", mlp_hidden=96),
    "mamba": dict(mixer="mamba", mixer_kwargs={"mamba": {"d_state": 16}}),
    "mamba2": dict(mixer="mamba2", mixer_kwargs={"mamba2": {"d_state": 32, "headdim": 16, "chunk_size": 64}}),
    "hybrid": dict(mixer="MA", mixer_kwargs={"mamba": {"d_state": 16}, "attention": {"n_heads": 4}}),
    # Griffin (De et al. 2024): two RG-LRU recurrent blocks to one local (sliding-window) multi-query attention
    # layer, each with a gated MLP of expansion 3, as configs/griffin.yaml; three layers to keep the 2:1 ratio
    "griffin": dict(n_layers=3, mixer="HHA", mixer_kwargs={"hawk": {"n_heads": 4},
                                                           "attention": {"n_heads": 4, "n_kv_heads": 1, "window": 16}},
                    mlp="gated", mlp_hidden=192),
}
#: what ``ssmkit compare`` runs when no --models are given (griffin, three layers with MLPs, is on request)
DEFAULT_MODELS = ("transformer", "s4d", "mamba", "mamba2", "hybrid")
DEFAULT_TASKS = {
    "induction_heads": dict(kwargs={}, length=32, eval_lengths=[64, 256, 1024], lr=3e-3),
    "selective_copying": dict(kwargs={"num_tokens": 8}, length=128, eval_lengths=[256], lr=3e-3),
    "mqar": dict(kwargs={"vocab_size": 256, "num_kv_pairs": 8}, length=64, eval_lengths=[128], lr=3e-3),
    "string_copy": dict(kwargs={"vocab_size": 32}, length=32, eval_lengths=[64], lr=3e-3),
}
#: the honest-limits presets (experiments/limits.py; README "When not to use an SSM"): tasks where a fixed
#: state is known to fall short of attention. ``--task <name>`` trains the underlying ``task`` with these
#: settings. Zoology (Arora et al. 2023, arXiv 2312.04927) for recall with many keys; "Repeat After Me"
#: (Jelassi et al. 2024, arXiv 2402.01032) for copying a string longer than the state holds; a needle in a
#: haystack of bytes (RULER, Hsieh et al. 2024, arXiv 2404.06654, at byte-model scale) for one fact kept
#: through a long context.
LIMIT_TASKS = {
    "limits_mqar_few_keys": dict(task="mqar", kwargs={"vocab_size": 512, "num_kv_pairs": 4}, length=128,
                                 eval_lengths=[], lr=3e-3),
    "limits_mqar_many_keys": dict(task="mqar", kwargs={"vocab_size": 512, "num_kv_pairs": 32}, length=128,
                                  eval_lengths=[], lr=3e-3),
    "limits_copy_short": dict(task="string_copy", kwargs={"vocab_size": 32}, length=16, eval_lengths=[],
                              lr=3e-3),
    "limits_copy_long": dict(task="string_copy", kwargs={"vocab_size": 32}, length=128, eval_lengths=[],
                             lr=3e-3),
    # a 4-letter key = 4-digit value line at a random depth of bytes-LM filler, read back after a query
    # (ssmkit.tasks.needle); trained and scored at one context length, as in experiments/limits.py --needle
    "limits_needle_short": dict(task="needle_haystack", kwargs={"key_len": 4, "value_len": 4}, length=128,
                                eval_lengths=[], lr=3e-3),
    "limits_needle_long": dict(task="needle_haystack", kwargs={"key_len": 4, "value_len": 4}, length=1024,
                               eval_lengths=[], lr=3e-3),
}


def _preset_spec(name: str) -> ModelSpec:
    """A named preset, any registered mixer (two layers of it at its default sizes, no MLP), or a run config
    file (``configs/jamba.yaml``: the ``model`` section, at the file's own sizes)."""
    if name.endswith((".yaml", ".yml", ".json")):
        if not Path(name).is_file():
            raise ValueError(f"model config file {name!r} does not exist (a --models entry ending in "
                             f"{Path(name).suffix} names a run config such as configs/jamba.yaml)")
        return load_config(RunConfig, name).model
    if name in PRESETS:
        return ModelSpec(**{"d_model": D_MODEL, "n_layers": 2, **PRESETS[name]})
    if name in MIXERS:
        return ModelSpec(d_model=D_MODEL, n_layers=2, mixer=name)
    import difflib

    choices = sorted(set(PRESETS) | set(MIXERS))
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown model {name!r} for compare: choose a preset or a registered mixer from "
                     f"{choices}{hint}")


def _seconds_per_step(model, task, batch_size: int, length: int) -> float:
    """Time a few optimiser steps to size the run to the budget (the schedule then knows its end)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = task.batch("train", 10_000_000, batch_size, length)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        out = forward_batch(model, batch)
        task.loss(out.logits, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _state_bytes(state) -> int:
    return sum(v.numel() * v.element_size() for layer in state for v in layer.values())


@torch.no_grad()
def _inference_cost(model, vocab: int, context: int, decode_steps: int = 32) -> Dict[str, float]:
    """State size after reading ``context`` tokens, and decode time per token from there."""
    model.eval()
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    _, state = model.prefill(list(ids), chunk_size=1024)
    token = torch.zeros(1, dtype=torch.long)
    for _ in range(3):
        model.step(token, state)
    start = time.perf_counter()
    for _ in range(decode_steps):
        logits, state = model.step(token, state)
        token = logits.argmax(-1)
    per_token = (time.perf_counter() - start) / decode_steps
    return {"state_mb": _state_bytes(state) / 2**20, "decode_ms": per_token * 1e3}


def run_compare(task: Optional[str] = None, models: Optional[Sequence[str]] = None, length: Optional[int] = None,
                budget: Optional[float] = None, out: str = "outputs/compare", threads: Optional[int] = None,
                seed: int = 0, eval_lengths: Optional[Sequence[int]] = None, overrides: Sequence[str] = (),
                context: int = 4096, batch_size: int = 32) -> List[Dict]:
    task_name = task or "induction_heads"
    if task_name in LIMIT_TASKS:
        defaults = LIMIT_TASKS[task_name]
        task_name = defaults["task"]
    else:
        defaults = DEFAULT_TASKS.get(task_name, dict(kwargs={}, length=None, eval_lengths=[], lr=3e-3))
    names = list(models or DEFAULT_MODELS)
    budget = 40.0 if budget is None else float(budget)
    threads = threads or 1
    with process_settings(threads=threads, flush_denormal=True):  # restored on return, as train() does
        return _run_compare(task_name, defaults, names, length, budget, out, threads, seed, eval_lengths,
                            overrides, context, batch_size)


def _run_compare(task_name, defaults, names, length, budget, out, threads, seed, eval_lengths, overrides,
                 context, batch_size) -> List[Dict]:
    out_dir = Path(out)
    runs_dir = out_dir / "runs"
    if runs_dir.exists():
        shutil.rmtree(runs_dir)  # our own earlier output: each compare starts fresh
    out_dir.mkdir(parents=True, exist_ok=True)

    from .tasks import make_task

    task_obj = make_task(task_name, **defaults["kwargs"])
    train_length = length or defaults["length"] or task_obj.default_length
    lengths = sorted({int(v) for v in (eval_lengths if eval_lengths is not None else defaults["eval_lengths"])
                      if int(v) != train_length})
    print(f"ssmkit compare: task {task_name}, train length {train_length}, eval lengths {lengths}, "
          f"{budget:.0f} s of training per model, {threads} thread(s), torch {torch.__version__}")
    rows = []
    for entry in names:
        spec = _preset_spec(entry)
        name = Path(entry).stem if entry.endswith((".yaml", ".yml", ".json")) else entry  # configs/jamba.yaml: jamba
        run = RunConfig(task=TaskSpec(name=task_name, kwargs=dict(defaults["kwargs"], length=train_length)
                                      if "length" in _task_kwargs(task_obj) else dict(defaults["kwargs"])),
                        model=spec,
                        train=TrainConfig(steps=1, batch_size=batch_size, lr=defaults["lr"], warmup_steps=0,
                                          eval_every=0, eval_batches=4, eval_lengths=lengths, checkpoint_every=0,
                                          out_dir=str(runs_dir / name), seed=seed, threads=threads, log_every=25,
                                          weight_decay=0.1, device="cpu"))
        if overrides:
            run = load_config(RunConfig, None, overrides, base=asdict(run))
        torch.manual_seed(seed)
        probe = from_config(model_config_for(task_obj, run.model))
        step_s = _seconds_per_step(probe, task_obj, batch_size, train_length)
        steps = max(20, int(budget / step_s))
        run.train.steps = steps
        run.train.warmup_steps = max(1, steps // 10)
        print(f"\n[{name}] {probe.num_parameters():,} parameters, {step_s * 1e3:.0f} ms/step -> {steps} steps")
        del probe
        result = train(run)
        model = result.model
        acc = {train_length: result.final_metrics.get("val_accuracy", float("nan"))}
        for L in lengths:
            acc[L] = evaluate(model, task_obj, split="val", batches=2, batch_size=16, length=L).get("accuracy")
        cost = _inference_cost(model, task_obj.vocab_size, context)
        rows.append(dict(model=name, mixers="".join(spec.mixer) if isinstance(spec.mixer, list) else spec.mixer,
                         params=result.num_parameters, steps=steps, train_seconds=result.train_seconds,
                         tokens_per_s=result.tokens_per_second, accuracy={str(k): v for k, v in acc.items()},
                         context=context, **cost))
        print(f"[{name}] accuracy " + ", ".join(f"L={k}: {v:.3f}" for k, v in acc.items())
              + f"; state at {context} tokens {cost['state_mb']:.2f} MB; decode {cost['decode_ms']:.2f} ms/token")
    _report(rows, task_name, train_length, [train_length] + lengths, out_dir, threads, budget)
    return rows


def _task_kwargs(task_obj) -> set:
    import inspect

    from .tasks import TASKS

    factory = TASKS[task_obj.name]
    return set(inspect.signature(factory).parameters)


def _table(rows, lengths) -> List[str]:
    head = ["model", "params", "steps", "train tok/s"] + [f"acc@{L}" for L in lengths] + \
        [f"state MB @{rows[0]['context']}", "decode ms/tok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['params']:,}", str(r["steps"]), f"{r['tokens_per_s']:,.0f}"]
        cells += [f"{r['accuracy'][str(L)]:.3f}" for L in lengths]
        cells += [f"{r['state_mb']:.3f}", f"{r['decode_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _report(rows, task_name, train_length, lengths, out_dir: Path, threads: int, budget: float) -> None:
    from . import __version__

    table = _table(rows, lengths)
    print("\n" + "\n".join(table))
    md = [f"# ssmkit compare: {task_name}", "",
          f"Trained at length {train_length} for about {budget:.0f} s each on {threads} CPU thread(s); "
          f"ssmkit {__version__}, torch {torch.__version__}, {os.cpu_count()} cores. Accuracy at longer lengths "
          "reads sequences longer than any seen in training.", ""] + table + ["", "![compare](compare.png)", ""]
    _atomic_write(out_dir / "report.md", "\n".join(md))
    _atomic_write(out_dir / "results.json", json.dumps(dict(task=task_name, train_length=train_length,
                                                            threads=threads, rows=rows), indent=2))
    try:
        _plot(rows, lengths, out_dir / "compare.png")
    except ImportError:
        print("matplotlib is not installed: no compare.png (pip install ssmkit[plot])")
    print(f"\nreport: {out_dir / 'report.md'}, {out_dir / 'compare.png'}")


def _plot(rows, lengths, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for r in rows:
        axes[0].plot(lengths, [r["accuracy"][str(L)] for L in lengths], marker="o", label=r["model"])
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("sequence length (trained at the first)")
    axes[0].set_ylabel("accuracy")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    axes[0].set_title("length generalisation")
    names = [r["model"] for r in rows]
    axes[1].bar(names, [r["tokens_per_s"] for r in rows], color="C0")
    axes[1].set_title("training tokens/s")
    axes[2].bar(names, [r["state_mb"] for r in rows], color="C1")
    axes[2].set_title(f"inference state (MB) at {rows[0]['context']} tokens")
    for ax in axes[1:]:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
