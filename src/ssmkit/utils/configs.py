"""Configuration files (YAML or JSON) with dotted command-line overrides, checked against dataclasses.

    cfg = load_config(RunConfig, "configs/induction.yaml", ["train.lr=3e-3", "model.mixer=MMAM"])

Values in overrides are parsed as YAML scalars/lists (``3e-3``, ``true``, ``[1, 2]``, ``null``) and then checked
against the field's annotated type; unknown keys are an error that suggests the closest name.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the dotted key."""


def read_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top; got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(data: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def build(cls: Type[T], data: Dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a nested dict, checking keys and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping; got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; known keys: {sorted(fields)}"
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


def _coerce(tp, value, dotted: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build(tp, value, prefix=dotted + ".")
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, dotted)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{dotted} must be {_name(tp)}; got {value!r}")
    if tp is Any:
        return value
    if origin in (list, List, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted} must be a list; got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted} must be a mapping; got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{dotted} must be an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{dotted} must be a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{dotted} must be a string; got {value!r}")
    return value


def _name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args) + (" or null" if type(None) in typing.get_args(tp) else "")


def load_config(cls: Type[T], path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (),
                base: Optional[Dict[str, Any]] = None) -> T:
    """Defaults <- ``base`` <- file ``path`` <- dotted ``overrides``, checked into dataclass ``cls``."""
    data: Dict[str, Any] = json.loads(json.dumps(base)) if base else {}
    if path is not None:
        _merge(data, read_config_file(path))
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return build(cls, data)


def _merge(into: Dict[str, Any], other: Dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def to_dict(obj) -> Dict[str, Any]:
    return dataclasses.asdict(obj)
