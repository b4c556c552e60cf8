"""Pictures of what the models compute and learn (matplotlib, the ``plot`` extra: ``pip install 'ssmkit[plot]'``).

    from ssmkit import viz
    viz.plot_kernels(model, "kernels.png")                     # S4 / S4D / Hyena convolution kernels
    viz.plot_hippo_reconstruction("hippo.png")                 # HiPPO's online memory of a signal
    viz.plot_state_trajectory(model, inputs, "states.png")     # |state| per channel over time, one layer
    viz.plot_selectivity(model, inputs, "selectivity.png")     # Mamba's Delta per channel over the tokens
    viz.plot_training_curves("outputs/run", "curves.png")      # loss and accuracy from metrics.jsonl
    viz.plot_forecast(history, truth, forecast, "forecast.png", baselines={"seasonal naive": ...})
    viz.plot_confusion_matrix(truth, predicted, "confusion.png", class_names=[...])
    viz.write_checkpoint_figures("outputs/run/final")          # all that apply, next to the run's reports

(``ssmkit viz --checkpoint outputs/run/final`` calls the last one.) Every function writes one PNG (Agg
backend, no display needed), returns its path and closes the figure.

Glossary (paper symbols): the kernel K_l = C Abar^l Bbar of an LTI SSM (S4, Gu et al. ICLR 2022; S4D, Gu et
al. NeurIPS 2022) is the output at lag l to a unit impulse; Hyena's long filters h (Poli et al. 2023) play the
same role. Mamba's step size Delta_t = softplus(dt_proj(x_proj(u_t)) + bias) per channel (Gu & Dao 2023,
Algorithm 2): a large Delta lets token t overwrite the state (the model attends to it), a small Delta keeps
the state and ignores the token, so the heat map shows what the model chose to remember or forget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

PathLike = Union[str, Path]


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("ssmkit.viz draws with matplotlib, which is not installed; "
                          "install it with pip install 'ssmkit[plot]'") from error
    return plt


def _save(fig, path: PathLike, dpi: int = 110) -> Path:
    """Write the figure to ``path`` (through a temporary file, so a reader never sees half a PNG) and close it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def _colorbar_beside(fig, ax, image=None, label: str = "") -> None:
    """A colour bar in a slot cut from the right of ``ax`` (an empty slot when ``image`` is None), so that
    panels stacked above one another keep the same width and their time axes line up."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    slot = make_axes_locatable(ax).append_axes("right", size="2%", pad=0.1)
    if image is None:
        slot.axis("off")
    else:
        fig.colorbar(image, cax=slot, label=label)


def _mixers(model_or_mixer) -> List[tuple]:
    """(label, mixer) pairs: every layer's mixer of a model, or the mixer itself."""
    layers = getattr(getattr(model_or_mixer, "backbone", None), "layers", None)
    if layers is None:
        return [(type(model_or_mixer).__name__, model_or_mixer)]
    return [(f"layer {i} ({type(layer.mixer).__name__})", layer.mixer) for i, layer in enumerate(layers)]


# --------------------------------------------------------------------------------------------------
# Convolution kernels
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def convolution_kernel(mixer, length: int) -> torch.Tensor:
    """The long convolution kernel of an LTI mixer: S4 and S4D (H, length), the look-back half when
    bidirectional; Hyena (order - 1, H, length), one filter per order. Raises TypeError for other mixers."""
    from .layers.hyena import Hyena
    from .layers.s4 import S4
    from .layers.s4d import S4D
    from .ops.lti_kernels import kernel_vandermonde

    if isinstance(mixer, S4):
        kernel = mixer.kernel(length)
    elif isinstance(mixer, S4D):
        p = mixer.discrete_parameters()
        kernel = kernel_vandermonde(p.dtA, p.Bbar, p.C, length)
    elif isinstance(mixer, Hyena):
        return mixer.long_filters(length)[0].float()
    else:
        raise TypeError(f"mixer must be an S4, S4D or Hyena layer (a convolution kernel); got {type(mixer).__name__}")
    return (kernel[0] if kernel.dim() == 3 else kernel).float()


