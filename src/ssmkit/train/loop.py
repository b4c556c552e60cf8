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

``_train`` reads as the run goes: :func:`_set_up` (task, model, optimiser, scheduler, restored when resuming)
-> :func:`_open_log` -> per step :func:`_train_step` (micro-batches, all-reduce, clip, divergence check,
update), then on their cadence :func:`_log_train`, :func:`_evaluate_all_lengths` and
:func:`_save_periodic_checkpoint` -> the final evaluation and :func:`_save_checkpoint` of ``final/``.
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
from ..models.model import SSMModel, set_recompute
from ..tasks import make_task
from ..utils.process import process_settings
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
    info = ckpt.read_run_info(checkpoint)
    run = RunConfig.from_dict(info["run"])
    task = make_task(run.task.name, **run.task.kwargs)
    model = SSMModel.from_pretrained(checkpoint, device=distributed.resolve_device(device))
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
    # tiny state values in the scans otherwise run ~6x slower on CPUs; both settings are restored on return
    with process_settings(threads=run.train.threads, flush_denormal=True):
        ctx = distributed.setup(run.train.device)
        try:
            result = _train(run, resume, task, ctx)
        except BaseException:
            distributed.shutdown(ctx, clean=False)  # no barrier: the other ranks may not reach it
            raise
        distributed.shutdown(ctx)
    return result


# --------------------------------------------------------------------------------------------------
# The steps of _train, in the order they run
# --------------------------------------------------------------------------------------------------
@dataclass
class _Session:
    """Everything one call of :func:`train` works with, built by :func:`_set_up` (on every rank)."""

    run: RunConfig
    ctx: distributed.DistContext
    task: Any
    model_config: ModelConfig
    task_config: Dict[str, Any]
    out_dir: Path
    source: Optional[Path]  # the checkpoint resumed from, or None
    plan: ContextPlan  # context parallelism (a plan of one rank per replica without it)
    micro_batches: int  # data-parallel replicas x grad_accum: the micro-batches of one step
    micro_size: int  # rows per micro-batch
    fsdp: bool
    wrapped: torch.nn.Module  # what the forward runs (DDP/FSDP wrapper, or the model)
    inner: SSMModel  # the model itself
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    num_parameters: int
    start_step: int = 0
    logger: Optional[RunLogger] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    last_good: Optional[Path] = None  # the newest checkpoint known to hold a finite state
    loss_chunk_size: Optional[int] = None  # train.loss_chunk_size resolved (None: the task's loss on full logits)

    @property
    def cfg(self):
        return self.run.train

    def log(self, record: Dict[str, Any]) -> None:
        self.history.append(record)
        self.logger.log(record)


@dataclass
class _StepResult:
    loss: float  # mean over the micro-batches of all ranks
    aux_loss: float
    tokens: int
    grad_norm: float
    seconds: float


@dataclass
class _Throughput:
    """Running sums since the start of this call (``total_*``) and since the last train log (``window_*``)."""

    total_seconds: float = 0.0
    total_tokens: int = 0
    window_loss: float = 0.0
    window_steps: int = 0
    window_tokens: int = 0
    window_seconds: float = 0.0

    def add(self, result: _StepResult) -> None:
        self.total_seconds += result.seconds
        self.total_tokens += result.tokens
        self.window_loss += result.loss
        self.window_steps += 1
        self.window_tokens += result.tokens
        self.window_seconds += result.seconds

    def reset_window(self) -> None:
        self.window_loss, self.window_steps, self.window_tokens, self.window_seconds = 0.0, 0, 0, 0.0


def _micro_batch_size(batch_size: int, plan: ContextPlan, world: int, accum: int) -> int:
    """Rows per micro-batch: ranks of one context-parallel replica share micro-batches, so the data order
    counts replicas."""
    micro_batches = plan.data_size * accum
    if batch_size % micro_batches:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by data-parallel replicas x "
                         f"train.grad_accum = {plan.data_size} x {accum} = {micro_batches} (the micro-batches of "
                         f"one step; replicas = world_size {world} / parallel.context {plan.size})")
    return batch_size // micro_batches


