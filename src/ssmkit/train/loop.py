"""The training loop: ``train(run)`` fits a model to a task and returns a :class:`TrainResult`.

    from ssmkit.train import load_run_config, train
    result = train(load_run_config("configs/induction.yaml", ["train.steps=500"]))
    result.final_metrics        # {"val_loss": ..., "val_accuracy": ..., "val_accuracy@256": ...}

Data of a step. The global batch of step ``s`` (0-based) is made of ``S = world_size * grad_accum``
micro-batches of ``batch_size // S`` rows; micro-batch ``j`` is ``task.batch("train", s * S + j, batch_size // S)``
and rank ``r`` computes micro-batches ``j = r * grad_accum ... (r + 1) * grad_accum - 1``. The rows are
then exactly those of ``task.batch("train", s, batch_size)`` (see :mod:`ssmkit.tasks.base`), the data is a
pure function of the step (so a resumed run reads what the uninterrupted run read), and one process with
``grad_accum=2`` computes what two processes with ``grad_accum=1`` compute. Under context parallelism
(``parallel.context=N``) ``world_size`` and ``r`` count data-parallel replicas of N ranks, which share each
micro-batch and split its sequences (:mod:`ssmkit.train.context`).

Loss of a step: the mean over its micro-batches of ``task.loss(logits, micro_batch)`` (each itself a mean
over that micro-batch's scored positions or rows), plus ``aux_loss_weight`` times the MoE load-balancing
loss. The model is called without labels: the task aligns its targets (an LM's target at position t is
what the model outputs at position t) and computes the loss.

A non-finite loss or gradient norm stops the run before the optimiser step with :class:`TrainingDiverged`,
which names the step and the last good checkpoint (never overwritten by a bad state).

Steps are counted in optimiser updates: "step k" in logs and checkpoints is the state after k updates.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from ..models.config import ModelConfig
from ..models.model import SSMModel
from . import checkpointing as ckpt
from . import distributed
from .config import RunConfig, model_config_for
from .context import ContextPlan
from .logging import CURVES_FILE, METRICS_FILE, RunLogger, plot_curves
from .optim import WarmupCosine, build_optimizer, classify_parameters, clip_gradients


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the weights were not updated with it.

    Attributes: ``step`` (the update that failed, 1-based), ``loss``, ``grad_norm``, ``checkpoint`` (the last
    good checkpoint directory, or None when none was written yet).
    """

    def __init__(self, step: int, total_steps: int, loss: float, grad_norm: float, checkpoint: Optional[Path]):
        self.step, self.loss, self.grad_norm, self.checkpoint = step, loss, grad_norm, checkpoint
        where = (f"the last good checkpoint is {checkpoint} (resume from it, e.g. with a lower train.lr or "
                 f"train.grad_clip)") if checkpoint else "no checkpoint had been written yet"
        super().__init__(f"training diverged at step {step} of {total_steps}: loss {loss}, gradient norm "
                         f"{grad_norm}; stopped before updating the weights; {where}")


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; only rank 0 wrote files)."""

    final_metrics: Dict[str, float]  # "<split>_<metric>" at the training length, "<split>_<metric>@<L>" others
    history: List[Dict[str, Any]]  # the events logged by this call (as in metrics.jsonl)
    losses: List[float]  # the loss of every step run by this call: steps start_step + 1 .. steps
    start_step: int  # 0, or the step of the checkpoint resumed from
    steps: int
    checkpoint_dir: Optional[Path]  # out_dir/final
    out_dir: Path
    num_parameters: int
    tokens_per_second: float  # training tokens (all ranks) per second of training steps (no eval, no I/O)
    train_seconds: float
    threads: int
    device: str
    world_size: int
    curves: Optional[Path] = None
    resumed_from: Optional[Path] = None
    model: Optional[torch.nn.Module] = field(default=None, repr=False)  # the trained model (unwrapped)


# --------------------------------------------------------------------------------------------------
# Forward, loss and evaluation
# --------------------------------------------------------------------------------------------------
def forward_batch(model: torch.nn.Module, batch, **model_kwargs):
    """Call an SSMModel (or its wrapper) on a task batch: token ids positionally, real inputs by keyword;
    ``model_kwargs`` go to the model's forward (e.g. ``context`` under context parallelism)."""
    if batch.inputs.is_floating_point():
        return model(inputs=batch.inputs, lengths=batch.lengths, **model_kwargs)
    return model(batch.inputs, lengths=batch.lengths, **model_kwargs)


