"""Registry of sequence mixers: names ("s4", "s4d", "s5", ...) -> classes.

A new mixer is one file in ``ssmkit/layers`` plus one ``@register_mixer("name")`` line; the shared
contract tests in ``tests/layers/test_contract.py`` then run on it.
"""

from __future__ import annotations

import difflib
from typing import Callable, Dict, Type

MIXERS: Dict[str, type] = {}


def register_mixer(name: str) -> Callable[[Type], Type]:
    """Class decorator that registers a :class:`~ssmkit.layers.base.Mixer` subclass under ``name``."""

    def decorator(cls: Type) -> Type:
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(f"mixer name {name!r} is already registered to {MIXERS[name].__name__}")
        cls.name = name
        MIXERS[name] = cls
        return cls

    return decorator


def get_mixer(name: str) -> type:
    """The mixer class registered under ``name``; unknown names get the closest known one suggested."""
    if name not in MIXERS:
        close = difflib.get_close_matches(str(name), list(MIXERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown mixer {name!r}: known mixers are {sorted(MIXERS)}{hint}")
    return MIXERS[name]


def build_mixer(name: str, d_model: int, **kwargs):
    """Instantiate the mixer registered under ``name``."""
    return get_mixer(name)(d_model=d_model, **kwargs)
