"""Typed configs: YAML files loaded into dataclasses, strictly.

Every config is a (nested) dataclass. `load_config` reads a YAML file with `yaml.safe_load`, applies
command-line overrides (`train.lr=1e-4`), and builds the dataclass, checking every key and type.
Unknown keys, wrong types and impossible values are `ConfigError`s that name the file and the key.
Validation of values lives in each dataclass's `__post_init__`; a `ValueError` raised there is
reported with the file and section it came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from the YAML file at `path` (or the defaults if None) plus `key.sub=value` overrides."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        with path.open(encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, source=source)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` set; values are parsed as YAML scalars."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        *parents, leaf = key.strip().split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {_join(prefix, unknown[0])!r}; valid keys here: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    data = {name: _onto_default(fields[name], value) for name, value in data.items()}
    kwargs = {name: _coerce(hints[name], value, source, _join(prefix, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        if prefix and str(err).startswith(f"{prefix}."):  # the message names its whole key already
            raise ConfigError(f"{source}: {err}") from err
        raise ConfigError(f"{source}: {prefix or 'config'}: {err}") from err


def _onto_default(field: dataclasses.Field, value: Any) -> Any:
    """A partial section over its field's default: `text_encoder: {lr: 2e-4}` keeps the stage's own text-encoder
    defaults (its default_factory's values) rather than falling back to the section class's bare defaults."""
    if not isinstance(value, Mapping) or field.default_factory is dataclasses.MISSING:
        return value
    default = field.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    # A section class may say how its defaults yield to a partial section (a frozen text encoder drops the
    # training settings of a default that trains).
    base = default.section_defaults(value) if hasattr(default, "section_defaults") else to_dict(default)
    return _merged(base, value)


def _merged(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        nested = isinstance(value, Mapping) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if nested else value
    return merged


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML-safe data (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, so a run records exactly what it ran with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against type `tp`, converting where YAML's spelling is ambiguous (1e-4, lists)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{source}: {key}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item_type = args[0] if args else Any
        items = [_coerce(item_type, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {
            _coerce(key_type, k, source, key): _coerce(value_type, v, source, f"{key}.{k}") for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
    if tp in (bool, str):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{source}: {key}: expected {tp.__name__}, got {value!r}")
    raise TypeError(f"config type {tp!r} for {key} is not supported by ldm.config")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _plain(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    return data
