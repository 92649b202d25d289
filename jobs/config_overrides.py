"""One configuration path for every command: a typed config dataclass, built from

    its defaults  <  ``--config`` YAML  <  the command's flags  <  ``--set key=value``

Fields are named by dotted path (``loop.epochs``, ``optim.schedule.base_lr``) and every value is
converted to the type of the field it replaces. A command's flags are documented shorthands for
fields, declared in a small table of :class:`Flag` next to the command (``--epochs`` sets
``loop.epochs``); ``--help`` shows the field each flag sets and its default. A flag and a ``--set``
(or two flags) naming the same field with different values is an error naming both: nothing is
silently shadowed. A new field needs only its line in the dataclass to be settable by YAML and
``--set``; a line in the command's table gives it a flag too.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args, get_type_hints

import yaml

from jobs.user_paths import PathField, absolute_location, as_path_fields

T = TypeVar("T")


REQUIRED = object()  # the default of a field that has none: the config needs a value for it
_UNSET = object()


class MissingFields(ValueError):
    """Required fields that no layer gave a value; ``names`` are their dotted paths, ``shown`` how
    the message names them (their flags, where they have one)."""

    def __init__(self, names: Sequence[str], shown: Sequence[str] | None = None) -> None:
        super().__init__(f"needs {_listing(list(shown or names))} (a flag, or the field in --config / --set)")
        self.names = tuple(names)


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _convert(value: Any, current: Any, name: str) -> Any:
    """``value`` as the type of ``current``, the value of the field it replaces."""
    if isinstance(value, dict) and not (current is None or isinstance(current, dict)):
        raise ValueError(f"config {name} is not a group of fields; cannot set {sorted(value)}")
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
    if isinstance(current, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `--set out=2024` is the folder "2024"
    return value


def _optional_kind(config_class: type, name: str) -> type | None:
    """The scalar type a ``T | None`` field holds (bool, int, float or str), from its annotation: a field
    whose current value is None has no type of its own to convert a ``--set`` string to."""
    try:
        hint = get_type_hints(config_class)[name]
    except Exception:  # an annotation that does not resolve: leave the value as given
        return None
    kinds = [kind for kind in get_args(hint) if kind is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float, str) else None


def _field_default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return REQUIRED


def _nest(settings: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": {"d": 2}}`` -> ``{"a": {"b": 1}, "c": {"d": 2}}``."""
    tree: dict[str, Any] = {}
    for key, value in settings.items():
        *heads, last = str(key).split(".")
        branch = {last: _nest(value) if isinstance(value, dict) else value}
        for head in reversed(heads):
            branch = {head: branch}
        tree = _merge(tree, branch)
    return tree


