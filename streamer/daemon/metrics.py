"""Prometheus metrics: a tiny registry and a loopback HTTP endpoint (text format 0.0.4).

No client library: counters, gauges and histograms with labels, rendered in the Prometheus
text exposition format (https://prometheus.io/docs/instrumenting/exposition_formats/) and
served by ``serve``. The endpoint is deliberately small, since anything that can reach it can
talk to it:

* it binds ``127.0.0.1`` by default; any address that is not loopback is refused unless
  ``allow_remote`` (``[metrics] allow_remote = true``), and then logged as a warning;
* it answers ``GET /metrics`` only (``HEAD`` too, without a body); another path is 404,
  another method 405; HTTP/1.0 and 1.1, one request per connection, then it closes;
* a request line or header block over ``MAX_HEAD_BYTES`` gets 431, a request with a body
  413, a malformed request line 400 (RFC 9110 sections 15.5.14, 15.5.5, 15.5.6; RFC 6585
  section 5), and the connection is closed;
* a client gets ``REQUEST_TIMEOUT_S`` for its whole request (a slow-loris client that
  trickles bytes is cut off at the deadline, not per read) and as long again to read the
  answer; then the connection is half-closed and what the client still sends is read and
  dropped for up to ``LINGER_S`` before it is closed (so the answer is not lost to a reset);
  at most ``MAX_CLIENTS`` connections at once, more are closed at once.

What the daemon exports:

* ``streamer_frames_total`` frames received; ``streamer_events_total{type}``;
* ``streamer_drops_total{stage,reason}`` parser and book drops (``book``: the latest
  snapshot's exclusions; ``book_in``: input the book refused, cumulative);
* ``streamer_fits_total{model,result}`` (``ok``/``degraded``);
* ``streamer_fit_seconds{model}`` histogram; ``streamer_tick_to_publish_seconds`` histogram
  (frame received -> its refit's messages handed to the publishers);
* ``streamer_feed_up`` (1 connected, 0 not); ``streamer_broker_connected{publisher}``;
* ``streamer_broker_error{publisher,broker,reason}`` 1 for the reason the last connection
  attempt failed (``not_authorized``, ``bad_credentials``, ``tls_untrusted``,
  ``tls_hostname``, ``tls_error``, ``unreachable``, ...), 0 once connected again, and
  ``streamer_broker_connect_failures_total{publisher,broker,reason}``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from streamer.errors import ConfigError
from streamer.settings import is_loopback

log = structlog.get_logger(__name__)

MAX_HEAD_BYTES = 8192  # request line + headers
REQUEST_TIMEOUT_S = 5.0
MAX_CLIENTS = 16
LINGER_S = 1.0
"""After its answer, how long a connection stays half-open, its input read and dropped:
closing on a client that is still sending (a slow loris cut off, a request with a body)
would reset the connection, and a reset can destroy the answer in the client's buffers
before it reads it (the "lingering close" of HTTP servers)."""

LabelKey = tuple[tuple[str, str], ...]
DEFAULT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def _labels(key: LabelKey) -> str:
    if not key:
        return ""
    body = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in key
    )
    return "{" + body + "}"


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


@dataclass
class Metric:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    values: dict[LabelKey, float] = field(default_factory=dict)
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    hist: dict[LabelKey, list[float]] = field(default_factory=dict)  # counts per bucket + sum

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = value

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        h = self.hist.get(key)
        if h is None:
            h = self.hist[key] = [0.0] * (len(self.buckets) + 2)  # buckets, +Inf, sum
        for i, b in enumerate(self.buckets):
            if value <= b:
                h[i] += 1
        h[len(self.buckets)] += 1
        h[-1] += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        if self.kind != "histogram":
            for key, v in sorted(self.values.items()):
                yield f"{self.name}{_labels(key)} {_fmt(v)}"
            return
        for key, h in sorted(self.hist.items()):
            for i, b in enumerate(self.buckets):
                yield f"{self.name}_bucket{_labels((*key, ('le', _fmt(b))))} {_fmt(h[i])}"
            n = h[len(self.buckets)]
            yield f"{self.name}_bucket{_labels((*key, ('le', '+Inf')))} {_fmt(n)}"
            yield f"{self.name}_sum{_labels(key)} {_fmt(h[-1])}"
            yield f"{self.name}_count{_labels(key)} {_fmt(n)}"


class Registry:
    """The daemon's metrics."""

    def __init__(self) -> None:
        # called before each scrape is rendered (the service's counters, kept as plain ints
        # on the hot path, copied in): a scrape sees the values of its moment, not those of
        # the last tick
        self.on_scrape: Callable[[], None] | None = None
        self.frames = self._add("streamer_frames_total", "counter", "Frames received.")
        self.events = self._add("streamer_events_total", "counter", "Events by type.")
        self.drops = self._add("streamer_drops_total", "counter", "Dropped input by reason.")
        self.fits = self._add("streamer_fits_total", "counter", "Fits by model and result.")
        self.fit_seconds = self._add("streamer_fit_seconds", "histogram", "Fit time.")
        self.latency = self._add(
            "streamer_tick_to_publish_seconds",
            "histogram",
            "Frame received to its refit's messages handed to the publishers.",
        )
        self.feed_up = self._add("streamer_feed_up", "gauge", "1 while the feed is connected.")
        self.broker = self._add(
            "streamer_broker_connected", "gauge", "1 while a publisher is connected."
        )
        self.broker_error = self._add(
            "streamer_broker_error",
            "gauge",
            "1 for the reason the publisher's last connection attempt failed, else 0.",
        )
        self.broker_failures = self._add(
            "streamer_broker_connect_failures_total",
            "counter",
            "Failed connection attempts by reason.",
        )

    def set_broker(self, publisher: str, stats: Any) -> None:
        """Broker gauges of one publisher from its ``stats()`` (any object; publishers
        without a connection, e.g. jsonl, pass None and count as connected)."""
        connected = getattr(stats, "connected", True)
        self.broker.set(1.0 if connected else 0.0, publisher=publisher)
        failures = getattr(stats, "failures", None)
        if not failures:
            return
        broker = str(getattr(stats, "broker", ""))
        reason = getattr(stats, "reason", None)
        for why, n in failures.items():
            labels = {"publisher": publisher, "broker": broker, "reason": why}
            self.broker_failures.set(float(n), **labels)
            self.broker_error.set(1.0 if why == reason and not connected else 0.0, **labels)

    def _add(self, name: str, kind: str, help_: str) -> Metric:
        m = Metric(name, kind, help_)
        setattr(self, "_m_" + name, m)
        return m

    def metrics(self) -> list[Metric]:
        return [v for k, v in vars(self).items() if k.startswith("_m_")]

    def render(self) -> str:
        if self.on_scrape is not None:
            try:
                self.on_scrape()
            except Exception as exc:  # the scrape still answers, with the last values
                log.exception("metrics_refresh_failed", error=repr(exc))
        return "\n".join(line for m in self.metrics() for line in m.render()) + "\n"


