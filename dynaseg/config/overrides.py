"""``section.field=value`` overrides on frozen config dataclasses, with type coercion."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

import yaml

from dynaseg.errors import UserError

__all__ = [
    "ConfigError",
    "apply_overrides",
    "with_overrides",
    "from_dict",
    "to_dict",
    "field_paths",
]


class ConfigError(UserError, ValueError):
    """A bad key or value; its message is one line meant for the user."""


def field_paths(cfg: Any, prefix: str = "") -> list[str]:
    """Every overridable dotted key of ``cfg``."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += field_paths(value, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        for allowed in args:
            if value == allowed or str(value) == str(allowed):
                return allowed
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, dict) and "kind" in value:
            # Discriminated union of configs: pick the dataclass whose ``kind`` admits the value.
            for arg in args:
                if dataclasses.is_dataclass(arg) and value["kind"] in typing.get_args(
                    typing.get_type_hints(arg).get("kind")
                ):
                    return _coerce(value, arg, key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            try:
                return int(str(value).replace("_", ""))
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    raise ConfigError(f"{key}: unsupported field type {hint}")


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _set(cfg: Any, parts: list[str], value: Any, full_key: str, root: Any) -> Any:
    names = {f.name: f for f in dataclasses.fields(cfg)}
    if parts[0] not in names:
        raise _unknown(full_key, field_paths(root))
    hints = typing.get_type_hints(type(cfg))
    name = parts[0]
    if len(parts) == 1:
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current) and not isinstance(value, dict):
            raise ConfigError(
                f"{full_key} is a section; set one of its fields, e.g. {full_key}.{dataclasses.fields(current)[0].name}=..."
            )
        new = _coerce(value, hints[name], full_key)
    else:
        child = getattr(cfg, name)
        if not dataclasses.is_dataclass(child):
            raise _unknown(full_key, field_paths(root))
        new = _set(child, parts[1:], value, full_key, root)
    try:
        return dataclasses.replace(cfg, **{name: new})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{full_key}: {e}") from None


def with_overrides(cfg: Any, values: dict[str, Any]) -> Any:
    """Return a copy of ``cfg`` with dotted keys replaced (values are coerced to the field types)."""
    for key, value in values.items():
        cfg = _set(cfg, key.split("."), value, key, cfg)
    return cfg


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply command-line ``key=value`` strings; values are parsed as YAML scalars or lists."""
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed[key.strip()] = value
    return with_overrides(cfg, parsed)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for YAML/JSON."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        return v

    return convert(cfg)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build ``cls`` from a nested dict, coercing every value and rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(prefix + key, [prefix + n for n in names])
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)
