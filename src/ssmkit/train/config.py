"""The run configuration: what to learn (task), with what network (model) and how (train).

    run = load_run_config("configs/induction.yaml", ["train.lr=3e-3", "model.mixer=mamba2"])
    model_config = model_config_for(make_task(run.task.name, **run.task.kwargs), run.model)

A config file mirrors the three sections::

    task:  {name: induction_heads, kwargs: {vocab_size: 16}}
    model: {d_model: 64, n_layers: 2, mixer: mamba}
    train: {steps: 2000, batch_size: 32, lr: 3.0e-3}

``model`` holds the architecture fields of :class:`~ssmkit.models.ModelConfig` that the task does not
decide; the head, the vocabulary or input width and the number of classes or outputs come from the task
(:func:`model_config_for`). ``train`` holds optimisation, evaluation, checkpointing and execution settings.
Unknown keys anywhere are an error that names the closest known key (:mod:`ssmkit.utils.configs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..models.config import ModelConfig
from ..utils.configs import ConfigError, build, load_config

#: ModelConfig fields that :func:`model_config_for` takes from the task, never from ``ModelSpec``.
TASK_MODEL_FIELDS = ("vocab_size", "input_dim", "head", "num_classes", "output_dim", "complement_map")
DISTRIBUTED = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
TASK_KIND_TO_HEAD = {"lm": "lm", "classification": "classifier", "regression": "regression"}


@dataclass
class TaskSpec:
    """A task by registry name (:func:`ssmkit.tasks.make_task`) and its keyword settings."""

    name: str = "induction_heads"
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelSpec:
    """The architecture fields of :class:`~ssmkit.models.ModelConfig` that do not come from the task
    (their meaning and defaults are ModelConfig's, except a smaller default size)."""

    d_model: int = 64
    n_layers: int = 2
    mixer: Union[str, List[str]] = "mamba"
    mixer_kwargs: Dict[str, Any] = field(default_factory=dict)
    mlp: Union[str, List[str]] = "none"
    mlp_hidden: Optional[int] = None
    num_experts: int = 8
    top_k: int = 2
    mlp_activation: str = "silu"
    moe_renormalize: bool = True
    moe_shared_hidden: Optional[int] = None
    moe_router: str = "softmax"
    moe_groups: int = 1
    moe_topk_groups: int = 1
    moe_scale: float = 1.0
    moe_expert: str = "gated"
    mlp_bias: bool = False
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_weight_offset: float = 0.0
    embedding_multiplier: float = 1.0
    logit_softcap: Optional[float] = None
    residual_multiplier: float = 1.0
    logit_multiplier: float = 1.0
    shared_block: Optional[Dict[str, Any]] = None
    # parallel mixers
    parallel_combine: str = "sum"
    parallel_branch_norm: bool = False
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 1
    pooling: str = "mean"
    bidirectional: bool = False
    rc_equivariant: bool = False  # needs a task with a complement_map (DNA tokens)


@dataclass
class TrainConfig:
    """Optimisation, evaluation, checkpointing and execution settings.

    Steps are counted in optimiser updates; "step k" is the state after k updates (k = 1..steps).
    """

    # optimisation
    steps: int = 1000
    batch_size: int = 32  # global: summed over processes and accumulation micro-batches
    grad_accum: int = 1  # micro-batches per process per step
    lr: float = 1e-3
    ssm_lr_scale: float = 1.0  # learning-rate multiplier of SSM parameters (ssmkit.train.optim)
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr * min_lr_ratio at `steps`
    min_lr_ratio: float = 0.1
    grad_clip: Optional[float] = 1.0  # max global gradient norm; null disables clipping
    aux_loss_weight: float = 0.01  # weight of the mixture-of-experts load-balancing loss
    bf16: bool = False  # torch.autocast(dtype=bfloat16) around forward and loss
    # LM loss this many tokens of logits at a time, never holding a micro-batch's (B, L, V) logits and their
    # gradient (ops.lm_loss): "auto" = 1024 when those logits would exceed 64 MB of float32, null = the full
    # logits; the choice is logged in the start event. Execution only: the loss and gradients are the same.
    loss_chunk_size: Union[int, str, None] = "auto"
    # Mamba / Mamba-2 layers keep only their in_proj output for the backward and recompute the rest there
    # (ssmkit.models.set_recompute): less memory for ~one more core forward. Execution only.
    recompute: bool = False
    seed: int = 0  # model initialisation and RNG; the data order is the task's own (task.kwargs.seed)
    # evaluation
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 4
    eval_batch_size: Optional[int] = None  # default: batch_size
    eval_split: str = "val"
    eval_lengths: List[int] = field(default_factory=list)  # extra lengths (e.g. train short, test long)
    # checkpoints and logs
    out_dir: str = "runs/run"
    checkpoint_every: int = 500  # 0: only the final checkpoint
    keep_last: int = 3  # periodic checkpoints kept (0 keeps all); `final` is separate
    log_every: int = 10
    progress: bool = True  # progress bar on stderr
    tensorboard: bool = True  # write TensorBoard events when torch.utils.tensorboard imports
    # execution
    threads: Optional[int] = None  # torch.set_num_threads; null leaves PyTorch's choice (reported)
    device: str = "auto"  # "auto" (cuda when available, reported), "cpu" or "cuda"
    distributed: str = "ddp"  # under torchrun: "ddp" (DistributedDataParallel) or "fsdp" (fully_shard)

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "eval_batches", "log_every")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0; got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not self.ssm_lr_scale >= 0:
            raise ValueError(f"ssm_lr_scale must be >= 0; got {self.ssm_lr_scale}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {self.betas!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or null (no clipping); got {self.grad_clip}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or null; got {self.eval_batch_size}")
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"eval_split must be 'val' or 'test'; got {self.eval_split!r}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.eval_lengths):
            raise ValueError(f"eval_lengths must be positive ints; got {self.eval_lengths!r}")
        if self.loss_chunk_size is not None and self.loss_chunk_size != "auto" and (
                isinstance(self.loss_chunk_size, bool) or not isinstance(self.loss_chunk_size, int)
                or self.loss_chunk_size < 1):
            raise ValueError(f"loss_chunk_size must be a positive int, 'auto' or null; got {self.loss_chunk_size!r}")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be true or false; got {self.recompute!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null; got {self.threads}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {list(DEVICES)}; got {self.device!r}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"distributed must be one of {list(DISTRIBUTED)}; got {self.distributed!r}")
        if not self.out_dir:
            raise ValueError("out_dir must be a non-empty path")