def plot_kernels(model_or_mixer, path: PathLike, length: int = 256, channels: int = 4) -> Path:
    """Plot the first ``channels`` kernels K_l (l = 0..length-1) of every S4/S4D/Hyena layer of a model (or of one
    such mixer), one panel per layer. Raises ValueError when there is none."""
    plt = _pyplot()
    panels = []
    for label, mixer in _mixers(model_or_mixer):
        try:
            kernel = convolution_kernel(mixer, length)
        except TypeError:
            continue
        panels.append((label, kernel.reshape(-1, length)[:channels].cpu().numpy()))
    if not panels:
        raise ValueError("the model has no S4, S4D or Hyena layer: there is no convolution kernel to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.4 * len(panels)), squeeze=False)
    for ax, (label, kernels) in zip(axes[:, 0], panels):
        for c, k in enumerate(kernels):
            ax.plot(k, lw=1.0, label=f"channel {c}")
        ax.axhline(0.0, color="0.7", lw=0.6)
        ax.set_title(f"{label}: convolution kernel K_l", fontsize=10)
        ax.set_ylabel("K_l")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("lag l (tokens)")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# HiPPO
# --------------------------------------------------------------------------------------------------
def plot_hippo_reconstruction(path: PathLike, measures: Sequence[str] = ("legs", "legt", "fout"), N: int = 64,
                              T: float = 3.0, dt: float = 1e-3, cutoff: float = 3.0, seed: int = 0) -> Path:
    """HiPPO's online memory (Gu et al. NeurIPS 2020): band-limited noise (``T`` seconds at step ``dt``,
    ``cutoff`` Hz) compressed into ``N`` numbers per ``measure`` and the history rebuilt from the final state."""
    from .ops.hippo_reconstruction import band_limited_noise, hippo_reconstruct, relative_error

    plt = _pyplot()
    u = band_limited_noise(T=T, dt=dt, cutoff=cutoff, seed=seed)
    t = np.arange(u.shape[-1]) * dt
    fig, axes = plt.subplots(len(measures), 1, figsize=(9, 2.3 * len(measures)), sharex=True, squeeze=False)
    for ax, measure in zip(axes[:, 0], measures):
        result = hippo_reconstruct(u, dt=dt, measure=measure, N=N, theta=1.0)
        error = relative_error(result.reconstruction, result.target).item()
        ax.plot(t, u.numpy(), color="0.6", lw=1.0, label="signal")
        ax.plot(result.times.numpy(), result.reconstruction.numpy(), color="C3", lw=1.2,
                label=f"rebuilt from {N} numbers")
        ax.set_title(f"HiPPO-{measure.upper()}: relative RMSE {error:.4f}", fontsize=10)
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# States and selectivity of a trained model
# --------------------------------------------------------------------------------------------------
def _one_sequence(model, inputs: torch.Tensor) -> torch.Tensor:
    """inputs as (1, L) token ids or (1, L, input_dim) values, from (L,), (1, L), (L, d) or (1, L, d)."""
    inputs = torch.as_tensor(inputs)
    token_model = model.config.vocab_size is not None
    if token_model and inputs.dim() == 1 or not token_model and inputs.dim() == 2:
        inputs = inputs[None]
    expected = 2 if token_model else 3
    if inputs.dim() != expected or inputs.shape[0] != 1:
        raise ValueError(f"inputs must be one sequence, {'(L,) token ids' if token_model else '(L, input_dim)'}; "
                         f"got {tuple(inputs.shape)}")
    return inputs


@torch.no_grad()
def state_trajectory(model, inputs: torch.Tensor, layer: int = 0) -> Dict[str, torch.Tensor]:
    """Run ``model`` token by token over one sequence and return, for each state entry of layer ``layer``,
    its magnitude per channel after every token: {entry name: (L, channels)} (the norm over the state
    dimensions; complex states by modulus). The model must be causal (not bidirectional)."""
    inputs = _one_sequence(model, inputs)
    layers = len(model.backbone.layers)
    if not 0 <= layer < layers:
        raise ValueError(f"layer must be in [0, {layers}); got {layer}")
    state = model.init_state(1)
    trajectory: Dict[str, List[torch.Tensor]] = {}
    for t in range(inputs.shape[1]):
        _, state = model.step(inputs[:, t], state)
        for key, value in state[layer].items():
            if value.dim() < 2:
                continue
            magnitude = value[0].abs().float()
            magnitude = magnitude.reshape(magnitude.shape[0], -1).norm(dim=-1) if magnitude.dim() > 1 else magnitude
            trajectory.setdefault(key, []).append(magnitude)
    return {key: torch.stack(values) for key, values in trajectory.items()}


def plot_state_trajectory(model, inputs: torch.Tensor, path: PathLike, layer: int = 0,
                          entry: Optional[str] = None) -> Path:
    """The input (top) and, below it, the magnitude of layer ``layer``'s recurrent state per channel over time
    (a heat map; the entry ``entry`` of the state, default the first recurrent one)."""
    plt = _pyplot()
    inputs = _one_sequence(model, inputs)
    trajectory = state_trajectory(model, inputs, layer)
    recurrent = [k for k in trajectory if not k.endswith(".conv")] or list(trajectory)
    if not trajectory:
        raise ValueError(f"layer {layer} has no per-channel state to show")
    key = entry or recurrent[0]
    if key not in trajectory:
        raise ValueError(f"entry must be one of {sorted(trajectory)}; got {entry!r}")
    values = trajectory[key].T.cpu().numpy()  # (channels, L)
    fig, (ax_in, ax_state) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True,
                                          gridspec_kw={"height_ratios": [1, 2.5]})
    shown = inputs[0].float().cpu().numpy()
    if shown.ndim == 2:
        for c in range(shown.shape[1]):
            ax_in.plot(shown[:, c], lw=1.0)
    else:
        ax_in.step(np.arange(len(shown)), shown, where="mid", lw=1.0)
    ax_in.set_ylabel("input")
    _colorbar_beside(fig, ax_in)
    image = ax_state.imshow(values, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                            extent=(-0.5, values.shape[1] - 0.5, -0.5, values.shape[0] - 0.5))
    _colorbar_beside(fig, ax_state, image, "|state|")
    ax_state.set(xlabel="time step", ylabel="channel",
                 title=f"layer {layer} ({type(model.backbone.layers[layer].mixer).__name__}) state {key!r}")
    fig.tight_layout()
    return _save(fig, path)


