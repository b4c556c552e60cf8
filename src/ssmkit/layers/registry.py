"""Registry of sequence mixers: names ("s4", "s4d", "s5", ...) -> classes.

A new mixer is one file in ``ssmkit/layers`` with one ``@register_mixer("name")`` line and its metadata
(see :mod:`ssmkit.layers.base`); importing ``ssmkit.layers`` imports every module of the package, and the
shared contract tests in ``tests/layers/test_contract.py``, the optimiser groups, the hybrid pattern letters
and compare read the registry.
"""

from __future__ import annotations

import difflib
from typing import Callable, Dict, Type

MIXERS: Dict[str, type] = {}


def register_mixer(name: str) -> Callable[[Type], Type]:
    """Class decorator that registers a :class:`~ssmkit.layers.base.Mixer` subclass under ``name``."""

    def decorator(cls: Type) -> Type:
        _check_metadata(name, cls)
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(f"mixer name {name!r} is already registered to {MIXERS[name].__name__}")
        cls.name = name
        MIXERS[name] = cls
        return cls

    return decorator


def _check_metadata(name: str, cls: Type) -> None:
    """Refuse a mixer whose metadata the rest of ssmkit would otherwise miss silently."""
    letter = getattr(cls, "pattern_letter", None)
    if not isinstance(letter, str) or len(letter) != 1:
        raise TypeError(f"mixer {name!r} ({cls.__name__}) must set pattern_letter to one character "
                        f"(its letter in hybrid patterns such as 'MMMAMMMM'); got {letter!r}")
    for other, other_cls in MIXERS.items():
        if other != name and other_cls.pattern_letter == letter:
            raise ValueError(f"mixer {name!r} ({cls.__name__}) has pattern_letter {letter!r}, "
                             f"already used by {other!r}")
    config = getattr(cls, "contract_config", None)
    if not isinstance(config, dict):
        raise TypeError(f"mixer {name!r} ({cls.__name__}) must set contract_config to a dict of constructor "
                        f"kwargs for a small instance (d_model=8) used by the contract tests; got {config!r}")
    for attr in ("ssm_parameter_names", "depth_scaled"):
        value = getattr(cls, attr, None)
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"mixer {name!r} ({cls.__name__}) must set {attr} to a tuple of parameter paths; "
                            f"got {value!r}")
    backends = getattr(cls, "contract_backends", None)
    if not isinstance(backends, tuple) or not backends or not all(b is None or isinstance(b, str) for b in backends):
        raise TypeError(f"mixer {name!r} ({cls.__name__}) must set contract_backends to a non-empty tuple of "
                        f"backend names (None for its default); got {backends!r}")
    for attr in ("supports_packing", "constant_state"):
        if not isinstance(getattr(cls, attr, None), bool):
            raise TypeError(f"mixer {name!r} ({cls.__name__}) must set {attr} to a bool; "
                            f"got {getattr(cls, attr, None)!r}")


def pattern_letters() -> Dict[str, str]:
    """Hybrid pattern letter -> registered mixer name, in registration order."""
    return {cls.pattern_letter: name for name, cls in MIXERS.items()}


def unregister_mixer(name: str) -> None:
    """Remove ``name`` from the registry (for mixers defined in tests)."""
    MIXERS.pop(name, None)


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
