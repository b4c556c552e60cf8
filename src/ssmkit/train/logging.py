"""What a training run reports: a progress bar, metrics.jsonl, PNG curves and (optionally) TensorBoard.

* Progress bar on stderr: step, loss, tokens/s and ETA (tqdm when installed, else a one-line bar).
* ``out_dir/metrics.jsonl``: one JSON object per event, appended and flushed as it happens, so a crashed
  run keeps its log. Events: ``start`` (threads, device, world size, parameters, versions), ``train`` (every
  ``log_every`` steps: mean loss over the window, lr, gradient norm, tokens/s), ``eval`` (split, length,
  the task's metrics), ``checkpoint``, ``resume``, ``diverged`` and ``end``. A resumed run appends; readers
  keep the last record of each (event, step, length), which is what :func:`read_metrics` returns.
* ``out_dir/curves.png``: train/eval loss and eval accuracy (or MSE) against the step (matplotlib, Agg).
* ``out_dir/tensorboard/``: the same scalars, when ``torch.utils.tensorboard`` imports (never required).

Only rank 0 logs (``enabled=False`` on the others).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class SimpleProgress:
    """A one-line progress bar on stderr for machines without tqdm (redrawn at most every 0.5 s)."""

    def __init__(self, total: int, initial: int = 0, stream=None, width: int = 24):
        self.total, self.n, self.width = total, initial, width
        self.stream = stream or sys.stderr
        self.start_n, self.start_time, self.last_draw = initial, time.perf_counter(), 0.0
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last_draw >= 0.5 or self.n >= self.total:
            self.last_draw = now
            self._draw(now)

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def _draw(self, now: float) -> None:
        done = self.n / max(1, self.total)
        filled = int(round(self.width * done))
        rate = (self.n - self.start_n) / max(1e-9, now - self.start_time)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.n}/{self.total} [{bar}] {self.postfix} ETA {_format_duration(eta)}")
        self.stream.flush()

    def write(self, text: str) -> None:
        self.stream.write("\r" + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class RunLogger:
    """Progress bar, JSONL metrics and TensorBoard for one run (module docstring)."""

    def __init__(self, out_dir: Path, *, enabled: bool = True, total_steps: int = 0, start_step: int = 0,
                 progress: bool = True, tensorboard: bool = True, append: bool = False):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self._file = None
        self._bar = None
        self._writer = None
        self.tensorboard_dir: Optional[Path] = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if append:
            _drop_partial_last_line(self.path)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")
        if progress:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, dynamic_ncols=True,
                                 unit="step", mininterval=0.5)
            except ImportError:
                self._bar = SimpleProgress(total_steps, start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: the JSONL file has the same numbers
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tensorboard_dir = self.out_dir / "tensorboard"
                self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir))

    # ----------------------------------------------------------------------------------------------
    def log(self, record: Dict[str, Any]) -> None:
        """Append one event to metrics.jsonl (and its numbers to TensorBoard)."""
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        self._file.flush()
        if self._writer is not None and "step" in record:
            event = record.get("event", "log")
            if event in ("train", "eval"):
                tag = event if event == "train" else f"{record.get('split', 'eval')}@{record.get('length')}"
                for key, value in record.items():
                    if key not in ("step", "length", "count") and isinstance(value, (int, float)) \
                            and not isinstance(value, bool):
                        self._writer.add_scalar(f"{tag}/{key}", value, record["step"])

    def progress(self, steps: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix_str(f"loss {loss:.4g}, {tokens_per_s:,.0f} tok/s", refresh=False)
        self._bar.update(steps)

    def message(self, text: str) -> None:
        """A line on stderr that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _jsonable(value):
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; "nan" keeps the line parseable
    if isinstance(value, Path):
        return str(value)
    return value


def _drop_partial_last_line(path: Path) -> None:
    """A process killed while writing a record leaves a last line without its newline; a resumed run would
    glue its first record onto it. Cut the file back to its last complete line."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


# --------------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The events of a metrics.jsonl file, keeping the last record of each (event, step, split, length):
    a resumed run re-logs the steps after its checkpoint, and the later records are the ones that count."""
    path = Path(path)
    latest: Dict[tuple, Dict[str, Any]] = {}
    order: List[tuple] = []
    damaged = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged.append(number)  # e.g. two processes wrote one file, or a crash cut a line
            continue
        if not isinstance(record, dict):
            damaged.append(number)
            continue
        key = (record.get("event"), record.get("step"), record.get("split"), record.get("length"))
        if key not in latest:
            order.append(key)
        latest[key] = record
    if damaged:
        warnings.warn(f"{path}: skipped {len(damaged)} line(s) that are not JSON records (lines "
                      f"{damaged[:5]}{' ...' if len(damaged) > 5 else ''})", stacklevel=2)
    return [latest[k] for k in order]


def plot_curves(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """Loss (train and eval) and eval accuracy or MSE against the step, one line per eval length; returns
    the PNG path, or None when matplotlib is not installed (then nothing is drawn)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = sorted((r["step"], r["loss"]) for r in records if r.get("event") == "train"
                   and isinstance(r.get("loss"), (int, float)))
    evals: Dict[tuple, List[tuple]] = {}
    for r in records:
        if r.get("event") == "eval":
            evals.setdefault((r.get("split"), r.get("length")), []).append(r)
    score_key = "accuracy" if any("accuracy" in r for rs in evals.values() for r in rs) else "mse"
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train", lw=1)
    for (split, length), rs in sorted(evals.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
        rs = sorted(rs, key=lambda r: r["step"])
        label = f"{split} L={length}"
        points = [(r["step"], r["loss"]) for r in rs if isinstance(r.get("loss"), (int, float))]
        if points:
            ax_loss.plot(*zip(*points), marker="o", ms=3, label=label)
        points = [(r["step"], r[score_key]) for r in rs if isinstance(r.get(score_key), (int, float))]
        if points:
            ax_score.plot(*zip(*points), marker="o", ms=3, label=label)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_score.set(xlabel="step", ylabel=score_key, title=f"eval {score_key}")
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if train and all(v > 0 for _, v in train):
        ax_loss.set_yscale("log")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