def _set_up(run: RunConfig, resume, task, ctx: distributed.DistContext) -> _Session:
    """Task, model (the same initialisation on every rank), optimiser and scheduler, restored from the
    checkpoint to resume from if any; the logger is opened by :func:`_open_log`."""
    cfg = run.train
    ckpt.check_output_dir(cfg.out_dir)  # writable: refused now, not at the first checkpoint
    plan = ContextPlan(run.parallel.context, ctx)
    micro_size = _micro_batch_size(cfg.batch_size, plan, ctx.world_size, cfg.grad_accum)
    micro_batches = plan.data_size * cfg.grad_accum
    if task is None:
        task = make_task(run.task.name, **run.task.kwargs)
    model_config: ModelConfig = model_config_for(task, run.model)
    task_config = dict(getattr(task, "config", {"name": run.task.name}))
    out_dir = Path(cfg.out_dir)
    source = ckpt.resolve_checkpoint(resume, out_dir)
    if source is not None:
        ckpt.check_resumable(source, run, micro_batches)
    fsdp = ctx.distributed and cfg.distributed == "fsdp"

    ckpt.seed_everything(cfg.seed)  # DDP also broadcasts rank 0's weights
    model = SSMModel(model_config)
    ckpt.check_output_dir(out_dir, ckpt.checkpoint_bytes(model) * ckpt.checkpoints_kept(
        cfg.steps - (0 if source is None else ckpt.read_run_info(source)["step"]), cfg.checkpoint_every,
        cfg.keep_last))
    if source is not None:
        ckpt.load_model_weights(model, source)
    model.to(ctx.device)
    plan.check(model, task)
    roles = classify_parameters(model)
    num_parameters = model.num_parameters()
    has_moe = "moe" in model_config.layer_mlps()
    wrapped = distributed.wrap_model(model, ctx, cfg.distributed, find_unused_parameters=has_moe,
                                     shard_layers=plan.context is None)
    inner = distributed.unwrap(wrapped)
    optimizer = build_optimizer(inner.named_parameters(), roles, cfg)
    scheduler = WarmupCosine(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                             min_lr_ratio=cfg.min_lr_ratio)
    session = _Session(run=run, ctx=ctx, task=task, model_config=model_config, task_config=task_config,
                       out_dir=out_dir, source=source, plan=plan, micro_batches=micro_batches, micro_size=micro_size,
                       fsdp=fsdp,
                       wrapped=wrapped, inner=inner, optimizer=optimizer, scheduler=scheduler,
                       num_parameters=num_parameters, last_good=source)
    session.loss_chunk_size = _resolve_loss_chunk_size(cfg, task, plan, model_config, micro_size)
    if cfg.recompute and not set_recompute(inner, True):
        raise ValueError(f"train.recompute=true, but no mixer of {model_config.layer_mixers()} supports recomputation "
                         "(Mamba and Mamba-2 do)")
    if source is not None:
        _restore_trainer_state(session, source)
    return session


#: the chunk of the "auto" LM loss, and the size of a micro-batch's logits (elements) from which it is used
AUTO_LOSS_CHUNK_SIZE = 1024
AUTO_LOSS_CHUNK_MIN_LOGITS = 1 << 24  # 64 MB of float32 logits


def _resolve_loss_chunk_size(cfg, task, plan: ContextPlan, model_config: ModelConfig, micro_size: int):
    """Tokens of logits per chunk of the LM loss, or None for the task's own loss on the full logits: the
    chunked loss applies to language-modelling tasks without context parallelism (whose loss is rescaled per
    rank from the logits)."""
    if cfg.loss_chunk_size is None or getattr(task, "kind", None) != "lm" or plan.context is not None:
        return None
    if cfg.loss_chunk_size != "auto":
        return cfg.loss_chunk_size
    logits = micro_size * max(int(getattr(task, "default_length", 0) or 0), 1) * model_config.padded_vocab_size
    return AUTO_LOSS_CHUNK_SIZE if logits >= AUTO_LOSS_CHUNK_MIN_LOGITS else None


def _restore_trainer_state(session: _Session, source: Path) -> None:
    """Optimiser, scheduler, step and this rank's RNG state from a training checkpoint."""
    state = ckpt.read_trainer_state(source)
    ckpt.load_optimizer_state(session.inner, session.optimizer, state["optimizer"], session.fsdp)
    session.scheduler.load_state_dict(state["scheduler"])
    session.start_step = int(state["step"])
    rng = state["rng"]  # one state per rank of the run that wrote it
    ckpt.set_rng_state(rng[session.ctx.rank] if len(rng) == session.ctx.world_size else rng[0])


