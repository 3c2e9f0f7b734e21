"""The daemon: feed -> pipeline -> fits in a worker thread -> publishers, in one TaskGroup.

``Service(config).run(stop)`` wires:

* the feed adapter (``deribit`` websockets or ``ccxt``), its raw frames also going to the
  recorder when ``[recorder] dir`` is set;
* the pure ``Pipeline`` (parser, books, trigger policy, calibrators) on the event loop;
* fits off the event loop (``asyncio.to_thread``: numba kernels and numpy release the GIL for
  their heavy parts), at most one running per underlying and latest-wins: while one runs,
  new quotes only mark the trigger, and when it ends a fresh snapshot is fitted if due;
* a ticker that checks the trigger's max interval, flushes the recorder, pings systemd's
  watchdog and refreshes metrics;
* publishers (``mqtt``/``jsonl``/``memory``), each given every message; the MQTT one keeps the
  status topic (online, offline as last will and on shutdown) with the feed state;
* the Prometheus endpoint on 127.0.0.1 when ``[metrics] port`` is set.

Stop (SIGTERM/SIGINT, or ``stop`` set): the feed is cancelled, the publishers close (MQTT sends
``offline``), the recorder flushes and closes; the whole shutdown is bounded by
``SHUTDOWN_TIMEOUT_S``. ``sd_notify``: ``READY=1`` once the publishers are up and the
models' numba kernels are loaded (compiled on a fresh install: ``streamer.calib.warmup``),
``WATCHDOG=1`` from the ticker, ``STOPPING=1`` on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import structlog

from streamer import sdnotify
from streamer.book import Book
from streamer.calib.calibrator import CalibConfig
from streamer.config import Config
from streamer.feeds.deribit_parse import DeribitParser
from streamer.feeds.events import Event, FeedStatus
from streamer.metrics import Registry, serve
from streamer.pipeline import Message, Pipeline
from streamer.publish.base import Publisher, from_url
from streamer.publish.payloads import retopic

log = structlog.get_logger(__name__)

SHUTDOWN_TIMEOUT_S = 3.0
FIT_DRAIN_S = 1.0
# the GIL hand-off interval while a fit thread and the event loop both want the CPU: Python's
# 5 ms default would let a 2 ms fit take 15 ms of wall time behind a busy feed
SWITCH_INTERVAL_S = 0.0005
TICK_S = 0.1


class Feed(Protocol):
    def events(self) -> AsyncIterator[Event]: ...


FeedFactory = Callable[[Config, DeribitParser, Callable[[str, int], None] | None], Feed]


def default_feed(
    config: Config, parser: DeribitParser, on_frame: Callable[[str, int], None] | None
) -> Feed:
    """The configured venue's adapter."""
    f = config.feed
    if f.venue == "ccxt":
        from streamer.feeds.ccxt_feed import CcxtFeed

        return CcxtFeed(f.ccxt_exchange, f.currencies)
    from streamer.feeds.deribit import DeribitFeed

    return DeribitFeed(
        url=f.url,
        currencies=f.currencies,
        parser=parser,
        book_channels=f.book_channels,
        heartbeat_s=f.heartbeat_s,
        dead_after_s=f.dead_after_s,
        on_frame=on_frame,
    )