@torch.no_grad()
def mamba_selectivity(model, inputs: torch.Tensor) -> Dict[int, torch.Tensor]:
    """Delta, Mamba's input-dependent step size, of every Mamba layer over one sequence: {layer index:
    (d_inner, L)}. Recomputed from each mixer's input (captured by a forward pre-hook) with the layer's own
    weights, as its forward computes it: in_proj -> causal conv + SiLU -> x_proj -> dt_proj -> + bias ->
    softplus (Gu & Dao 2023, Algorithm 2)."""
    from .layers.mamba import Mamba
    from .ops.conv1d import causal_conv1d

    inputs = _one_sequence(model, inputs)
    captured: Dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.backbone.layers):
        if isinstance(layer.mixer, Mamba):
            hooks.append(layer.mixer.register_forward_pre_hook(
                lambda module, args, i=i: captured.__setitem__(i, args[0].detach())))
    if not hooks:
        raise ValueError("the model has no Mamba layer: there is no selectivity (Delta) to show")
    try:
        if inputs.is_floating_point():
            model(inputs=inputs)
        else:
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    deltas = {}
    for i, x in captured.items():
        mixer = model.backbone.layers[i].mixer
        xz = F.linear(x, mixer.in_proj.weight, mixer.in_proj.bias).transpose(1, 2)  # (1, 2 d_inner, L)
        u, _ = xz.chunk(2, dim=1)
        u = causal_conv1d(u, mixer.conv1d.weight, mixer.conv1d.bias, None, None, "silu")
        dt = torch.matmul(mixer.x_proj.weight, u)[:, :mixer.dt_rank]                 # (1, dt_rank, L)
        delta = torch.matmul(mixer.dt_proj.weight, dt) + mixer.dt_proj.bias[:, None]  # (1, d_inner, L)
        deltas[i] = F.softplus(delta)[0].float()
    return deltas


def plot_selectivity(model, inputs: torch.Tensor, path: PathLike, token_labels: Optional[Sequence[str]] = None,
                     channels: int = 64) -> Path:
    """Heat maps of Delta (channel x token) for every Mamba layer over one sequence, the input shown above;
    ``token_labels`` names the tokens on the x axis (when there are at most 64)."""
    plt = _pyplot()
    inputs = _one_sequence(model, inputs)
    deltas = mamba_selectivity(model, inputs)
    fig, axes = plt.subplots(len(deltas) + 1, 1, figsize=(10, 1.6 + 2.6 * len(deltas)), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [1] + [2.5] * len(deltas)})
    shown = inputs[0].float().cpu().numpy()
    ax = axes[0, 0]
    if shown.ndim == 2:
        for c in range(shown.shape[1]):
            ax.plot(shown[:, c], lw=1.0)
    else:
        ax.step(np.arange(len(shown)), shown, where="mid", lw=1.0)
    ax.set_ylabel("input")
    _colorbar_beside(fig, ax)
    for ax, (i, delta) in zip(axes[1:, 0], deltas.items()):
        values = delta[:channels].cpu().numpy()
        image = ax.imshow(values, aspect="auto", origin="lower", interpolation="nearest", cmap="magma",
                          extent=(-0.5, values.shape[1] - 0.5, -0.5, values.shape[0] - 0.5))
        _colorbar_beside(fig, ax, image, "Delta")
        ax.set(ylabel="channel", title=f"layer {i}: Delta (large: the token is written into the state; "
                                       f"small: the state is kept)")
    axes[-1, 0].set_xlabel("token")
    if token_labels is not None and len(token_labels) <= 64:
        axes[-1, 0].set_xticks(range(len(token_labels)))
        axes[-1, 0].set_xticklabels([str(t) for t in token_labels], fontsize=7, rotation=90)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Training curves and task pictures
