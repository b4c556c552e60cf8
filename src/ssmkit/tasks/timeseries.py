"""Real time series that ship inside Python packages: UCR/UEA classification sets and classic forecasting
series, read from the installed wheels' own files (never downloaded; nothing here opens a socket).

Where the data comes from (the ``timeseries`` extra, ``pip install 'ssmkit[timeseries]'``):

* aeon (``aeon/datasets/data/``): the UCR/UEA classification sets ItalyPowerDemand (length 24, 2 classes),
  GunPoint (150, 2), ArrowHead (251, 3), OSULeaf (427, 6), ACSF1 (1460, 10) and the multivariate BasicMotions
  (6 channels x 100, 4 classes), with their official train/test splits (Dau et al. 2019, "The UCR time
  series archive", arXiv 1810.07758; Bagnall et al. 2018, the UEA multivariate archive, arXiv 1811.00075),
  and the monthly airline passengers series (Box & Jenkins 1976, 144 months).
* statsmodels (``statsmodels/datasets/``): weekly Mauna Loa CO2 (1958-2001, 2284 weeks; 59 missing weeks
  filled by linear interpolation) and yearly sunspot numbers (1700-2008).

The files are located with ``importlib.util.find_spec``, which finds a package without importing it (aeon's
import compiles numba code), and parsed here (the ``.ts`` format: ``@`` header lines, then one case per line,
channels separated by ``:``, values by ``,``, the class label last).

Two tasks:

``ucr`` (classification)
    inputs (B, L, channels) float32, each series z-normalised per channel (the archive's convention; most
    sets already are); targets (B,) int64, class labels in sorted order mapped to 0..C-1. Splits: the
    official TRAIN file is "train" (minus a held-out "val" fraction when ``val_fraction`` > 0), the official
    TEST file is "test". With the default ``val_fraction=0`` the "val" split is empty: evaluate on "test",
    as the archive's published accuracies do (no tuning on it).

``forecast`` (regression, multi-horizon)
    A window of ``context`` past values -> the next ``horizon`` values. inputs (B, context, 1) and targets
    (B, horizon) are scaled per window by the context's own mean and standard deviation (per-series instance
    normalisation, as RevIN does: Kim et al. ICLR 2022), after an optional log. The scale travels with the
    batch (:class:`ForecastBatch`), so :meth:`Forecast.to_original_units` inverts it exactly and the
    metrics are in the series' own units: ``mase`` (the mean absolute error divided by the in-sample
    seasonal-naive MAE of the training part; Hyndman & Koehler 2006), ``smape`` (percent, 0..200, the M4
    definition) and ``mae``. The model's head is the regression head with ``output_dim = horizon`` read at
    the last position: all horizons at once (direct multi-horizon forecasting).
    Splits by time: "test" is the single forecast of the last ``horizon`` points from the ``context`` before
    them (the usual hold-out of the M competitions), "val" the same one horizon earlier, "train" every
    window whose targets end before the "val" targets begin.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .._checks import check_choice
from .base import Batch, Task, check_fraction, check_int, register_task, seeded_generator

EXTRA_HINT = "install the time-series extra: pip install 'ssmkit[timeseries]'"

#: UCR/UEA sets that aeon's wheel ships: name -> (length, channels, classes, train cases, test cases)
UCR_SETS: Dict[str, Tuple[int, int, int, int, int]] = {
    "ItalyPowerDemand": (24, 1, 2, 67, 1029),
    "GunPoint": (150, 1, 2, 50, 150),
    "ArrowHead": (251, 1, 3, 36, 175),
    "OSULeaf": (427, 1, 6, 200, 242),
    "ACSF1": (1460, 1, 10, 100, 100),
    "BasicMotions": (100, 6, 4, 40, 40),
}

#: forecasting series: name -> (package, file inside the package, seasonal period, default horizon, context)
SERIES: Dict[str, Tuple[str, str, int, int, int]] = {
    "airline": ("aeon", "datasets/data/Airline/Airline.csv", 12, 12, 36),
    "co2": ("statsmodels", "datasets/co2/co2.csv", 52, 52, 208),
    "sunspots": ("statsmodels", "datasets/sunspots/sunspots.csv", 11, 11, 66),
}


def package_file(package: str, relative: str) -> Path:
    """The path of ``relative`` inside the installed ``package``, found without importing it.

    Raises ImportError (naming the extra to install) when the package is missing, FileNotFoundError when the
    installed version does not ship the file."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the data of this task ships inside the {package!r} package, which is not installed; "
                          f"{EXTRA_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package (it is expected in the "
                                f"wheel; a different version may have moved it); {EXTRA_HINT}")
    return path


