"""JSON Lines publisher: one ``{"topic": ..., "payload": {...}}`` line per message.

The embedded default (``jsonl:-`` writes to stdout). Each line is flushed as it is written, so
``tail -f`` or a pipe sees messages live. Payloads are encoded exactly as on MQTT
(``streamer.publish.base.encode``: orjson, NaN -> null); ``retain`` has no meaning in a file
and is ignored.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from streamer.errors import PublishError
from streamer.publish.base import DEFAULT_PREFIX, Publisher, encode


def jsonl_line(topic: str, payload: Mapping[str, Any]) -> bytes:
    """The bytes of one line (newline included) for ``topic`` and ``payload``."""
    return b'{"topic":' + orjson.dumps(topic) + b',"payload":' + encode(payload) + b"}\n"


class JsonlPublisher(Publisher):
    """Writes messages as JSON lines to ``path`` (``"-"`` = stdout).

    ``append=True`` appends to an existing file instead of truncating it. ``flush_every``
    flushes after that many lines (1 = every message, the default).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        prefix: str = DEFAULT_PREFIX,
        append: bool = False,
        flush_every: int = 1,
    ) -> None:
        if flush_every < 1:
            raise PublishError(f"flush_every must be >= 1, got {flush_every}")
        self.prefix = prefix
        self.path = str(path)
        self.published = 0
        self._flush_every = flush_every
        self._unflushed = 0
        self._owns = self.path != "-"
        self._out: BinaryIO | None
        if self._owns:
            try:
                self._out = Path(self.path).open("ab" if append else "wb")  # noqa: SIM115
            except OSError as exc:
                raise PublishError(f"cannot open {self.path!r} for writing: {exc}") from exc
        else:
            self._out = sys.stdout.buffer

    async def publish(self, topic: str, payload: Mapping[str, Any], *, retain: bool = True) -> None:
        self._write(jsonl_line(topic, payload))

    async def publish_encoded(self, topic: str, data: bytes, *, retain: bool = True) -> None:
        self._write(b'{"topic":' + orjson.dumps(topic) + b',"payload":' + data + b"}\n")

    async def clear_retained(self, topic: str) -> None:
        """A ``{"topic": ..., "payload": null}`` line: the topic's retained message is gone."""
        self._write(b'{"topic":' + orjson.dumps(topic) + b',"payload":null}\n')

    def _write(self, line: bytes) -> None:
        if self._out is None:
            raise PublishError(f"jsonl publisher {self.path!r} is closed")
        try:
            self._out.write(line)
            self._unflushed += 1
            if self._unflushed >= self._flush_every:
                self._out.flush()
                self._unflushed = 0
        except OSError as exc:
            raise PublishError(f"cannot write to {self.path!r}: {exc}") from exc
        self.published += 1

    def flush(self) -> None:
        """Flush buffered lines now."""
        if self._out is not None:
            self._out.flush()
            self._unflushed = 0

    async def aclose(self) -> None:
        if self._out is None:
            return
        out, self._out = self._out, None
        with contextlib.suppress(OSError, ValueError):  # stdout closed by a pipe reader
            out.flush()
        if self._owns:
            out.close()
