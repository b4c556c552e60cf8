"""Sequence mixers under one contract (see :mod:`ssmkit.layers.base`), one file per mixer.

Importing this package imports every module in it (sorted by name, so the registry's order is fixed), which
registers each mixer under its name (``ssmkit.build_mixer("s4d", ...)``) and exposes its class here under
its class name (``from ssmkit.layers import Mamba``). A new mixer needs no line in this file.
"""

import importlib
import pkgutil

from .base import Mixer, State
from .registry import MIXERS, build_mixer, get_mixer, pattern_letters, register_mixer

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
for _cls in list(MIXERS.values()):
    globals()[_cls.__name__] = _cls
del _module, _cls

# The built-in mixers, named for readers and static analysers; the loop above already bound them.
from .s4 import S4  # noqa: E402
from .s4d import S4D  # noqa: E402
from .s5 import S5  # noqa: E402
from .attention import Attention  # noqa: E402
from .linear_attention import LinearAttention  # noqa: E402
from .mamba import Mamba  # noqa: E402
from .mamba2 import Mamba2  # noqa: E402
from .hawk import Hawk  # noqa: E402
