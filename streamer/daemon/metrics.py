"""Prometheus metrics: a tiny registry and a loopback HTTP endpoint (text format 0.0.4).

No client library: counters, gauges and histograms with labels, rendered in the Prometheus
text exposition format (https://prometheus.io/docs/instrumenting/exposition_formats/) and
served by ``serve`` on ``127.0.0.1`` (GET any path). What the daemon exports:

* ``streamer_frames_total`` frames received; ``streamer_events_total{type}``;
* ``streamer_drops_total{stage,reason}`` parser and book drops (book: latest snapshot);
* ``streamer_fits_total{model,result}`` (``ok``/``degraded``);
* ``streamer_fit_seconds{model}`` histogram; ``streamer_tick_to_publish_seconds`` histogram
  (frame received -> its refit's messages handed to the publishers);
* ``streamer_feed_up`` (1 connected, 0 not); ``streamer_broker_connected{publisher}``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

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

    def _add(self, name: str, kind: str, help_: str) -> Metric:
        m = Metric(name, kind, help_)
        setattr(self, "_m_" + name, m)
        return m

    def metrics(self) -> list[Metric]:
        return [v for k, v in vars(self).items() if k.startswith("_m_")]

    def render(self) -> str:
        return "\n".join(line for m in self.metrics() for line in m.render()) + "\n"


async def serve(registry: Registry, host: str, port: int) -> asyncio.Server:
    """Serve ``registry`` over HTTP on ``host:port`` (0 = any free port)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5.0)
            body = registry.render().encode()
            head = (
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