# --------------------------------------------------------------------------------------------------
def plot_training_curves(run_dir: PathLike, path: PathLike) -> Path:
    """Loss and eval accuracy (or MSE) against the step from ``run_dir/metrics.jsonl``."""
    from .train.logging import METRICS_FILE, plot_curves

    metrics = Path(run_dir) / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} is missing: {run_dir} is not the output folder of a training run")
    _pyplot()
    return plot_curves(metrics, Path(path))


def plot_forecast(history: np.ndarray, truth: np.ndarray, forecast: np.ndarray, path: PathLike,
                  baselines: Optional[Dict[str, np.ndarray]] = None, title: str = "forecast",
                  history_start: int = 0) -> Path:
    """The history (the model's context), then the truth and the forecasts over the horizon, which is
    shaded and marked by a line at the forecast origin. history (C,), truth and each forecast (H,)."""
    plt = _pyplot()
    history, truth, forecast = (np.asarray(a, dtype=np.float64).ravel() for a in (history, truth, forecast))
    if truth.shape != forecast.shape:
        raise ValueError(f"truth and forecast must have one shape (horizon,); got {truth.shape} and {forecast.shape}")
    origin = history_start + len(history)
    past = np.arange(history_start, origin)
    future = np.arange(origin, origin + len(truth))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(past, history, color="0.3", lw=1.2, label="history (context)")
    ax.plot(future, truth, color="k", lw=1.6, label="truth")
    ax.plot(future, forecast, color="C3", lw=1.6, marker="o", ms=3, label="model")
    for k, (name, values) in enumerate((baselines or {}).items()):
        ax.plot(future, np.asarray(values, dtype=np.float64).ravel(), lw=1.0, ls="--", color=f"C{k}", label=name)
    ax.axvspan(origin - 0.5, future[-1] + 0.5, color="C1", alpha=0.08)
    ax.axvline(origin - 0.5, color="C1", lw=1.0)
    ax.text(origin, ax.get_ylim()[1], f" horizon: {len(truth)} steps", va="top", fontsize=8, color="C1")
    ax.set(xlabel="time index", title=title)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int], num_classes: int) -> np.ndarray:
    """counts (num_classes, num_classes): row = true class, column = predicted class."""
    truth, predicted = np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if truth.shape != predicted.shape:
        raise ValueError(f"truth and predicted must have one length; got {truth.shape} and {predicted.shape}")
    if truth.size and (min(truth.min(), predicted.min()) < 0 or max(truth.max(), predicted.max()) >= num_classes):
        raise ValueError(f"class ids must lie in [0, num_classes={num_classes})")
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (truth, predicted), 1)
    return counts


