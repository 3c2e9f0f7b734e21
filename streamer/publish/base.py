"""The publisher plug point: one tiny base class, payload encoding, and ``from_url``.

A publisher delivers ``(topic, payload)`` pairs somewhere: an MQTT broker (``mqtt``), a JSON
Lines file or stdout (``jsonl``), or a list in memory (``memory``, the test double). Like an
httpx transport it has one method that does the work plus ``aclose()``, and is an async context
manager::

    async with from_url("mqtt://127.0.0.1:1883/streamer", instance="deribit-btc") as pub:
        await pub.publish(topic_surface(pub.prefix, "deribit", "BTC", "svi"), payload)

Payloads are JSON objects encoded with orjson as UTF-8. Non-finite numbers are never sent:
``NaN``, ``inf`` and ``-inf`` (Python floats, numpy scalars, numpy array elements) become
``null`` (orjson does this natively; ``sanitize`` gives the same result as plain Python objects).

URL forms accepted by ``from_url`` (DESIGN section 4)::

    mqtt://[user:pass@]host[:port][/prefix]     port 1883 by default
    mqtts://[user:pass@]host[:port][/prefix]    TLS, port 8883 by default
    jsonl:PATH                                  jsonl:- is stdout
    memory:
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import numpy as np
import orjson

from streamer.errors import ConfigError, InputError

DEFAULT_PREFIX = "streamer"
DEFAULT_INSTANCE = "streamer"
DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883

_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def sanitize(value: Any) -> Any:
    """``value`` as plain JSON-ready Python objects with every non-finite float turned into None.

    Walks dicts (keys made ``str``), lists and tuples; numpy scalars become Python numbers and
    numpy arrays nested lists. Finite float arrays take a fast path (one ``isfinite`` pass and
    ``tolist``); others are converted via an object array with ``None`` in the holes.
    """
    if isinstance(value, float):  # np.float64 is a float subclass too
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value.item() if isinstance(value, np.generic) else value
    if isinstance(value, Mapping):
        return {str(k): sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize(v) for v in value]
    if isinstance(value, np.ndarray):
        return _sanitize_array(value)
    if isinstance(value, complex | np.complexfloating):
        raise TypeError("cannot publish complex numbers")
    if isinstance(value, np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.generic):  # numpy ints and bools
        return value.item()
    raise TypeError(f"cannot publish a value of type {type(value).__name__}")


def _sanitize_array(arr: np.ndarray[Any, Any]) -> Any:
    if arr.dtype.kind in "fc":
        if arr.dtype.kind == "c":
            raise TypeError("cannot publish complex numbers")
        finite = np.isfinite(arr)
        if finite.all():
            return arr.tolist()
        obj = arr.astype(object)
        obj[~finite] = None
        return obj.tolist()
    if arr.dtype.kind in "biu":
        return arr.tolist()
    return [sanitize(v) for v in arr.tolist()]


def _default(obj: Any) -> Any:
    # orjson calls this for what it cannot serialize natively (non-contiguous arrays, float16...).
    if isinstance(obj, np.ndarray | np.generic):
        return sanitize(obj)
    raise TypeError(f"cannot publish a value of type {type(obj).__name__}")


def encode(payload: Mapping[str, Any]) -> bytes:
    """The UTF-8 JSON bytes of ``payload`` (orjson; NaN and infinities become ``null``).

    Raises ``InputError`` (argument ``payload``) for values JSON cannot carry.
    """
    try:
        return orjson.dumps(payload, default=_default, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError, e.g. non-str dict keys: the general path
        pass
    try:
        return orjson.dumps(sanitize(payload))
    except TypeError as exc:
        raise InputError("payload", str(exc)) from exc


def decode(data: bytes | str) -> Any:
    """Parse one JSON payload (the inverse of ``encode``)."""
    return orjson.loads(data)


class Publisher(ABC):
    """Delivers JSON payloads to topics. Subclasses implement ``publish`` and ``aclose``.

    ``prefix`` is the topic prefix this publisher was configured with (from its URL or the
    default); callers build topics with it (``streamer.publish.payloads.topic_surface``).
    """

    prefix: str = DEFAULT_PREFIX

    async def start(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Start background work (connections); called by ``__aenter__``."""

    @abstractmethod
    async def publish(self, topic: str, payload: Mapping[str, Any], *, retain: bool = True) -> None:
        """Hand ``payload`` over for delivery on ``topic``; never blocks for long."""

    @abstractmethod
    async def aclose(self) -> None:
        """Flush what can be flushed and release resources. Idempotent."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


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