def _response(status: str, body: bytes = b"", *, head_only: bool = False, extra: str = "") -> bytes:
    kind = "text/plain; version=0.0.4" if status.startswith("200") else "text/plain"
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {kind}; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


async def _read_head(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """The request head (through the blank line), or None if it exceeds ``limit`` bytes."""
    buf = bytearray()
    while True:
        for sep in (b"\r\n\r\n", b"\n\n"):  # what follows the head is not read as head
            end = buf.find(sep)
            if 0 <= end <= limit - len(sep):
                return bytes(buf[: end + len(sep)])
        if len(buf) > limit:
            return None
        chunk = await reader.read(limit + 1 - len(buf))
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(buf), None)
        buf += chunk


def _answer(head: bytes, registry: Registry) -> bytes:
    lines = head.decode("latin-1").splitlines()
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _response("400 Bad Request", b"bad request line\n")
    method, target, _ = parts
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length", "0")
    if "transfer-encoding" in headers or not length.isdigit() or int(length) > 0:
        return _response("413 Content Too Large", b"no request bodies here\n")
    if target.split("?", 1)[0] != "/metrics":
        return _response("404 Not Found", b"only /metrics here\n")
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"GET only\n", extra="Allow: GET, HEAD\r\n")
    return _response("200 OK", registry.render().encode(), head_only=method == "HEAD")


async def serve(
    registry: Registry,
    host: str,
    port: int,
    *,
    allow_remote: bool = False,
    request_timeout: float = REQUEST_TIMEOUT_S,
    max_head_bytes: int = MAX_HEAD_BYTES,
    max_clients: int = MAX_CLIENTS,
) -> asyncio.Server:
    """Serve ``registry`` over HTTP on ``host:port`` (0 = any free port); see the module
    docstring for what is answered. A host that is not loopback raises ``ConfigError``
    unless ``allow_remote``, and is logged as a warning when it is allowed."""
    if not is_loopback(host):
        if not allow_remote:
            raise ConfigError(
                "metrics.host",
                f"{host!r} is not a loopback address: the metrics would be open to the "
                "network; set [metrics] allow_remote = true to mean it",
            )
        log.warning("metrics_remote_bind", host=host, port=port)
    clients = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal clients
        clients += 1
        try:
            if clients > max_clients:
                return
            try:
                async with asyncio.timeout(request_timeout):
                    head = await _read_head(reader, max_head_bytes)
            except TimeoutError:
                answer = _response("408 Request Timeout", b"too slow\n")
            else:
                if head is None:
                    answer = _response("431 Request Header Fields Too Large", b"too large\n")
                else:
                    answer = _answer(head, registry)
            writer.write(answer)
            async with asyncio.timeout(request_timeout):
                await writer.drain()
            await _linger(reader, writer, min(request_timeout, LINGER_S))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            clients -= 1
            writer.close()
            try:
                async with asyncio.timeout(request_timeout):
                    await writer.wait_closed()
            except (TimeoutError, ConnectionError):
                writer.transport.abort()

    return await asyncio.start_server(handle, host, port, limit=max_head_bytes)


async def _linger(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float
) -> None:
    """Half-close (our FIN after the answer) and read what the client still sends, dropped,
    until it closes its side or ``seconds`` pass (``LINGER_S``)."""
    if not writer.can_write_eof():
        return
    writer.write_eof()
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        pass
