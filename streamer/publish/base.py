"""The publisher plug point: one tiny base class and payload encoding.

A publisher delivers ``(topic, payload)`` pairs somewhere: an MQTT broker (``mqtt``), a JSON
Lines file or stdout (``jsonl``), or a list in memory (``memory``, the test double). Like an
httpx transport it has one method that does the work plus ``aclose()``, and is an async context
manager::

    async with from_url("mqtt://127.0.0.1:1883/streamer", instance="deribit-btc") as pub:
        await pub.publish(topic_surface(pub.prefix, "deribit", "BTC", "svi"), payload)

Payloads are JSON objects encoded with orjson as UTF-8. Non-finite numbers are never sent:
``NaN``, ``inf`` and ``-inf`` (Python floats, numpy scalars, numpy array elements) become
``null`` (orjson does this natively; ``sanitize`` gives the same result as plain Python objects).

``streamer.publish.urls.from_url`` picks an implementation from a URL.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from streamer.errors import InputError
from streamer.lifecycle import AsyncResource

DEFAULT_PREFIX = "streamer"
DEFAULT_INSTANCE = "streamer"

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


class Publisher(AsyncResource, ABC):
    """Delivers JSON payloads to topics. Subclasses implement ``publish`` and ``aclose``.

    ``prefix`` is the topic prefix this publisher was configured with (from its URL or the
    default); callers build topics with it (``streamer.publish.payloads.topic_surface``).
    """

    prefix: str = DEFAULT_PREFIX

    async def start(self) -> None:
        """Start background work (connections); called by ``__aenter__``."""

    @abstractmethod
    async def publish(self, topic: str, payload: Mapping[str, Any], *, retain: bool = True) -> None:
        """Hand ``payload`` over for delivery on ``topic``; never blocks for long."""

    async def wait_sent(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until what was handed over is with the broker:
        the service holds its feed meanwhile, so the broker and the bots have the cores. A
        publisher that writes at once (files, memory) or has no broker now returns at once."""

    async def publish_encoded(self, topic: str, data: bytes, *, retain: bool = True) -> None:
        """``publish`` a payload already encoded (``encode``'s bytes, made in another
        process); publishers that send bytes take them as they are."""
        await self.publish(topic, decode(data), retain=retain)

    async def deliver(
        self, topic: str, payload: Mapping[str, Any] | bytes, *, clear: bool = False
    ) -> None:
        """``publish`` the payload (``publish_encoded`` its JSON bytes), or with ``clear``
        ``clear_retained`` the topic."""
        if clear:
            await self.clear_retained(topic)
        elif isinstance(payload, bytes):
            await self.publish_encoded(topic, payload)
        else:
            await self.publish(topic, payload)

    @abstractmethod
    async def clear_retained(self, topic: str) -> None:
        """Remove ``topic``'s retained message (MQTT: an empty retained message), so that new
        subscribers no longer see it (a settled expiry, a model switched off)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Flush what can be flushed and release resources. Idempotent."""
