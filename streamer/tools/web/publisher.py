"""The live page inside the daemon: a publisher that keeps what it is given for the page.

``streamer run`` with ``[web] listen = "127.0.0.1:8808"`` adds a ``WebPublisher`` beside its
configured publishers (``streamer.cli.run``): every message the daemon publishes goes into a
``WebState`` exactly as a subscriber would receive it (a cleared topic as None), and the page
is served from the daemon's own event loop (``streamer.tools.web.server``). The shard's own
status row comes from the feed states the service reports (``set_feed_state``), so the page
works with any publisher, a broker or none (``jsonl:``). Other shards are not seen here: a
``streamer web --broker`` process shows the whole bus.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import structlog
from aiohttp import web

from streamer import __version__
from streamer.errors import ConfigError
from streamer.publish.base import Publisher
from streamer.settings import is_loopback
from streamer.tools.web.server import WebApp, page_url, parse_listen, serve
from streamer.tools.web.state import DEFAULT_HISTORY, WebState

log = structlog.get_logger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class WebPublisher(Publisher):
    """Serves the live page of this daemon's own messages on ``listen`` (``HOST:PORT``)."""

    def __init__(
        self,
        *,
        listen: str,
        prefix: str = "streamer",
        instance: str = "streamer",
        history: int = DEFAULT_HISTORY,
        allow_remote: bool = False,
    ) -> None:
        self.host, self.port = parse_listen(listen, allow_remote=allow_remote)
        self.prefix = prefix.strip("/")
        self.instance = instance
        self.state = WebState(self.prefix, history=history)
        self.app = WebApp.live(self.state, source=f"streamer run ({instance})")
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._feeds: dict[str, Any] = {}
        self._started_ms = _now_ms()
        self._status_topic = f"{self.prefix}/status/{instance}"

    async def start(self) -> None:
        if not is_loopback(self.host):
            log.warning("web_listening_remote", host=self.host, port=self.port)
        try:
            self._runner, self.port = await serve(self.app, self.host, self.port)
        except OSError as exc:
            raise ConfigError(
                "web.listen", f"cannot serve the page on {self.host}:{self.port}: {exc}"
            ) from None
        self.url = page_url(self.host, self.port)
        self._status("online")

    async def publish(self, topic: str, payload: Mapping[str, Any], *, retain: bool = True) -> None:
        self.state.ingest(topic, payload, _now_ms())

    async def clear_retained(self, topic: str) -> None:
        self.state.ingest(topic, None, _now_ms())

    def set_feed_state(self, venue: str, state: Any) -> None:
        """The service's feed state (as the MQTT publisher's status topic carries it)."""
        self._feeds[venue] = state
        self._status("online")

    def _status(self, state: str, reason: str | None = None) -> None:
        now = _now_ms()
        payload = {
            "schema": "streamer.status/1",
            "instance": self.instance,
            "state": state,
            "version": __version__,
            "ts_ms": now,
            "started_ms": self._started_ms,
            "uptime_s": (now - self._started_ms) / 1e3,
            "feeds": dict(self._feeds),
            "reason": reason,
        }
        self.state.ingest(self._status_topic, payload, now)

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            self._status("offline", "shutdown")
            await runner.cleanup()