@dataclass
class ParallelConfig:
    """How the processes of a torchrun job share the work (execution only, like ``train.distributed``).

    ``context``: ranks that split each sequence into contiguous slices and pass recurrent states between
    them (:mod:`ssmkit.parallel.context`); the world is ``world_size / context`` data-parallel replicas of
    ``context`` consecutive ranks. 1: data parallelism only.
    """

    context: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
            raise ValueError(f"context must be a positive int; got {self.context!r}")


@dataclass
class RunConfig:
    """One training run: ``task``, ``model``, ``train`` and ``parallel`` sections (module docstring)."""

    task: TaskSpec = field(default_factory=TaskSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["train"]["betas"] = list(data["train"]["betas"])
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunConfig":
        return build(cls, data)


def load_run_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults <- YAML/JSON file ``path`` <- dotted ``overrides`` (``"train.lr=3e-3"``), type-checked."""
    return load_config(RunConfig, path, list(overrides or ()))


# --------------------------------------------------------------------------------------------------
def model_config_for(task, spec: ModelSpec) -> ModelConfig:
    """The :class:`ModelConfig` for ``task``: architecture from ``spec``, the rest from the task.

    ``task.kind`` picks the head ("lm" -> "lm", "classification" -> "classifier", "regression" ->
    "regression"); token tasks give ``vocab_size``, real-valued tasks ``input_dim``; classification gives
    ``num_classes``, regression ``output_dim``; a DNA task gives its tokenizer's ``complement_map`` (used when
    ``spec.rc_equivariant``).
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec; got {type(spec).__name__}")
    kind = getattr(task, "kind", None)
    if kind not in TASK_KIND_TO_HEAD:
        raise ValueError(f"task.kind must be one of {list(TASK_KIND_TO_HEAD)}; got {kind!r}")
    fields = dataclasses.asdict(spec)
    fields.update(head=TASK_KIND_TO_HEAD[kind], vocab_size=task.vocab_size, input_dim=task.input_dim)
    fields["complement_map"] = getattr(task, "complement_map", None)  # DNA tasks: reverse complement of each token
    if kind == "classification":
        fields["num_classes"] = task.num_classes
    elif kind == "regression":
        fields["output_dim"] = task.output_dim
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err


def config_differences(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two nested dicts (missing keys count as different)."""
    keys = sorted(set(a) | set(b))
    out: List[str] = []
    for key in keys:
        dotted = f"{prefix}{key}"
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict) and va and vb:
            out.extend(config_differences(va, vb, dotted + "."))
        elif _normalise(va) != _normalise(vb):
            out.append(dotted)
    return out


def _normalise(value):
    if isinstance(value, tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
