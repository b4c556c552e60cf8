"""ssmkit: state space sequence models in pure PyTorch, run in parallel for training and as a
recurrence for streaming, exact against the reference implementations and fast on any machine."""

from ._version import __version__  # noqa: F401

from . import ops  # noqa: F401
from .layers import MIXERS, Mixer, build_mixer, get_mixer, register_mixer  # noqa: F401
from .layers import S4, S4D, S5, Attention, LinearAttention, Mamba, Mamba2  # noqa: F401

# Every registered mixer class is also reachable as ssmkit.<ClassName>, a new one included.
globals().update({cls.__name__: cls for cls in MIXERS.values()})
from .models import ModelConfig, SSMModel, from_config, from_pretrained  # noqa: F401
from .models.quantization import quantize  # noqa: F401
from .text import generate_text, load_tokenizer  # noqa: F401
