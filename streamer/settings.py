"""TOML tables -> frozen dataclasses, validated, with errors that name the key.

``build(cls, table, path)`` fills a (frozen) dataclass from a TOML table by field name and type
hint: bool, int, float, str, ``Literal[...]`` (the allowed values are listed in the error),
``tuple[X, ...]``, ``X | None``, ``dict[str, X]`` and nested dataclasses. Missing keys take the
dataclass default; unknown keys are errors (listing the allowed ones) so typos do not pass
silently. ``apply_env`` overlays ``STREAMER__SECTION__KEY=value`` variables (value in TOML
syntax, e.g. ``42``, ``true``, ``"x"``, ``["a", "b"]``; a bare word is taken as a string).

This module is the generic machinery; ``streamer.config`` declares the daemon's settings.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from streamer.errors import ConfigError

T = TypeVar("T")
ENV_PREFIX = "STREAMER__"


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"table of {_describe(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(path, f"got {value!r}, allowed: {', '.join(map(repr, allowed))}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"got {value!r}, expected {_describe(tp)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(path, f"expected a list, got {value!r}")
        item = get_args(tp)[0]
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a table, got {value!r}")
        item = get_args(tp)[1]
        return {str(k): _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a table, got {value!r}")
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise ConfigError(path, f"unsupported setting type {tp!r}")  # a bug in a dataclass


def build(cls: type[T], table: Mapping[str, Any], path: str = "") -> T:
    """Fill dataclass ``cls`` from ``table``; ``path`` prefixes key names in errors."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(key, f"unknown setting; allowed here: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{path}.{name}" if path else name
        kwargs[name] = _convert(hints[name], value, key)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(path or cls.__name__, str(exc)) from exc
    return obj


def parse_env_value(text: str) -> Any:
    """A TOML value (``42``, ``true``, ``"a"``, ``[1, 2]``), else the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env(table: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``STREAMER__A__B=value`` onto ``table['a']['b']`` (keys lower-cased)."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in table.items()}
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__") if k]
        if not keys:
            continue
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {}
            node[k] = child = dict(child)
            node = child
        node[keys[-1]] = parse_env_value(text)
    return out