def _forward_checked(model: torch.nn.Module, batch, bf16: bool, **model_kwargs):
    """:func:`forward_batch`, naming autocast as the likely cause when an op refuses bfloat16 inputs."""
    try:
        return forward_batch(model, batch, **model_kwargs)
    except (TypeError, RuntimeError) as err:
        if not bf16:
            raise
        raise RuntimeError(f"the forward pass failed under bfloat16 autocast (train.bf16=true): {err}. Some op of "
                           "this model does not run under torch.autocast; train with train.bf16=false") from err


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: torch.nn.Module, task, *, split: str = "val", batches: int = 4, batch_size: int = 32,
             length: Optional[int] = None, device: Optional[Union[str, torch.device]] = None,
             bf16: bool = False) -> Dict[str, float]:
    """Task metrics of ``model`` on ``batches`` deterministic batches ``task.batch(split, i, batch_size,
    length)``, i = 0 .. batches - 1 (fewer when a finite split ends first).

    Returns the task's metrics (``loss`` and ``accuracy``, or ``loss`` and ``mse``) averaged over the scored
    items, and ``count``, the number of items scored. The model is put in eval mode and restored.
    """
    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches and batch_size must be >= 1; got batches={batches}, batch_size={batch_size}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    total = task.num_examples(split)
    if total is not None:
        batches = min(batches, math.ceil(total / batch_size))
    was_training = model.training
    model.eval()
    sums: Dict[str, float] = {}
    count = 0.0
    try:
        for index in range(batches):
            batch = task.batch(split, index, batch_size, length).to(device)
            with _autocast(device, bf16):
                out = forward_batch(model, batch)
            metrics = task.metrics(out.logits.float(), batch)
            n = float(metrics.pop("count", batch.batch_size))
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
            count += n
    finally:
        model.train(was_training)
    result = {key: value / max(count, 1.0) for key, value in sums.items()}
    result["count"] = count
    return result


def evaluate_checkpoint(checkpoint: Union[str, Path], *, split: str = "test", batches: int = 10,
                        length: Optional[int] = None, batch_size: Optional[int] = None,
                        device: str = "cpu") -> Dict[str, float]:
    """Rebuild the task of a training checkpoint (``run.json``), load its weights and :func:`evaluate`."""
    from ..models.checkpoints import from_pretrained
    from ..tasks import make_task

    info = ckpt.read_run_info(checkpoint)
    run = RunConfig.from_dict(info["run"])
    task = make_task(run.task.name, **run.task.kwargs)
    model = from_pretrained(checkpoint, device=distributed.resolve_device(device))
    size = batch_size or run.train.eval_batch_size or run.train.batch_size
    metrics = evaluate(model, task, split=split, batches=batches, batch_size=size, length=length)
    metrics["length"] = float(length if length is not None else task.default_length)
    metrics["step"] = float(info["step"])
    return metrics


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def train(run: RunConfig, resume: Union[bool, str, Path] = False, *, task=None) -> TrainResult:
    """Train the model of ``run`` on its task (module docstring); under torchrun, on every rank.

    Args:
        run: the :class:`RunConfig` (``load_run_config`` reads one from YAML/JSON with overrides).
        resume: ``False`` (a new run; refused if ``train.out_dir`` already holds checkpoints), ``True`` (the
            latest checkpoint of ``train.out_dir``), ``"auto"`` (the latest if any, else a new run) or the
            path of a checkpoint or run directory. The checkpoint's config must match (task, model and the
            optimisation keys of :data:`ssmkit.train.checkpointing.RESUME_TRAIN_KEYS`).
        task: an already built task object to use instead of ``make_task(run.task.name, **run.task.kwargs)``
            (a user's own :class:`ssmkit.tasks.base.Task`); ``run.task`` is then only recorded.

    Raises:
        TrainingDiverged: a non-finite loss or gradient norm (the message names the step and checkpoint).
        CheckpointMismatch: ``resume`` points at a checkpoint of another config (the message lists the keys).
    """
    if not isinstance(run, RunConfig):
        raise TypeError(f"run must be a RunConfig (ssmkit.train.load_run_config); got {type(run).__name__}")
    torch.set_flush_denormal(True)  # tiny state values in the scans otherwise run ~6x slower on CPUs
    if run.train.threads is not None:
        torch.set_num_threads(run.train.threads)
    ctx = distributed.setup(run.train.device)
    try:
        result = _train(run, resume, task, ctx)
    except BaseException:
        distributed.shutdown(ctx, clean=False)  # no barrier: the other ranks may not reach it
        raise
    distributed.shutdown(ctx)
    return result