# --------------------------------------------------------------------------------------------------
# Reading the files
# --------------------------------------------------------------------------------------------------
def read_ts_file(path: Path) -> Tuple[np.ndarray, List[str]]:
    """A ``.ts`` file of equal-length cases -> (values (cases, channels, length) float64, labels as strings).

    Missing values (``?``) become NaN."""
    cases, labels = [], []
    in_data = False
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                in_data = line.lower().startswith("@data")
                continue
            *channels, label = line.split(":")
            cases.append([[math.nan if v == "?" else float(v) for v in channel.split(",")] for channel in channels])
            labels.append(label.strip())
    lengths = {len(channel) for case in cases for channel in case}
    if not cases or len(lengths) != 1:
        raise ValueError(f"{path}: expected equal-length cases after @data; got {len(cases)} cases of lengths "
                         f"{sorted(lengths)[:5]}")
    return np.asarray(cases, dtype=np.float64), labels


@lru_cache(maxsize=None)
def load_ucr(name: str) -> Dict[str, object]:
    """The official splits of UCR/UEA set ``name`` (one of :data:`UCR_SETS`), z-normalised per case and channel.

    Returns {"train": (x (N, L, C) float32 tensor, y (N,) int64), "test": (...), "classes": sorted labels}."""
    check_choice("dataset", name, tuple(UCR_SETS))
    raw = {split: read_ts_file(package_file("aeon", f"datasets/data/{name}/{name}_{split.upper()}.ts"))
           for split in ("train", "test")}
    classes = sorted(set(raw["train"][1]) | set(raw["test"][1]), key=_label_order)
    index = {label: i for i, label in enumerate(classes)}
    out: Dict[str, object] = {"classes": classes}
    length, channels, num_classes, n_train, n_test = UCR_SETS[name]
    for split, (values, labels) in raw.items():
        expected = (n_train if split == "train" else n_test, channels, length)
        if values.shape != expected:
            raise RuntimeError(f"{name} {split}: the bundled file holds {values.shape} (cases, channels, length); "
                               f"expected {expected}")
        mean = values.mean(-1, keepdims=True)
        std = values.std(-1, keepdims=True)
        values = (values - mean) / np.where(std > 1e-8, std, 1.0)  # z-normalise; a flat series stays 0
        x = torch.from_numpy(values.transpose(0, 2, 1).astype(np.float32).copy())  # (N, L, C)
        y = torch.tensor([index[label] for label in labels], dtype=torch.long)
        out[split] = (x, y)
    if len(classes) != num_classes:
        raise RuntimeError(f"{name}: found classes {classes}; expected {num_classes}")
    return out


