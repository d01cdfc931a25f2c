"""Config dataclasses to and from plain mappings (YAML, JSON), with `--set KEY=VALUE` overrides.

The schema itself is `dalle.config`; this is the machinery that checks every key and type
against it, so that a typo fails with one line naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from dalle.errors import DalleError


class ConfigError(DalleError):
    """A config file or override that does not fit the schema."""


def from_dict(cls: type, values: dict[str, Any], where: str = "", source: str = "config") -> Any:
    """Builds dataclass `cls` from a plain dict, checking every key and type.

    Args:
        cls: the dataclass to build.
        values: the parsed YAML (or JSON) mapping.
        where: the dotted path of this section, for error messages.
        source: the file name, for error messages.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {where or 'top level'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{path}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, path, source)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _coerce(hint: Any, value: Any, path: str, source: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path, source)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(option for option in options if option is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {path} must be a list, got {value!r}")
        return [_coerce(item, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (type(value) is not hint):
        quote = " (YAML reads no / yes / off / on as false / true: quote the word)" if hint is str and isinstance(
            value, bool) else ""
        raise ConfigError(f"{source}: {path} must be {hint.__name__}, got {type(value).__name__} {value!r}{quote}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (what config.json holds)."""
    return dataclasses.asdict(config)


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Applies `a.b.c=value` strings (values parsed as YAML) onto a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: expected KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {key} goes through a value that is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            first = str(error).splitlines()[0]
            raise ConfigError(f"{source}: {item!r}: the value is not valid YAML ({first})") from None
    return raw
