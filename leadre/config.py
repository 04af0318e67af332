"""Configs are data: one YAML file per setting (e.g. `configs/demo.yaml`), one section per step.

Each section maps onto a frozen dataclass; an unknown key or a value of the wrong type is an error naming it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the shipped configs: demo.yaml, movielens-1m.yaml
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


class ConfigError(ValueError):
    pass


def read_config(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _check_type(where: str, value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(k for k in options if k is not type(None))
        origin = typing.get_origin(kind)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value) if origin is tuple else list(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(kind, type) and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def section(config: dict[str, Any], name: str, cls: type[T], source: str = "config", **overrides: Any) -> T:
    """Build `cls` from `config[name]`, then apply the non-None `overrides` (command-line flags win)."""
    values = config.get(name) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {name!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {name}.{key} (known: {', '.join(sorted(fields))})")
    kwargs = {k: _check_type(f"{source}: {name}.{k}", v, hints[k]) for k, v in values.items()}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{source}: {name}: {e}") from None
