"""Argument checks shared by every layer of ssmkit.

Each check raises a ``TypeError`` or ``ValueError`` whose message names the argument, what was expected
and what was received, e.g. ``ValueError("x must be (batch, length, d_model=16); got (2, 7, 8)")``.
"""

from __future__ import annotations

from typing import Sequence

import torch


def check_tensor(name: str, value, *, floating: bool = True, complex_ok: bool = False) -> torch.Tensor:
    """Require a tensor, floating point unless ``floating=False`` (complex only when ``complex_ok``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if floating:
        ok = value.is_floating_point() or (complex_ok and value.is_complex())
        if not ok:
            kinds = "a floating-point or complex" if complex_ok else "a floating-point"
            raise TypeError(f"{name} must be {kinds} tensor; got dtype {value.dtype}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence, description: str) -> None:
    """Require ``value.shape`` to match ``expected``; ``None`` entries match any size.

    ``description`` spells the expected layout for the message, e.g. ``"(batch, length, d_model=16)"``.
    """
    shape = tuple(value.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        raise ValueError(f"{name} must be {description}; got {shape}")


def check_same_device(names_values: dict[str, torch.Tensor | None]) -> None:
    """Require every non-None tensor to live on the same device."""
    items = [(k, v) for k, v in names_values.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, value in items[1:]:
        if value.device != first.device:
            raise ValueError(f"{name} is on {value.device} but {first_name} is on {first.device}; "
                             "move them to one device")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}")
    return value
