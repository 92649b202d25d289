"""Typed run configs from YAML and ``--set key=value``: the dataclass defaults are the paper's
values; a YAML file and then each ``--set`` override fields by dotted name (``loop.epochs=80``,
``optim.schedule.base_lr=1e-4``), each value converted to the type of the field it replaces."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _convert(value: Any, current: Any, name: str) -> Any:
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ValueError(f"config {name}: expected a mapping of fields, got {value!r}")
        return apply_overrides(current, value, prefix=f"{name}.")
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ValueError(f"config {name}: expected true/false, got {value!r}")
    try:
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(current, float):
            return float(value)
    except (TypeError, ValueError):
        kind = type(current).__name__
        raise ValueError(f"config {name}: expected {kind}, got {value!r}") from None
    if isinstance(current, tuple):
        value = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {name}: expected a list, got {value!r}")
        return tuple(value)
    if isinstance(value, str) and value.lower() in ("null", "none") and current is not None:
        return None
    return value


def apply_overrides(config: T, overrides: dict[str, Any], prefix: str = "") -> T:
    """A copy of ``config`` with ``overrides`` ({"a.b": v} or nested dicts) applied, type-checked."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, rest = str(key).partition(".")
        if head not in fields:
            raise ValueError(f"config has no field {prefix}{head!r}; fields: {sorted(fields)}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            changes[head] = _convert(value, getattr(config, head), f"{prefix}{head}")
    for head, sub in nested.items():
        current = changes.get(head, getattr(config, head))
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"config {prefix}{head} is not a group of fields; cannot set {sorted(sub)}")
        changes[head] = apply_overrides(current, sub, prefix=f"{prefix}{head}.")
    return dataclasses.replace(config, **changes)


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> {"a.b": 1, "c": "x"} (values parsed as YAML scalars)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def load_config(default: T, yaml_path: str | Path | None = None, sets: list[str] | None = None) -> T:
    """``default``, overridden by the YAML file (if any), then by ``--set`` items."""
    config = default
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of fields at the top level")
        config = apply_overrides(config, loaded)
    return apply_overrides(config, parse_set(sets or []))
