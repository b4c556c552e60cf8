"""Models built from mixers: config, blocks, language models and classifiers, generation, checkpoints."""

from .checkpoints import from_config, from_pretrained, save_pretrained
from .config import ModelConfig
from .generation import GenerationOutput
from .model import ModelOutput, SSMModel, set_recompute
from .vision import VisionClassifier, VisionConfig

# the checkpoint formats register themselves in models.formats' table (interop sits above the model)
from . import interop  # noqa: E402,F401
