"""Training: ``train(run)`` with AdamW parameter groups, warm-up + cosine, gradient clipping and
accumulation, bfloat16 autocast, task evaluation, atomic checkpoints with exact resume, and data-parallel
training under torchrun (DDP, or FSDP as an option).

    from ssmkit.train import load_run_config, train
    result = train(load_run_config("configs/induction.yaml", ["train.steps=500"]))
"""

from .checkpointing import (CheckpointCorrupt, CheckpointMismatch, OutputDirError, latest_checkpoint,  # noqa: F401
                            list_checkpoints, load_run_config_from_checkpoint)
from .config import ModelSpec, RunConfig, TaskSpec, TrainConfig, load_run_config, model_config_for  # noqa: F401
from .loop import TrainingDiverged, TrainResult, evaluate, evaluate_checkpoint, forward_batch, train  # noqa: F401
from .optim import SSM_PARAMETER_NAMES, classify_parameters, lr_factor  # noqa: F401