class Service:
    """One daemon instance (one shard: a venue and its currencies)."""

    def __init__(
        self,
        config: Config,
        *,
        feed_factory: FeedFactory = default_feed,
        publishers: Sequence[Publisher] | None = None,
        record_only: bool = False,
    ) -> None:
        self.config = config
        models = [] if record_only else list(config.models.names)
        self.pipeline = Pipeline(
            models=models,
            prefix=config.publish.prefix,
            trigger=config.trigger,
            calib={
                m: CalibConfig(
                    penalty=config.models.penalty.get(m), objective=config.models.objective
                )
                for m in models
            },
            model_options=config.models.options(),
            greeks=config.publish.greeks,
            stale_after_s=config.book.stale_after_s,
            max_spread_iv=config.book.max_spread_iv,
        )
        self.metrics = Registry()
        self._feed_factory = feed_factory
        self._given_publishers = list(publishers) if publishers is not None else None
        self.publishers: list[Publisher] = []
        self.recorder: Any = None
        self._running: set[tuple[str, str]] = set()
        self._trigger_ns: dict[tuple[str, str], int] = {}
        self.metrics_port: int | None = None
        self.ready = asyncio.Event()
        self.latencies_ms: list[float] = []
        self._frames_seen = 0
        self._stale_due = False
        self._fit_tasks: set[asyncio.Task[None]] = set()
        # (surface topic, seq, receive ns of the newest frame in its snapshot) when enabled
        self.publish_log: list[tuple[str, int, int]] | None = None

    # ------------------------------------------------------------------ run
    async def run(self, stop: asyncio.Event | None = None, *, signals: bool = True) -> int:
        """Run until ``stop`` is set (or SIGTERM/SIGINT); returns the exit code (0)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        previous_switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self._open(stack)
                warm_s = await asyncio.to_thread(self.pipeline.warm_up)
                log.info("kernels_ready", seconds=round(warm_s, 3))
                # everything alive now (~140k objects: modules, compiled kernels, config) lives
                # for the whole run; out of the cyclic collector's sight, a full collection no
                # longer walks it (such pauses took 20-65 ms: README, tick-to-publish)
                gc.collect()
                gc.freeze()
                self.ready.set()
                sdnotify.notify("READY=1")
                log.info(
                    "service_ready",
                    instance=self.config.instance,
                    models=list(self.pipeline.models),
                    metrics_port=self.metrics_port,
                )
                feed_task = asyncio.create_task(self._consume(), name="feed")
                tick_task = asyncio.create_task(self._ticker(stop), name="ticker")
                stop_task = asyncio.create_task(stop.wait(), name="stop")
                done, _ = await asyncio.wait(
                    {feed_task, stop_task}, return_when=asyncio.FIRST_COMPLETED
                )
                sdnotify.notify("STOPPING=1")
                log.info("service_stopping", reason="stop" if stop_task in done else "feed ended")
                for t in (feed_task, tick_task, stop_task):
                    t.cancel()
                await asyncio.gather(feed_task, tick_task, stop_task, return_exceptions=True)
                if self._fit_tasks:  # let fits in flight publish before the publishers close
                    await asyncio.wait(set(self._fit_tasks), timeout=FIT_DRAIN_S)
                if feed_task in done and feed_task.exception() is not None:
                    log.error("feed_failed", error=repr(feed_task.exception()))
                await self._publish(self.pipeline.stale_messages(), trigger_ns=None)
                # the exit stack closes publishers (MQTT: offline) and the recorder, bounded
                async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                    await stack.aclose()
        finally:
            sys.setswitchinterval(previous_switch)
            if signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)
        log.info("service_stopped", instance=self.config.instance)
        return 0

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.config
        if cfg.recorder.dir:
            from streamer.feeds.recorder import Recorder

            self.recorder = Recorder(
                cfg.recorder.dir,
                venue=cfg.feed.venue if cfg.feed.venue != "ccxt" else cfg.feed.ccxt_exchange,
                rotate_bytes=cfg.recorder.rotate_mb * 2**20,
                rotate_seconds=cfg.recorder.rotate_minutes * 60.0,
            )
            stack.callback(self.recorder.close)
        if self._given_publishers is not None:
            self.publishers = list(self._given_publishers)
        else:
            for url in cfg.publish.urls:
                pub = from_url(url, instance=cfg.instance, prefix_default=cfg.publish.prefix)
                self.publishers.append(await stack.enter_async_context(pub))
        if cfg.metrics.port:
            server = await serve(self.metrics, cfg.metrics.host, cfg.metrics.port)
            self.metrics_port = server.sockets[0].getsockname()[1]

            async def close_server() -> None:
                server.close()
                await server.wait_closed()

            stack.push_async_callback(close_server)

    # ----------------------------------------------------------------- feed
    def _on_frame(self, frame: str, recv_ns: int) -> None:
        self._frames_seen += 1
        if self.recorder is not None:
            self.recorder.write(frame, recv_ns)

    async def _consume(self) -> None:
        feed = self._feed_factory(self.config, self.pipeline.parser, self._on_frame)
        events = feed.events()
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for ev in events:
                self._on_event(ev)

    def _on_event(self, ev: Event) -> None:
        p = self.pipeline
        self.metrics.events.inc(type=type(ev).__name__)
        if type(ev) is FeedStatus and not ev.instrument:
            self._feed_state(ev)
        book = p.on_event(ev)
        if book is None or not p.models:
            return
        key = (book.venue, book.underlying)
        self._trigger_ns[key] = getattr(ev, "recv_ns", 0) or time.time_ns()
        if key not in self._running and p.is_due(book, time.monotonic()):
            self._start_fit(book)

    def _feed_state(self, ev: FeedStatus) -> None:
        self.metrics.feed_up.set(1.0 if ev.state == "connected" else 0.0)
        for pub in self.publishers:
            setter = getattr(pub, "set_feed_state", None)
            if setter is not None:
                setter(ev.venue, ev.state)
        log.info("feed_state", venue=ev.venue, state=ev.state, detail=ev.detail)
        # the ticker re-stamps the surfaces "stale" once no fit is in flight (ordering)
        self._stale_due = ev.state == "disconnected"

    # ------------------------------------------------------------------ fits
    def _start_fit(self, book: Book) -> None:
        key = (book.venue, book.underlying)
        self._running.add(key)
        task = asyncio.get_running_loop().create_task(self._fit_loop(book), name=f"fit-{key}")
        self._fit_tasks.add(task)
        task.add_done_callback(self._fit_tasks.discard)

    async def _fit_loop(self, book: Book) -> None:
        key = (book.venue, book.underlying)
        p = self.pipeline
        try:
            while True:
                now = time.monotonic()
                # the newest frame in this snapshot: tick-to-publish is measured from it
                trigger_ns = self._trigger_ns.pop(key, None)
                snap = p.take_snapshot(book, now)
                t0 = time.perf_counter()
                msgs = await asyncio.to_thread(p.fit_snapshot, snap, greeks=False)
                elapsed = time.perf_counter() - t0
                for name in p.models:
                    self.metrics.fit_seconds.observe(elapsed / max(len(p.models), 1), model=name)
                await self._publish(msgs, trigger_ns=trigger_ns)  # surfaces first
                if msgs and p.greeks:
                    greeks = await asyncio.to_thread(p.greeks_for, snap, msgs)
                    await self._publish(greeks, trigger_ns=None)
                if not p.is_due(book, time.monotonic()):
                    break
        except Exception as exc:  # a bug in a fit must not take the feed down
            log.exception("fit_loop_failed", venue=key[0], underlying=key[1], error=repr(exc))
        finally:
            self._running.discard(key)

    async def _publish(self, msgs: list[Message], *, trigger_ns: int | None) -> None:
        for msg in msgs:
            for pub in self.publishers:
                await pub.publish(retopic(msg.topic, self.pipeline.prefix, pub.prefix), msg.payload)
        if msgs and trigger_ns is not None:
            lat = (time.time_ns() - trigger_ns) / 1e9
            self.metrics.latency.observe(lat)
            self.latencies_ms.append(lat * 1e3)
            if self.publish_log is not None:
                for msg in msgs:
                    if msg.topic.endswith("/surface"):
                        self.publish_log.append((msg.topic, int(msg.payload["seq"]), trigger_ns))

    # ---------------------------------------------------------------- ticker
    async def _ticker(self, stop: asyncio.Event) -> None:
        wd = sdnotify.watchdog_interval_s()
        last_wd = 0.0
        while not stop.is_set():
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for book in self.pipeline.due(now):
                if (book.venue, book.underlying) not in self._running:
                    self._start_fit(book)
            if self._stale_due and not self._running:
                self._stale_due = False
                await self._publish(self.pipeline.stale_messages(), trigger_ns=None)
            if self.recorder is not None:
                self.recorder.flush()
            if wd is not None and now - last_wd >= wd:
                sdnotify.notify("WATCHDOG=1")
                last_wd = now
            self._refresh_metrics()

    def _refresh_metrics(self) -> None:
        m, p = self.metrics, self.pipeline
        m.frames.set(float(p.parser.frames or self._frames_seen))
        for reason, n in p.parser.drops.items():
            m.drops.set(float(n), stage="parse", reason=reason)
        for book in p.books:
            for reason, n in book.drops.items():
                m.drops.set(float(n), stage="book", reason=reason, underlying=book.underlying)
        for name in p.models:
            m.fits.set(float(p.fits[name] - p.failed[name]), model=name, result="ok")
            m.fits.set(float(p.failed[name]), model=name, result="degraded")
        for i, pub in enumerate(self.publishers):
            stats = getattr(pub, "stats", None)
            connected = getattr(stats(), "connected", True) if callable(stats) else True
            m.broker.set(1.0 if connected else 0.0, publisher=str(i))