def _open_log(session: _Session) -> None:
    """Open metrics.jsonl (and TensorBoard) on rank 0 and log the start (or resume) event."""
    cfg, ctx, source = session.cfg, session.ctx, session.source
    world, accum = ctx.world_size, cfg.grad_accum
    session.logger = logger = RunLogger(session.out_dir, enabled=ctx.is_main, total_steps=cfg.steps,
                                        start_step=session.start_step, progress=cfg.progress,
                                        tensorboard=cfg.tensorboard, append=source is not None)
    session.log({"event": "resume" if source is not None else "start", "step": session.start_step,
                 "steps": cfg.steps, "resumed_from": str(source) if source is not None else None,
                 "threads": torch.get_num_threads(), "device": str(ctx.device), "world_size": world,
                 "context": session.plan.size, "grad_accum": accum, "micro_batch_size": session.micro_size,
                 "num_parameters": session.num_parameters, "bf16": cfg.bf16,
                 "loss_chunk_size": session.loss_chunk_size, "recompute": cfg.recompute,
                 "distributed": cfg.distributed if world > 1 else None,
                 "tensorboard": str(logger.tensorboard_dir) if logger.tensorboard_dir else None,
                 "task": session.task_config, "model": session.model_config.to_dict(), "torch": torch.__version__})
    logger.message(f"ssmkit train: {session.num_parameters:,} parameters, {session.model_config.layer_mixers()} on "
                   f"{session.task_config.get('name')}, steps {session.start_step}->{cfg.steps}, device {ctx.device}, "
                   f"threads {torch.get_num_threads()}, world size {world} x grad_accum {accum}"
                   + (f", resumed from {source}" if source is not None else ""))


def _train_step(session: _Session, s: int) -> _StepResult:
    """Optimiser update ``s + 1``: this rank's ``grad_accum`` micro-batches (gradients synchronised on the
    last), the losses summed over all ranks, gradient clipping, a divergence check, then the update."""
    cfg, ctx, accum = session.cfg, session.ctx, session.cfg.grad_accum
    started = time.perf_counter()
    session.scheduler.set_step(s)
    session.optimizer.zero_grad(set_to_none=True)
    stats = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, aux sum, tokens
    for a in range(accum):
        plan = session.plan
        index = s * session.micro_batches + plan.data_rank * accum + a
        batch = plan.local_batch(session.task.batch("train", index, session.micro_size)).to(ctx.device)
        with distributed.gradient_sync(session.wrapped, enabled=a == accum - 1):
            with _autocast(ctx.device, cfg.bf16):
                if session.loss_chunk_size is not None:  # the model's chunked LM loss on aligned targets
                    out = _forward_checked(session.wrapped, batch, cfg.bf16, targets=batch.targets,
                                           loss_chunk_size=session.loss_chunk_size, **plan.model_kwargs())
                    loss = out.loss
                else:
                    out = _forward_checked(session.wrapped, batch, cfg.bf16, **plan.model_kwargs())
                    loss = plan.loss(session.task, out.logits, batch)
                total = loss
                if out.aux_loss is not None and cfg.aux_loss_weight:
                    total = loss + cfg.aux_loss_weight * out.aux_loss
            (total * plan.gradient_scale / accum).backward()
        stats[0] += loss.detach().double()
        stats[1] += 0.0 if out.aux_loss is None else out.aux_loss.detach().double()
        stats[2] += batch.num_tokens
    distributed.all_reduce_sum(stats, ctx)
    step_loss = float(stats[0]) / session.micro_batches
    grad_norm = clip_gradients(session.inner.parameters(), cfg.grad_clip)
    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
        last_good = session.last_good
        session.log({"event": "diverged", "step": s + 1, "loss": step_loss, "grad_norm": grad_norm,
                     "last_checkpoint": str(last_good) if last_good else None})
        raise TrainingDiverged(s + 1, cfg.steps, step_loss, grad_norm, last_good)
    session.optimizer.step()
    return _StepResult(loss=step_loss, aux_loss=float(stats[1]) / session.micro_batches, tokens=int(stats[2]),
                       grad_norm=grad_norm, seconds=time.perf_counter() - started)


def _log_train(session: _Session, step: int, result: _StepResult, throughput: _Throughput) -> None:
    """A ``train`` event with the mean loss and the tokens/s since the previous one."""
    cfg = session.cfg
    session.log({"event": "train", "step": step, "loss": throughput.window_loss / throughput.window_steps,
                 "aux_loss": result.aux_loss, "lr": cfg.lr * session.scheduler.factor(step - 1),
                 "grad_norm": result.grad_norm,
                 "tokens_per_s": throughput.window_tokens / max(throughput.window_seconds, 1e-9),
                 "train_seconds": throughput.total_seconds})
    throughput.reset_window()


def _evaluate_all_lengths(session: _Session, step: int) -> Dict[str, float]:
    """Evaluate at the training length and each ``train.eval_lengths``; log each; return them flat
    (``<split>_<metric>`` and ``<split>_<metric>@<length>``)."""
    cfg, task = session.cfg, session.task
    eval_size = cfg.eval_batch_size or cfg.batch_size
    flat: Dict[str, float] = {}
    for length in [None] + [n for n in cfg.eval_lengths if n != task.default_length]:
        metrics = evaluate(session.inner, task, split=cfg.eval_split, batches=cfg.eval_batches, batch_size=eval_size,
                           length=length, device=session.ctx.device, bf16=cfg.bf16)
        shown = length if length is not None else task.default_length
        session.log({"event": "eval", "step": step, "split": cfg.eval_split, "length": shown, **metrics})
        suffix = "" if length is None else f"@{length}"
        flat.update({f"{cfg.eval_split}_{k}{suffix}": v for k, v in metrics.items() if k != "count"})
    return flat


