"""In-memory publisher: the test double, shipped as package code (like httpx's MockTransport).

Keeps every message in ``messages`` (in order) and the latest retained payload per topic in
``retained``, as a subscriber would decode them from the wire: payloads go through the very same
``encode`` (orjson, NaN -> null) and back, so tests compare exactly what bots would receive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamer.errors import PublishError
from streamer.publish.base import DEFAULT_PREFIX, Publisher, decode, encode


@dataclass(frozen=True, slots=True)
class Message:
    """One published message, payload as decoded from its JSON bytes."""

    topic: str
    payload: dict[str, Any]  # empty for a cleared topic
    retain: bool
    cleared: bool = False  # an empty retained message (``clear_retained``)


class MemoryPublisher(Publisher):
    """Records messages in ``messages`` and the latest retained one per topic in ``retained``."""

    def __init__(self, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.messages: list[Message] = []
        self.retained: dict[str, dict[str, Any]] = {}
        self.closed = False

    async def publish(self, topic: str, payload: Mapping[str, Any], *, retain: bool = True) -> None:
        if self.closed:
            raise PublishError("memory publisher is closed")
        decoded = decode(encode(payload))
        self.messages.append(Message(topic, decoded, retain))
        if retain:
            self.retained[topic] = decoded

    async def clear_retained(self, topic: str) -> None:
        if self.closed:
            raise PublishError("memory publisher is closed")
        self.messages.append(Message(topic, {}, True, cleared=True))
        self.retained.pop(topic, None)

    def topics(self) -> list[str]:
        """Topics seen, in order of first publication."""
        return list(dict.fromkeys(m.topic for m in self.messages))

    def latest(self, topic: str) -> dict[str, Any] | None:
        """The last payload published on ``topic`` (retained or not), or None (also after
        the topic was cleared)."""
        for message in reversed(self.messages):
            if message.topic == topic:
                return None if message.cleared else message.payload
        return None

    def clear(self) -> None:
        self.messages.clear()
        self.retained.clear()

    async def aclose(self) -> None:
        self.closed = True
