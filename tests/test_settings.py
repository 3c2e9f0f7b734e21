"""The generic TOML -> dataclass machinery: types, allowed values, unknown keys, env."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from streamer.errors import ConfigError
from streamer.settings import apply_env, build, parse_env_value


@dataclass(frozen=True)
class Inner:
    level: Literal["debug", "info"] = "info"
    port: int = 0


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    ratio: float = 1.0
    enabled: bool = True
    urls: tuple[str, ...] = ()
    inner: Inner = field(default_factory=Inner)
    limit: int | None = None
    per_model: dict[str, float] = field(default_factory=dict)


def test_defaults_and_values() -> None:
    assert build(Outer, {}) == Outer()
    got = build(
        Outer,
        {
            "ratio": 2,
            "urls": ["a", "b"],
            "inner": {"level": "debug"},
            "limit": 3,
            "per_model": {"svi": 0.5},
        },
    )
    assert got.ratio == 2.0 and isinstance(got.ratio, float)
    assert got.urls == ("a", "b")
    assert got.inner == Inner(level="debug")
    assert got.limit == 3
    assert got.per_model == {"svi": 0.5}


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ({"inner": {"level": "loud"}}, "inner.level", "allowed: 'debug', 'info'"),
        ({"ratio": "fast"}, "ratio", "expected a number"),
        ({"enabled": 1}, "enabled", "true or false"),
        ({"inner": {"port": 1.5}}, "inner.port", "integer"),
        ({"urls": "a"}, "urls", "expected a list"),
        ({"nmae": "typo"}, "nmae", "allowed here: enabled, inner, limit, name"),
        ({"inner": 3}, "inner", "expected a table"),
        ({"limit": "many"}, "limit", "int | NoneType"),
    ],
)
def test_errors_name_the_key(table: dict[str, object], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(Outer, table)
    assert info.value.key == key
    assert words in str(info.value)


def test_env_overlay() -> None:
    env = {
        "STREAMER__INNER__PORT": "9100",
        "STREAMER__URLS": '["mqtt://h:1"]',
        "STREAMER__NAME": "bare words",
        "OTHER": "ignored",
    }
    table = apply_env({"inner": {"level": "debug"}}, env)
    got = build(Outer, table)
    assert got.inner == Inner(level="debug", port=9100)
    assert got.urls == ("mqtt://h:1",)
    assert got.name == "bare words"
    assert parse_env_value("true") is True