def _merge(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    """``upper`` laid over ``lower``: groups merge field by field, anything else is replaced."""
    merged = dict(lower)
    for key, value in upper.items():
        below = merged.get(key)
        merged[key] = _merge(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged


def _build(base: Any, tree: dict[str, Any], prefix: str = "") -> Any:
    """``base`` (a config dataclass, or an instance of one) with ``tree``'s values, type-checked;
    a class is constructed once, with every value, so its validation sees the final config."""
    is_class = isinstance(base, type)
    specs = {spec.name: spec for spec in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    for name, value in tree.items():
        if name not in specs:
            raise ValueError(f"config has no field {prefix}{name!r}; fields: {sorted(specs)}")
        current = _field_default(specs[name]) if is_class else getattr(base, name)
        path = f"{prefix}{name}"
        if current is REQUIRED:
            changes[name] = _convert(value, "", path) if specs[name].type in ("str", str) else value
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config {path}: expected a mapping of fields, got {value!r}")
            changes[name] = _build(current, value, f"{path}.")
        elif current is None and (kind := _optional_kind(base if is_class else type(base), name)) is not None:
            none = value is None or (isinstance(value, str) and value.lower() in ("null", "none"))
            changes[name] = None if none else _convert(value, kind(), path)
        else:
            changes[name] = _convert(value, current, path)
    if not is_class:
        return dataclasses.replace(base, **changes)
    missing = [f"{prefix}{name}" for name, spec in specs.items()
               if name not in changes and _field_default(spec) is REQUIRED]
    if missing:
        raise MissingFields(missing)
    return base(**changes)


def apply_overrides(config: T, overrides: dict[str, Any]) -> T:
    """A copy of ``config`` with ``overrides`` ({"a.b": v} or nested dicts) applied, type-checked."""
    return _build(config, _nest(overrides))


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> {"a.b": 1, "c": "x"} (values parsed as YAML scalars)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of config fields in a ``--config`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of fields at the top level")
    return loaded


def load_config(base: T | type[T], yaml_path: str | Path | None = None, sets: Sequence[str] | None = None,
                flags: dict[str, Any] | None = None) -> T:
    """``base``'s values (a config dataclass's defaults, or an instance), overridden by the YAML file
    (if any), then by ``flags`` ({dotted field: value}), then by ``--set`` items."""
    tree = _nest(read_yaml(yaml_path)) if yaml_path is not None else {}
    tree = _merge(tree, _nest(flags or {}))
    return _build(base, _merge(tree, _nest(parse_set(sets or []))))


# ---------------------------------------------------------------- flags: shorthands for fields

@dataclass(frozen=True)
class Flag:
    """A command-line shorthand for one config field.

    ``name`` defaults to ``--`` and the field's last part with dashes (``limits.max_pixels`` ->
    ``--max-pixels``); ``type`` to the type of the field's default (int, float, else str). A flag
    with ``const`` is a switch that sets the field to that value (``--no-progress``: False).
    """

    field: str
    help: str
    name: str = ""
    type: Callable[[str], Any] | None = None
    const: Any = _UNSET
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    positional: bool = False

    @property
    def spelling(self) -> str:
        if self.name:
            return self.name
        last = self.field.rsplit(".", 1)[-1]
        return last if self.positional else "--" + last.replace("_", "-")

    @property
    def dest(self) -> str:
        return f"flag:{self.spelling}"


def default_at(base: Any, path: str) -> Any:
    """The default value of the field at ``path`` in ``base`` (a config class or instance)."""
    value = base
    for part in path.split("."):
        if isinstance(value, type):
            specs = {spec.name: spec for spec in dataclasses.fields(value)}
            value = _field_default(specs[part])
        else:
            value = getattr(value, part)
    return value


def add_config_arguments(parser: argparse.ArgumentParser, base: Any, flags: Sequence[Flag],
                         paths: Sequence[str | PathField] = ()) -> None:
    """Add ``flags``, ``--config`` and ``--set`` to a command whose config is built from ``base``
    (read back with :func:`config_from_args`). ``paths`` are the fields that hold the user's paths
    or URLs, however they are set (:func:`absolute_paths` makes them absolute)."""
    for spec in as_path_fields(paths):
        default_at(base, spec.field)  # raises for a field the config does not have
    for flag in flags:
        default = default_at(base, flag.field)  # also checks that the field exists
        if flag.const is not _UNSET:
            sets = f"{flag.field}={flag.const}"
        elif default is REQUIRED:
            sets = f"{flag.field}; required"
        else:
            sets = flag.field if default in (None, "") else f"{flag.field}; default {default}"
        text = f"{flag.help} [{sets}]".replace("%", "%%")
        if flag.positional:
            parser.add_argument(flag.dest, metavar=flag.spelling, help=text)
        elif flag.const is not _UNSET:
            parser.add_argument(flag.spelling, dest=flag.dest, action="store_const", const=flag.const,
                                default=None, help=text)
        else:
            kind = flag.type or (type(default) if type(default) in (int, float) else str)
            metavar = flag.metavar or flag.field.rsplit(".", 1)[-1].upper()
            parser.add_argument(flag.spelling, dest=flag.dest, type=kind, choices=flag.choices,
                                metavar=None if flag.choices else metavar, default=None, help=text)
    parser.add_argument("--config", metavar="YAML",
                        help="YAML file of config fields (its values are overridden by flags, then by --set)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set one config field by dotted name, e.g. --set " + (flags[0].field if flags else "x")
                             + "=...; a flag naming the same field must agree")
    parser.set_defaults(config_base=base, config_flags=tuple(flags), config_paths=as_path_fields(paths))


def _flag_values(args: argparse.Namespace) -> dict[str, tuple[str, Any]]:
    """{field: (flag as typed, value)} of the flags given, refusing two that disagree."""
    given: dict[str, tuple[str, Any]] = {}
    for flag in args.config_flags:
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        shown = (flag.spelling if flag.const is not _UNSET else
                 f"argument {flag.spelling}={value}" if flag.positional else f"{flag.spelling} {value}")
        if flag.field in given and not _same(given[flag.field][1], value):
            raise ValueError(f"{given[flag.field][0]} and {shown} both set {flag.field}; keep one")
        given[flag.field] = (shown, value)
    return given


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def command_line_fields(args: argparse.Namespace) -> frozenset[str]:
    """The fields named on the command line, by a flag or a ``--set``."""
    return frozenset(_flag_values(args)) | frozenset(parse_set(args.set))


def config_from_args(args: argparse.Namespace) -> Any:
    """The command's config: defaults < ``--config`` < flags < ``--set``, a flag and a ``--set`` that
    name the same field with different values refused, missing required fields named by their flags."""
    flags = _flag_values(args)
    sets = parse_set(args.set)
    for name, value in sets.items():
        if name in flags and not _same(flags[name][1], value):
            raise ValueError(f"{flags[name][0]} and --set {name}={value} both set {name}; keep one")
    try:
        return load_config(args.config_base, args.config, args.set,
                           {name: value for name, (_, value) in flags.items()})
    except MissingFields as missing:
        spellings = {flag.field: flag.spelling for flag in args.config_flags}
        ordered = [flag.field for flag in args.config_flags if flag.field in missing.names]
        ordered += [name for name in missing.names if name not in ordered]
        raise MissingFields(ordered, [spellings.get(name, name) for name in ordered]) from None


def absolute_paths(config: T, args: argparse.Namespace) -> T:
    """``config`` (the command's, from :func:`config_from_args`) with every path field the command
    declared made absolute: what the command runs with, whichever process opens the files."""
    changes = {}
    for spec in args.config_paths:
        value = default_at(config, spec.field)
        if isinstance(value, str) and value not in spec.words:
            changes[spec.field] = absolute_location(value)
    return apply_overrides(config, changes)
