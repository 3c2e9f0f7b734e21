"""Publisher URLs: schemes, ``from_url``, and ``redact`` (passwords never shown).

URL forms accepted by ``from_url`` (DESIGN section 4)::

    mqtt://[user@]host[:port][/prefix]     port 1883 by default
    mqtts://[user@]host[:port][/prefix]    TLS, port 8883 by default
    jsonl:PATH                             jsonl:- is stdout
    memory:

A URL may carry a password (``mqtt://user:password@host``) only where it is not on a command
line: in a config file's ``publish.urls`` or ``STREAMER__PUBLISH__URLS``. ``argv_password_error``
is the refusal the commands print for a password in ``--publish``/``--url`` (every user sees
argv in ``ps`` and ``/proc``); the other sources are in ``streamer.publish.mqtt`` (credentials).
Every error and log line that shows a URL shows ``redact(url)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from streamer.errors import ConfigError
from streamer.publish.base import DEFAULT_INSTANCE, DEFAULT_PREFIX, Publisher
from streamer.settings import has_url_password, redact_secrets

DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for errors and logs).

    Works on text, not on a parsed URL, so a password that breaks URL parsing (an unencoded
    ``/``, ``#``, ``?`` or ``@``) is hidden too, and so is every URL in a longer text.
    """
    return redact_secrets(url)


def argv_password_error(option: str, url: str) -> str | None:
    """The refusal for a password inside a URL given on the command line, or None."""
    if not has_url_password(url):
        return None
    return (
        f"{option} {redact(url)}: a password on the command line is visible to every user "
        "of this machine (ps, /proc/PID/cmdline, shell history), so it is refused. Drop it "
        "from the URL and give it as STREAMER_MQTT_PASSWORD in the environment, in a file "
        "named by STREAMER_MQTT_PASSWORD_FILE, as the systemd credential mqtt_password "
        "(LoadCredential=mqtt_password:/etc/streamer/mqtt_password), or in the URL inside a "
        "config file (publish.urls, --config)"
    )


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
    except ValueError:  # (its message may quote a piece of a mangled password: not shown)
        raise ConfigError(
            "publish.url",
            f"bad port or host in {shown!r} (a password with / # ? @ must be %-encoded)",
        ) from None
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
        raise ConfigError(
            "publish.url", f"missing path in {redact(url)!r} (jsonl:PATH, jsonl:- = stdout)"
        )
    return JsonlPublisher(path, prefix=prefix_default, **options)


def _parse_memory(url: str, prefix_default: str, instance: str, options: Mapping[str, Any]) -> Any:
    from streamer.publish.memory import MemoryPublisher

    if url not in ("memory:", "memory://"):
        raise ConfigError(
            "publish.url", f"memory publisher takes no path: {redact(url)!r} (use memory:)"
        )
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
        raise ConfigError("publish.url", f"bad option for {redact(url)!r}: {exc}") from None