def plot_confusion_matrix(truth: Sequence[int], predicted: Sequence[int], path: PathLike,
                          class_names: Optional[Sequence[str]] = None, title: str = "confusion matrix") -> Path:
    """Counts of (true class, predicted class), with the accuracy in the title."""
    plt = _pyplot()
    num_classes = len(class_names) if class_names is not None else int(max(np.max(truth), np.max(predicted))) + 1
    counts = confusion_matrix(truth, predicted, num_classes)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    size = 2.5 + 0.45 * num_classes
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, label="series")
    for r in range(num_classes):
        for c in range(num_classes):
            ax.text(c, r, str(counts[r, c]), ha="center", va="center", fontsize=8,
                    color="white" if counts[r, c] > counts.max() / 2 else "black")
    ax.set_xticks(range(num_classes))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(num_classes))
    ax.set_yticklabels(names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: accuracy {accuracy:.3f} ({counts.sum()} series)")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Task pictures and the checkpoint command
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def task_figure(model, task, path: PathLike, split: str = "test", batch_size: int = 256) -> Optional[Path]:
    """The picture a person looks at for ``task``: forecast vs truth (with the seasonal-naive forecast) for
    ``forecast`` tasks, the confusion matrix over the whole split for classification; None for other kinds."""
    from .tasks.timeseries import Forecast
    from .train.loop import forward_batch

    was_training = model.training
    model.eval()
    try:
        if isinstance(task, Forecast):
            batch = task.batch(split, 0, 1)
            prediction = task._regression_outputs(forward_batch(model, batch).logits.float(), batch)
            metrics = task.metrics(prediction, batch)
            history = task.to_original_units(batch.inputs[..., 0], batch)[0].numpy()
            truth = task.to_original_units(batch.targets, batch)[0].numpy()
            forecast = task.to_original_units(prediction, batch)[0].numpy()
            naive = task.to_original_units(task.seasonal_naive_forecast(batch), batch)[0].numpy()
            title = (f"{task.series}: {task.horizon}-step forecast ({split}), model MASE {metrics['mase']:.3f}, "
                     f"sMAPE {metrics['smape']:.2f}%")
            return plot_forecast(history, truth, forecast, path, baselines={"seasonal naive": naive}, title=title,
                                 history_start=int(batch.start[0]))
        if task.kind == "classification":
            truth, predicted = [], []
            total = task.num_examples(split) or batch_size
            for index in range(-(-total // batch_size)):
                batch = task.batch(split, index, batch_size)
                scores = task._sequence_outputs(forward_batch(model, batch).logits.float(), batch, task.num_classes)
                truth.append(batch.targets)
                predicted.append(scores.argmax(-1))
            names = getattr(task, "classes", None)
            return plot_confusion_matrix(torch.cat(truth).numpy(), torch.cat(predicted).numpy(), path,
                                         class_names=names, title=f"{getattr(task, 'dataset', task.name)} {split}")
        return None
    finally:
        model.train(was_training)


def write_checkpoint_figures(checkpoint: PathLike, out_dir: Optional[PathLike] = None, split: str = "test",
                             length: int = 256, backend: Optional[str] = "torch") -> Dict[str, Path]:
    """Every picture that applies to a training checkpoint, written next to the run's reports (the run's
    output folder, beside metrics.jsonl and curves.png, unless ``out_dir`` is given): ``curves.png``
    (redrawn), ``kernels.png`` (S4/S4D/Hyena layers), ``states.png`` (state trajectory over the first
    example of ``split``; causal models), ``selectivity.png`` (Mamba layers) and ``task.png`` (forecast or
    confusion matrix). Returns {name: path}; ``viz.json`` beside them lists them and the backend used.

    ``backend``: the ops' backend for the model's passes (:func:`ssmkit.ops.use_backend`); "torch" by default,
    since a handful of short sequences needs no fast kernel and should never wait for a C++ build; None keeps
    the ops' own choice ("auto")."""
    from .ops import use_backend

    with use_backend(backend):
        written, out = _checkpoint_figures(checkpoint, out_dir, split, length)
    listing = {k: str(v) for k, v in written.items()}
    listing["backend"] = backend or "auto"
    (out / "viz.json").write_text(json.dumps(listing, indent=2))
    return written


def _checkpoint_figures(checkpoint: PathLike, out_dir: Optional[PathLike], split: str, length: int):
    from .models.model import SSMModel
    from .tasks import make_task
    from .train import checkpointing as ckpt
    from .train.config import RunConfig
    from .train.logging import METRICS_FILE

    checkpoint = Path(checkpoint)
    info = ckpt.read_run_info(checkpoint)
    run = RunConfig.from_dict(info["run"])
    run_dir = next((d for d in (checkpoint, checkpoint.parent, checkpoint.parent.parent)
                    if (d / METRICS_FILE).is_file()), checkpoint.parent)
    out = Path(out_dir) if out_dir is not None else run_dir
    task = make_task(run.task.name, **run.task.kwargs)
    model = SSMModel.from_pretrained(checkpoint, device="cpu").eval()
    written: Dict[str, Path] = {}
    if (run_dir / METRICS_FILE).is_file():
        written["curves"] = plot_training_curves(run_dir, out / "curves.png")
    kernel_length = min(length, task.default_length) if task.default_length else length
    try:
        written["kernels"] = plot_kernels(model, out / "kernels.png", length=kernel_length)
    except ValueError:
        pass  # no LTI layer
    example = task.batch(split, 0, 1).inputs[0]
    if not model.config.bidirectional:
        written["states"] = plot_state_trajectory(model, example, out / "states.png")
    try:
        written["selectivity"] = plot_selectivity(model, example, out / "selectivity.png")
    except ValueError:
        pass  # no Mamba layer
    figure = task_figure(model, task, out / "task.png", split=split)
    if figure is not None:
        written["task"] = figure
    return written, out
