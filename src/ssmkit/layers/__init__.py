"""Sequence mixers under one contract (see :mod:`ssmkit.layers.base`), one file per mixer.

Importing this package registers every mixer below under its name (``ssmkit.build_mixer("s4d", ...)``).
"""

from .base import Mixer, State
from .registry import MIXERS, build_mixer, get_mixer, register_mixer
from .s4 import S4
from .s4d import S4D
from .s5 import S5
from .attention import Attention
from .linear_attention import LinearAttention
from .mamba import Mamba
from .mamba2 import Mamba2