def _train(run: RunConfig, resume, task, ctx: distributed.DistContext) -> TrainResult:
    cfg = run.train
    world, accum = ctx.world_size, cfg.grad_accum
    # context parallelism: ranks of one replica share micro-batches, so the data order counts replicas
    plan = ContextPlan(run.parallel.context, ctx)
    micro_batches = plan.data_size * accum
    if cfg.batch_size % micro_batches:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be divisible by data-parallel replicas x "
                         f"train.grad_accum = {plan.data_size} x {accum} = {micro_batches} (the micro-batches of "
                         f"one step; replicas = world_size {world} / parallel.context {plan.size})")
    micro_size = cfg.batch_size // micro_batches
    if task is None:
        from ..tasks import make_task

        task = make_task(run.task.name, **run.task.kwargs)
    model_config: ModelConfig = model_config_for(task, run.model)
    task_config = dict(getattr(task, "config", {"name": run.task.name}))
    out_dir = Path(cfg.out_dir)
    source = ckpt.resolve_checkpoint(resume, out_dir)
    if source is not None:
        ckpt.check_resumable(source, run, micro_batches)
    fsdp = ctx.distributed and cfg.distributed == "fsdp"

    # model: the same initialisation on every rank (DDP also broadcasts rank 0's weights)
    ckpt.seed_everything(cfg.seed)
    model = SSMModel(model_config)
    if source is not None:
        ckpt.load_model_weights(model, source)
    model.to(ctx.device)
    plan.check(model, task)
    roles = classify_parameters(model)
    num_parameters = model.num_parameters()
    wrapped = distributed.wrap_model(model, ctx, cfg.distributed, find_unused_parameters=model_config.mlp == "moe",
                                     shard_layers=plan.context is None)
    inner = distributed.unwrap(wrapped)
    optimizer = build_optimizer(inner.named_parameters(), roles, cfg)
    scheduler = WarmupCosine(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                             min_lr_ratio=cfg.min_lr_ratio)
    start_step = 0
    if source is not None:
        state = ckpt.read_trainer_state(source)
        ckpt.load_optimizer_state(inner, optimizer, state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        rng = state["rng"]  # one state per rank of the run that wrote it
        ckpt.set_rng_state(rng[ctx.rank] if len(rng) == world else rng[0])

    logger = RunLogger(out_dir, enabled=ctx.is_main, total_steps=cfg.steps, start_step=start_step,
                       progress=cfg.progress, tensorboard=cfg.tensorboard, append=source is not None)
    history: List[Dict[str, Any]] = []

    def log(record: Dict[str, Any]) -> None:
        history.append(record)
        logger.log(record)

    last_good = source  # the newest checkpoint known to hold a finite state
    log({"event": "resume" if source is not None else "start", "step": start_step, "steps": cfg.steps,
         "resumed_from": str(source) if source is not None else None, "threads": torch.get_num_threads(),
         "device": str(ctx.device), "world_size": world, "context": plan.size, "grad_accum": accum, "micro_batch_size": micro_size,
         "num_parameters": num_parameters, "bf16": cfg.bf16, "distributed": cfg.distributed if world > 1 else None,
         "tensorboard": str(logger.tensorboard_dir) if logger.tensorboard_dir else None,
         "task": task_config, "model": model_config.to_dict(), "torch": torch.__version__})
    logger.message(f"ssmkit train: {num_parameters:,} parameters, {model_config.layer_mixers()} on "
                   f"{task_config.get('name')}, steps {start_step}->{cfg.steps}, device {ctx.device}, "
                   f"threads {torch.get_num_threads()}, world size {world} x grad_accum {accum}"
                   + (f", resumed from {source}" if source is not None else ""))

    eval_size = cfg.eval_batch_size or cfg.batch_size
    eval_lengths = [None] + [n for n in cfg.eval_lengths if n != task.default_length]

    def run_eval(step: int) -> Dict[str, float]:
        flat: Dict[str, float] = {}
        for length in eval_lengths:
            metrics = evaluate(inner, task, split=cfg.eval_split, batches=cfg.eval_batches, batch_size=eval_size,
                               length=length, device=ctx.device, bf16=cfg.bf16)
            shown = length if length is not None else task.default_length
            log({"event": "eval", "step": step, "split": cfg.eval_split, "length": shown, **metrics})
            suffix = "" if length is None else f"@{length}"
            flat.update({f"{cfg.eval_split}_{k}{suffix}": v for k, v in metrics.items() if k != "count"})
        return flat

    def save(directory: Path, step: int, metrics: Dict[str, float]) -> Path:
        weights = ckpt.gather_model_state(inner, fsdp)  # collectives under FSDP: every rank takes part
        optim_state = ckpt.gather_optimizer_state(inner, optimizer, fsdp)
        rngs = distributed.all_gather_object(ckpt.rng_state(), ctx)
        failure = None
        if ctx.is_main:
            try:
                ckpt.write_checkpoint(
                    directory, model_config=model_config, weights=weights,
                    trainer_state={"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                                   "rng": rngs, "world_size": world, "micro_batches": micro_batches},
                    run_info=ckpt.make_run_info(run, step=step, task_config=task_config, world_size=world,
                                                micro_batches=micro_batches, metrics=metrics))
            except Exception as err:  # noqa: BLE001 - every rank must learn of it, not wait at a barrier
                failure = f"{type(err).__name__}: {err}"
                if not ctx.distributed:
                    raise
        # no rank goes on (or prunes, or resumes) before the files are whole, and all stop if rank 0 failed
        failure = distributed.broadcast_object(failure, ctx)
        if failure is not None:
            raise RuntimeError(f"writing checkpoint {directory} failed on rank 0: {failure}")
        return directory

    losses: List[float] = []
    train_seconds, train_tokens = 0.0, 0
    window_loss, window_steps, window_tokens, window_seconds = 0.0, 0, 0, 0.0
    latest_metrics: Dict[str, float] = {}
    wrapped.train()
    try:
        for s in range(start_step, cfg.steps):
            step = s + 1
            started = time.perf_counter()
            scheduler.set_step(s)
            optimizer.zero_grad(set_to_none=True)
            stats = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, aux sum, tokens
            for a in range(accum):
                index = s * micro_batches + plan.data_rank * accum + a
                batch = plan.local_batch(task.batch("train", index, micro_size)).to(ctx.device)
                with distributed.gradient_sync(wrapped, enabled=a == accum - 1):
                    with _autocast(ctx.device, cfg.bf16):
                        out = _forward_checked(wrapped, batch, cfg.bf16, **plan.model_kwargs())
                        loss = plan.loss(task, out.logits, batch)
                        total = loss
                        if out.aux_loss is not None and cfg.aux_loss_weight:
                            total = loss + cfg.aux_loss_weight * out.aux_loss
                    (total * plan.gradient_scale / accum).backward()
                stats[0] += loss.detach().double()
                stats[1] += 0.0 if out.aux_loss is None else out.aux_loss.detach().double()
                stats[2] += batch.num_tokens
            distributed.all_reduce_sum(stats, ctx)
            step_loss = float(stats[0]) / micro_batches
            grad_norm = clip_gradients(inner.parameters(), cfg.grad_clip)
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                log({"event": "diverged", "step": step, "loss": step_loss, "grad_norm": grad_norm,
                     "last_checkpoint": str(last_good) if last_good else None})
                raise TrainingDiverged(step, cfg.steps, step_loss, grad_norm, last_good)
            optimizer.step()
            elapsed = time.perf_counter() - started
            tokens = int(stats[2])
            losses.append(step_loss)
            train_seconds += elapsed
            train_tokens += tokens
            window_loss += step_loss
            window_steps += 1
            window_tokens += tokens
            window_seconds += elapsed
            logger.progress(1, step_loss, tokens / max(elapsed, 1e-9))

            if step % cfg.log_every == 0 or step == cfg.steps:
                log({"event": "train", "step": step, "loss": window_loss / window_steps,
                     "aux_loss": float(stats[1]) / micro_batches, "lr": cfg.lr * scheduler.factor(s),
                     "grad_norm": grad_norm, "tokens_per_s": window_tokens / max(window_seconds, 1e-9),
                     "train_seconds": train_seconds})
                window_loss, window_steps, window_tokens, window_seconds = 0.0, 0, 0, 0.0
            if (cfg.eval_every and step % cfg.eval_every == 0) and step != cfg.steps:
                latest_metrics = run_eval(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != cfg.steps:
                last_good = save(out_dir / ckpt.CHECKPOINTS / f"step-{step:06d}", step, latest_metrics)
                if ctx.is_main:
                    removed = ckpt.prune_checkpoints(out_dir, cfg.keep_last)
                    log({"event": "checkpoint", "step": step, "path": str(last_good),
                         "removed": [str(p) for p in removed]})

        final_metrics = run_eval(cfg.steps)
        final_dir = save(out_dir / ckpt.FINAL, cfg.steps, final_metrics)
        tokens_per_second = train_tokens / train_seconds if train_seconds > 0 else 0.0
        log({"event": "end", "step": cfg.steps, "train_seconds": train_seconds,
             "tokens_per_s": tokens_per_second, "checkpoint": str(final_dir), **final_metrics})
    finally:
        logger.close()
    curves = plot_curves(out_dir / METRICS_FILE, out_dir / CURVES_FILE) if ctx.is_main else None
    return TrainResult(final_metrics=final_metrics, history=history, losses=losses, start_step=start_step,
                       steps=cfg.steps, checkpoint_dir=final_dir, out_dir=out_dir, num_parameters=num_parameters,
                       tokens_per_second=tokens_per_second, train_seconds=train_seconds,
                       threads=torch.get_num_threads(), device=str(ctx.device), world_size=world, curves=curves,
                       resumed_from=source, model=inner)
