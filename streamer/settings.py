"""TOML tables -> frozen dataclasses, validated, with errors that name the key.

``build(cls, table, path)`` fills a (frozen) dataclass from a TOML table by field name and type
hint: bool, int, float, str, ``Literal[...]`` (the allowed values are listed in the error),
``tuple[X, ...]``, ``X | None``, ``dict[str, X]`` and nested dataclasses. Missing keys take the
dataclass default; unknown keys are errors (listing the allowed ones) so typos do not pass
silently. ``apply_env`` overlays ``STREAMER__SECTION__KEY=value`` variables (value in TOML
syntax, e.g. ``42``, ``true``, ``"x"``, ``["a", "b"]``; a bare word is taken as a string).

Secrets. Errors show the offending value, and a value may be a URL with a password in it
(``mqtt://bot:s3cret@broker``): every value an error shows goes through ``redact_secrets``,
which replaces the password of every ``scheme://user:password@`` in a text by ``***`` (also in
URLs too broken to parse, e.g. an unencoded ``/`` or ``#`` in the password). ``read_secret``
finds a secret outside the config, in this order (the first source that is set wins):

1. the environment variable ``STREAMER_{NAME}`` (``STREAMER_MQTT_PASSWORD``), or the file named
   by ``STREAMER_{NAME}_FILE`` (``STREAMER_MQTT_PASSWORD_FILE``; one trailing newline is
   dropped); setting both is an error, so it is never a guess which one is used;
2. the systemd credential ``{name}`` (``mqtt_password``): ``$CREDENTIALS_DIRECTORY/{name}``,
   which systemd fills from ``LoadCredential=mqtt_password:/etc/streamer/mqtt_password``
   (systemd.exec(5), "Credentials"): readable only by the service, never in its environment.

Callers put a password written into a URL of the config file first (it names one broker).

This module is the generic machinery; ``streamer.config`` declares the daemon's settings.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from streamer.errors import ConfigError

T = TypeVar("T")
ENV_PREFIX = "STREAMER__"
SECRET_ENV_PREFIX = "STREAMER_"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
REDACTED = "***"

# scheme://user:password@ -- the password runs to the last "@" of the token (a password with an
# unencoded "/", "#" or "@" is still covered); tokens end at white space and quotes
_URL_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:'\"]*):(?P<password>[^\s'\"]*)@"
)


def redact_secrets(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@...`` replaced by ``***``."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", text)


def has_url_password(text: str) -> bool:
    """True if ``text`` holds a ``scheme://user:password@`` (an empty password counts)."""
    return _URL_PASSWORD.search(text) is not None


def _show(value: Any) -> str:
    """``repr(value)`` for an error message, passwords in URLs redacted."""
    return redact_secrets(repr(value))


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_secret(name: str, env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The secret ``name`` (``mqtt_password``) and where it came from, or None if unset.

    Sources in order (module docstring): ``STREAMER_{NAME}`` or the file named by
    ``STREAMER_{NAME}_FILE`` (both set: ``ConfigError``), then the systemd credential
    ``$CREDENTIALS_DIRECTORY/{name}``. A named file that cannot be read, or an empty secret,
    is a ``ConfigError`` that names the variable and the file, never the secret.
    """
    env = os.environ if env is None else env
    var = SECRET_ENV_PREFIX + name.upper()
    file_var = var + "_FILE"
    value, path = env.get(var), env.get(file_var)
    if value is not None and path is not None:
        raise ConfigError(var, f"set either {var} or {file_var}, not both")
    if value is not None:
        if not value:
            raise ConfigError(var, "is set but empty")
        return value, f"environment {var}"
    if path is not None:
        return _read_secret_file(Path(path), file_var), f"file {path} ({file_var})"
    directory = env.get(CREDENTIALS_ENV)
    if directory:
        cred = Path(directory) / name
        if cred.is_file():
            return _read_secret_file(cred, f"systemd credential {name}"), (
                f"systemd credential {name}"
            )
    return None


def _read_secret_file(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(what, f"cannot read {str(path)!r}: {reason}") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(what, f"{str(path)!r} is empty")
    return text


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
            raise ConfigError(path, f"got {_show(value)}, allowed: {', '.join(map(repr, allowed))}")
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
        raise ConfigError(path, f"got {_show(value)}, expected {_describe(tp)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(path, f"expected a list, got {_show(value)}")
        item = get_args(tp)[0]
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a table, got {_show(value)}")
        item = get_args(tp)[1]
        return {str(k): _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a table, got {_show(value)}")
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {_show(value)}")
        if not math.isfinite(value):  # TOML has nan and inf; no setting means them
            raise ConfigError(path, f"expected a finite number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_show(value)}")
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
        raise ConfigError(path or cls.__name__, redact_secrets(str(exc))) from None
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