def _label_order(label: str):
    """Numeric labels sort as numbers ("2" < "10"), others as text."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


@lru_cache(maxsize=None)
def load_series(name: str) -> np.ndarray:
    """Forecasting series ``name`` (one of :data:`SERIES`) as a float64 array (T,), oldest first."""
    check_choice("series", name, tuple(SERIES))
    package, relative, *_ = SERIES[name]
    with open(package_file(package, relative), encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    values = np.array([float(row[1]) if row[1].strip() else math.nan for row in rows], dtype=np.float64)
    missing = np.isnan(values)
    if missing.any():  # co2 has gaps of a few weeks: linear interpolation between the neighbours
        positions = np.arange(len(values))
        values[missing] = np.interp(positions[missing], positions[~missing], values[~missing])
    return values


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------
@register_task("ucr")
class UCRClassification(Task):
    """A UCR/UEA classification set (module docstring): inputs (B, L, channels) float32, targets (B,).

    Args:
        dataset: one of :data:`UCR_SETS` (ItalyPowerDemand, GunPoint, ArrowHead, OSULeaf, ACSF1, BasicMotions).
        val_fraction: share of the official train cases held out as "val" (a fixed seeded choice, stratified
            by nothing: the sets are small); 0 leaves "val" empty.
        seed: the training order (a fresh permutation of the train cases each epoch) and the val hold-out.
    """

    name = "ucr"
    kind = "classification"

    def __init__(self, dataset: str = "GunPoint", val_fraction: float = 0.0, seed: int = 0):
        super().__init__(seed)
        check_choice("dataset", dataset, tuple(UCR_SETS))
        self.dataset = dataset
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        length, channels, classes, n_train, _ = UCR_SETS[dataset]
        self.default_length, self.input_dim, self.num_classes = length, channels, classes
        self._settings = {"dataset": dataset, "val_fraction": self.val_fraction}
        self.data = load_ucr(dataset)  # fails now, naming the extra, when aeon is missing
        order = torch.randperm(n_train, generator=seeded_generator("ucr-val", dataset, seed))
        held_out = int(round(self.val_fraction * n_train))
        self._rows = {"train": order[held_out:].sort().values, "val": order[:held_out].sort().values,
                      "test": torch.arange(UCR_SETS[dataset][4])}

    @property
    def classes(self) -> List[str]:
        """The original class labels, in the order of the class ids."""
        return list(self.data["classes"])

    def num_examples(self, split: str) -> int:
        super().num_examples(split)
        return int(self._rows[split].numel())

    def check_length(self, length: int) -> None:
        if length != self.default_length:
            raise ValueError(f"{self.dataset} series have length {self.default_length}; got length={length}")

    def _make_batch(self, split: str, ids: List[int], length: int) -> Batch:
        x, y = self.data["test" if split == "test" else "train"]
        rows = self._rows[split][torch.tensor(ids, dtype=torch.long)]
        return Batch(x[rows], y[rows])  # (B, L, C) float32, (B,) int64


# --------------------------------------------------------------------------------------------------
# Forecasting
# --------------------------------------------------------------------------------------------------
@dataclass
class ForecastBatch(Batch):
    """A :class:`Batch` of forecasting windows with the per-window scaling that maps them back.

    inputs (B, context, 1) and targets (B, horizon) are ``(value - offset) / scale`` (after the task's log when
    it uses one); offset, scale: (B, 1) float64; start: (B,) int64, the index in the series of each window's
    first context value.
    """

    offset: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    start: Optional[torch.Tensor] = None

    def to(self, device, non_blocking: bool = False) -> "ForecastBatch":
        moved = super().to(device, non_blocking)
        return ForecastBatch(moved.inputs, moved.targets, moved.lengths, self.offset, self.scale, self.start)


def seasonal_naive(history: np.ndarray, horizon: int, period: int) -> np.ndarray:
    """The seasonal-naive forecast: each future value repeats the value one season earlier. history (T,) ->
    (horizon,). With period 1 it is the naive (last value) forecast."""
    if len(history) < period:
        raise ValueError(f"history must hold at least one season (period={period}); got {len(history)} values")
    last_season = history[-period:]
    return np.array([last_season[h % period] for h in range(horizon)], dtype=np.float64)


def mase_denominator(history: np.ndarray, period: int) -> float:
    """In-sample MAE of the seasonal-naive forecast one season ahead: mean |y_t - y_{t-m}| (Hyndman &
    Koehler 2006; the M4 competition's MASE scale)."""
    if len(history) <= period:
        raise ValueError(f"history must be longer than the period {period}; got {len(history)} values")
    return float(np.mean(np.abs(history[period:] - history[:-period])))


def smape(truth: np.ndarray, forecast: np.ndarray) -> float:
    """Symmetric MAPE in percent (0..200), M4's definition: mean 200 |y - f| / (|y| + |f|)."""
    truth, forecast = np.asarray(truth, dtype=np.float64), np.asarray(forecast, dtype=np.float64)
    denominator = np.abs(truth) + np.abs(forecast)
    return float(np.mean(np.where(denominator > 0, 200.0 * np.abs(truth - forecast) / np.maximum(denominator, 1e-300),
                                  0.0)))


@register_task("forecast")
class Forecast(Task):
    """Multi-horizon forecasting of one real series (module docstring).

    Args:
        series: one of :data:`SERIES` (airline, co2, sunspots).
        horizon: values forecast at once (default: the series' usual horizon: 12 months, 52 weeks, 11 years).
        context: past values the model reads (the sequence length; default 3-4 seasons).
        log: forecast the log of the series (airline's seasonal swings grow with its level).
        seed: the training order.
    """

    name = "forecast"
    kind = "regression"
    input_dim = 1

    def __init__(self, series: str = "airline", horizon: Optional[int] = None, context: Optional[int] = None,
                 log: bool = False, seed: int = 0):
        super().__init__(seed)
        check_choice("series", series, tuple(SERIES))
        _, _, period, default_horizon, default_context = SERIES[series]
        self.series, self.period = series, period
        self.horizon = check_int("horizon", default_horizon if horizon is None else horizon, 1)
        self.default_length = check_int("context", default_context if context is None else context, 1)
        if not isinstance(log, bool):
            raise TypeError(f"log must be a bool; got {type(log).__name__} {log!r}")
        self.log = log
        self.output_dim = self.horizon
        self._settings = {"series": series, "horizon": self.horizon, "context": self.default_length, "log": log}
        self.values = load_series(series)  # fails now, naming the extra, when the package is missing
        if log and not (self.values > 0).all():
            raise ValueError(f"log=True needs a positive series; {series!r} has values <= 0")
        self.train_end = len(self.values) - 2 * self.horizon  # the train part: values[:train_end]
        if self.train_end - self.default_length - self.horizon + 1 < 1:
            raise ValueError(f"series {series!r} has {len(self.values)} values: too few for context="
                             f"{self.default_length} and horizon={self.horizon} with val and test held out")
        self.scale_of_errors = mase_denominator(self.values[:self.train_end], period)

    # the split's forecast origins: the index of the first target value of each window
    def _origins(self, split: str, context: int) -> np.ndarray:
        if split == "test":
            return np.array([len(self.values) - self.horizon])
        if split == "val":
            return np.array([self.train_end])
        return np.arange(context, self.train_end - self.horizon + 1)

    def num_examples(self, split: str) -> int:
        super().num_examples(split)
        return len(self._origins(split, self.default_length))

    def check_length(self, length: int) -> None:
        if length > self.train_end - self.horizon:
            raise ValueError(f"context={length} leaves no training window in {self.series!r} "
                             f"({len(self.values)} values, horizon {self.horizon})")

    def _transformed(self) -> np.ndarray:
        return np.log(self.values) if self.log else self.values

    def _make_batch(self, split: str, ids: List[int], length: int) -> ForecastBatch:
        origins = self._origins(split, length)
        if split == "train" and length != self.default_length:
            origins = origins[origins >= length]
        series = self._transformed()
        chosen = origins[np.asarray(ids) % len(origins)] if split == "train" else origins[np.asarray(ids)]
        windows = np.stack([series[o - length:o + self.horizon] for o in chosen])  # (B, context + horizon)
        context = windows[:, :length]
        offset = context.mean(1, keepdims=True)
        scale = np.maximum(context.std(1, keepdims=True), 1e-8 * np.maximum(np.abs(offset), 1.0))
        scaled = (windows - offset) / scale
        return ForecastBatch(torch.from_numpy(scaled[:, :length, None].astype(np.float32)),  # (B, context, 1)
                             torch.from_numpy(scaled[:, length:].astype(np.float32)),        # (B, horizon)
                             None, torch.from_numpy(offset), torch.from_numpy(scale),
                             torch.from_numpy((chosen - length).astype(np.int64)))

    def to_original_units(self, values: torch.Tensor, batch: ForecastBatch) -> torch.Tensor:
        """Undo the window scaling (and the log): values (B, horizon) or (B, context, 1) in the batch's scaled
        units -> float64 in the series' own units."""
        if not isinstance(batch, ForecastBatch) or batch.offset is None:
            raise TypeError(f"batch must be a ForecastBatch of this task; got {type(batch).__name__}")
        shape = (-1,) + (1,) * (values.dim() - 1)
        offset = batch.offset.to(values.device).view(shape)
        scale = batch.scale.to(values.device).view(shape)
        restored = values.double() * scale + offset
        return restored.exp() if self.log else restored

    @torch.no_grad()
    def metrics(self, logits: torch.Tensor, batch: Batch) -> Dict[str, float]:
        """``loss``/``mse`` in scaled units, and ``mae``, ``mase``, ``smape`` in the series' own units."""
        out = super().metrics(logits, batch)
        forecast = self.to_original_units(self._regression_outputs(logits, batch), batch).cpu().numpy()
        truth = self.to_original_units(batch.targets, batch).cpu().numpy()
        mae = float(np.mean(np.abs(forecast - truth)))
        out.update(mae=mae, mase=mae / self.scale_of_errors, smape=smape(truth, forecast))
        return out

    def seasonal_naive_forecast(self, batch: ForecastBatch) -> torch.Tensor:
        """The seasonal-naive forecast of each window of ``batch`` from its context, in scaled units (B, horizon)
        (needs a context of at least one season)."""
        context = self.to_original_units(batch.inputs[..., 0], batch).cpu().numpy()
        forecast = np.stack([seasonal_naive(row, self.horizon, self.period) for row in context])
        if self.log:
            forecast = np.log(forecast)
        return torch.from_numpy((forecast - batch.offset.numpy()) / batch.scale.numpy()).float()