def _save_checkpoint(session: _Session, directory: Path, step: int, metrics: Dict[str, float]) -> Path:
    """Write a training checkpoint: every rank gathers (collectives under FSDP), rank 0 writes, and all
    ranks wait for the files to be whole (and all stop if rank 0 failed)."""
    ctx, inner, world = session.ctx, session.inner, session.ctx.world_size
    weights = ckpt.gather_model_state(inner, session.fsdp)
    optim_state = ckpt.gather_optimizer_state(inner, session.optimizer, session.fsdp)
    rngs = distributed.all_gather_object(ckpt.rng_state(), ctx)
    failure = None
    if ctx.is_main:
        try:
            ckpt.write_checkpoint(
                directory, model_config=session.model_config, weights=weights,
                trainer_state={"step": step, "optimizer": optim_state, "scheduler": session.scheduler.state_dict(),
                               "rng": rngs, "world_size": world, "micro_batches": session.micro_batches},
                run_info=ckpt.make_run_info(session.run, step=step, task_config=session.task_config,
                                            world_size=world, micro_batches=session.micro_batches, metrics=metrics))
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, not wait at a barrier
            failure = f"{type(err).__name__}: {err}"
            if not ctx.distributed:
                raise
    failure = distributed.broadcast_object(failure, ctx)
    if failure is not None:
        raise RuntimeError(f"writing checkpoint {directory} failed on rank 0: {failure}")
    return directory


def _save_periodic_checkpoint(session: _Session, step: int, metrics: Dict[str, float]) -> None:
    """``checkpoints/step-NNNNNN``, then prune to ``train.keep_last`` (rank 0) and log it."""
    session.last_good = _save_checkpoint(session, session.out_dir / ckpt.CHECKPOINTS / f"step-{step:06d}", step,
                                         metrics)
    if session.ctx.is_main:
        removed = ckpt.prune_checkpoints(session.out_dir, session.cfg.keep_last)
        session.log({"event": "checkpoint", "step": step, "path": str(session.last_good),
                     "removed": [str(p) for p in removed]})


def _train(run: RunConfig, resume, task, ctx: distributed.DistContext) -> TrainResult:
    session = _set_up(run, resume, task, ctx)
    _open_log(session)
    cfg = session.cfg
    losses: List[float] = []
    throughput = _Throughput()
    latest_metrics: Dict[str, float] = {}
    session.wrapped.train()
    try:
        for s in range(session.start_step, cfg.steps):
            step = s + 1
            result = _train_step(session, s)
            losses.append(result.loss)
            throughput.add(result)
            session.logger.progress(1, result.loss, result.tokens / max(result.seconds, 1e-9))
            last = step == cfg.steps  # the final evaluation and checkpoint follow the loop
            if step % cfg.log_every == 0 or last:
                _log_train(session, step, result, throughput)
            if cfg.eval_every and step % cfg.eval_every == 0 and not last:
                latest_metrics = _evaluate_all_lengths(session, step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not last:
                _save_periodic_checkpoint(session, step, latest_metrics)

        final_metrics = _evaluate_all_lengths(session, cfg.steps)
        final_dir = _save_checkpoint(session, session.out_dir / ckpt.FINAL, cfg.steps, final_metrics)
        tokens_per_second = throughput.total_tokens / throughput.total_seconds if throughput.total_seconds > 0 else 0.0
        session.log({"event": "end", "step": cfg.steps, "train_seconds": throughput.total_seconds,
                     "tokens_per_s": tokens_per_second, "checkpoint": str(final_dir), **final_metrics})
    finally:
        session.logger.close()
    curves = plot_curves(session.out_dir / METRICS_FILE, session.out_dir / CURVES_FILE) if ctx.is_main else None
    return TrainResult(final_metrics=final_metrics, history=session.history, losses=losses,
                       start_step=session.start_step, steps=cfg.steps, checkpoint_dir=final_dir,
                       out_dir=session.out_dir, num_parameters=session.num_parameters,
                       tokens_per_second=tokens_per_second, train_seconds=throughput.total_seconds,
                       threads=torch.get_num_threads(), device=str(ctx.device), world_size=ctx.world_size,
                       curves=curves, resumed_from=session.source, model=session.inner)
