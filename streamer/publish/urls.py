"""Publisher URLs: schemes, ``from_url``, and ``redact`` (passwords never shown).

URL forms accepted by ``from_url`` (DESIGN section 4)::

    mqtt://[user@]host[:port][/prefix]     port 1883 by default
    mqtts://[user@]host[:port][/prefix]    TLS, port 8883 by default
    jsonl:PATH                             jsonl:- is stdout
    memory:
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from streamer.errors import ConfigError
from streamer.publish.base import DEFAULT_INSTANCE, DEFAULT_PREFIX, Publisher

DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for errors and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True, slots=True)
class MqttUrl:
    """The parts of an ``mqtt://`` or ``mqtts://`` URL."""

    host: str
    port: int
    tls: bool
    prefix: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_mqtt_url(url: str, *, prefix_default: str = DEFAULT_PREFIX) -> MqttUrl:
    """Split ``mqtt[s]://[user:pass@]host[:port][/prefix]``; ConfigError names the bad part."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError("publish.url", f"bad port in {shown!r}: {exc}") from exc
    if parts.scheme.lower() not in ("mqtt", "mqtts"):
        raise ConfigError(
            "publish.url", f"unknown scheme {parts.scheme!r} in {shown!r}; allowed: mqtt, mqtts"
        )
    tls = parts.scheme.lower() == "mqtts"
    if not parts.hostname:
        raise ConfigError("publish.url", f"missing host in {shown!r} (mqtt://host:port[/prefix])")
    if parts.query or parts.fragment:
        raise ConfigError(
            "publish.url", f"query/fragment not supported in {shown!r}; pass options as arguments"
        )
    prefix = parts.path.strip("/") or prefix_default
    if any(c in prefix for c in "+#") or "//" in prefix:
        raise ConfigError("publish.url", f"bad topic prefix {prefix!r} in {shown!r}")
    return MqttUrl(
        host=parts.hostname,
        port=port if port is not None else (DEFAULT_MQTTS_PORT if tls else DEFAULT_MQTT_PORT),
        tls=tls,
        prefix=prefix,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _parse_mqtt(url: str, prefix_default: str, instance: str, options: Mapping[str, Any]) -> Any:
    from streamer.publish.mqtt import MqttPublisher

    parsed = parse_mqtt_url(url, prefix_default=prefix_default)
    kwargs: dict[str, Any] = {
        "host": parsed.host,
        "port": parsed.port,
        "prefix": parsed.prefix,
        "instance": instance,
        "tls": parsed.tls,
        "username": parsed.username,
        "password": parsed.password,
    }
    kwargs.update(options)
    return MqttPublisher(**kwargs)


def _parse_jsonl(url: str, prefix_default: str, instance: str, options: Mapping[str, Any]) -> Any:
    from streamer.publish.jsonl import JsonlPublisher

    path = url[len("jsonl:") :]
    if path.startswith("//"):  # tolerate jsonl:///abs/path
        path = path[2:]
    if not path:
        raise ConfigError("publish.url", f"missing path in {url!r} (jsonl:PATH, jsonl:- = stdout)")
    return JsonlPublisher(path, prefix=prefix_default, **options)


def _parse_memory(url: str, prefix_default: str, instance: str, options: Mapping[str, Any]) -> Any:
    from streamer.publish.memory import MemoryPublisher

    if url not in ("memory:", "memory://"):
        raise ConfigError("publish.url", f"memory publisher takes no path: {url!r} (use memory:)")
    return MemoryPublisher(prefix=prefix_default, **options)


SCHEMES: dict[str, Callable[[str, str, str, Mapping[str, Any]], Publisher]] = {
    "mqtt": _parse_mqtt,
    "mqtts": _parse_mqtt,
    "jsonl": _parse_jsonl,
    "memory": _parse_memory,
}


def from_url(
    url: str,
    *,
    prefix_default: str = DEFAULT_PREFIX,
    instance: str = DEFAULT_INSTANCE,
    **options: Any,
) -> Publisher:
    """A publisher for ``url``; ``options`` go to its constructor (e.g. ``cafile=``).

    Raises ``ConfigError`` (key ``publish.url``) naming the bad part of the URL.
    """
    scheme, sep, _ = url.partition(":")
    if not sep or scheme.lower() not in SCHEMES:
        allowed = ", ".join(f"{s}:" for s in SCHEMES)
        raise ConfigError(
            "publish.url", f"unknown scheme {scheme!r} in {redact(url)!r}; allowed: {allowed}"
        )
    try:
        return SCHEMES[scheme.lower()](url, prefix_default, instance, options)
    except TypeError as exc:  # an unknown keyword option
        raise ConfigError("publish.url", f"bad option for {redact(url)!r}: {exc}") from exc
