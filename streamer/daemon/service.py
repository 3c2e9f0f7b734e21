"""The daemon: feed -> pipeline -> fits in worker processes -> publishers, in one TaskGroup.

``Service(config).run(stop)`` wires:

* the feed adapter (``streamer.feeds.venues.open_feed``: Deribit websockets or ccxt) parsing
  with ``pipeline.fast`` (the book's fused ticker path, what replay measures); raw frames also
  go to the recorder when ``[recorder] dir`` is set;
* the pure ``Pipeline`` (parser, books, trigger policy, calibrators) on the event loop;
* one fit job per model and underlying, latest wins. With ``[models] workers = "process"``
  (the default) each job fits in a worker process of its own (``streamer.daemon.fitproc``:
  forked by a fork server that loaded the kernels once; its calibrators keep the warm state),
  so no fit waits for another's GIL or the event loop's: a due trigger snapshots the book
  and ``_kick`` writes the pickled snapshot (once for all models) straight to every idle
  job's process; the reply is read on the loop when the pipe turns readable, counted and
  numbered by the pipeline (``Pipeline.accept``) and the surface published at once. At most
  one fit per core is in flight: another underlying's due refit waits until a core is free and
  snapshots the book then (a snapshot taken at once would only wait for a core, and be older
  when published); while the fits in flight take every core the feed is not parsed (its
  frames wait in the socket, ``FEED_HOLD_S`` at most) until one is done and the surfaces are
  with the broker (``Publisher.wait_sent``). ``workers = "thread"``: the fits run in
  ``asyncio.to_thread`` (the numba kernels are ``nogil``; the Python glue is not). A job
  that was busy, or that wakes after more frames came in, fits a fresh snapshot of the book
  as it is when the fit starts (``_take``: the surface's newest frame is never as old as the
  job's queue). A worker process
  that dies is logged (``fit_worker_lost``) and replaced on its next fit;
* the derived topics (tenors, greeks: milliseconds of Python and numpy) off the surfaces'
  path: one task builds them for the latest surface of each job, at most every
  ``DERIVED_INTERVAL_S`` per job, once the fits in flight are done; in process mode in a
  derived worker process (niced: the fits come first on the cores), whose reply (the
  payloads as JSON bytes, published as they are) is taken once no fit is in flight; in
  thread mode in a thread that pauses between its steps (a
  tenor, a block of greeks rows) while a fit is in flight (``DERIVED_YIELD_S`` each); each
  job's last surface always gets them, on the way out too;
* a ticker that checks the trigger's max interval, flushes the recorder, pings systemd's
  watchdog (only while work progresses: below) and refreshes metrics;
* publishers (``mqtt``/``jsonl``/``memory``), each given every message; the MQTT one keeps the
  status topic (online, offline as last will and on shutdown) with the feed state;
* the Prometheus endpoint on 127.0.0.1 when ``[metrics] port`` is set.

Feed, ticker, fit workers and the stop watcher are tasks of one ``asyncio.TaskGroup``. Stop
(SIGTERM/SIGINT, ``stop`` set, or the feed ending): the watcher cancels the feed and the
ticker, lets fits in flight finish and publish, then the derived topics still waiting
(``FIT_DRAIN_S`` in all), and the group ends; the
surfaces are re-stamped ``stale``, the publishers close (MQTT sends ``offline``) and the
recorder flushes, bounded by ``SHUTDOWN_TIMEOUT_S``; ``run`` returns 0. An exception in any
task ends the group: it is logged with its cause (``service_failed``), the same shutdown
runs, and ``run`` returns ``EXIT_FAILURE`` so systemd's ``Restart=on-failure`` restarts the
shard. ``sd_notify``: ``READY=1`` once the publishers are up and the models' numba kernels are
loaded (compiled on a fresh install: ``streamer.calib.warmup``), ``WATCHDOG=1`` from the
ticker, ``STOPPING=1`` on the way out.

The watchdog is a liveness check, not a heartbeat of the event loop: ``WATCHDOG=1`` is sent
only when nothing is stuck (``stuck()``): no fit has been running for more than
``[watchdog] fit_s`` (the fits run in worker threads, where a hung kernel would leave the loop
happily ticking), and a feed that says it is connected has delivered a frame or an event within
``[watchdog] feed_s`` (default twice its own dead-after interval: the adapter should have
reconnected long before). While something is stuck the pings stop (logged once at error,
``watchdog_withheld``, with the reasons) and systemd restarts the shard after ``WatchdogSec``.
``STREAMER_TEST_HANG_FIT_S=N`` (a test hook, warned about at start) makes every fit block N
seconds in its thread first.

A model that is switched off leaves nothing behind: once an MQTT publisher is connected the
service lists the retained topics of its venue and underlyings (``{prefix}/{venue}/{u}/+/#``,
``MqttPublisher.retained_topics``: a short second connection, the end of the retained burst
marked by a message of its own) and clears (an empty retained message) those whose model
segment names a registered model this shard does not run. Topics of other underlyings, other
venues, and segments that are not model names are left alone. Memory: tick-to-publish
latencies are a ring (``LATENCY_WINDOW``); ``publish_log`` is opt-in (benchmarks, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from streamer.book.book import Book
from streamer.book.snapshot import ChainSnapshot
from streamer.config import Config
from streamer.daemon import sdnotify
from streamer.daemon.fitproc import FitProcess, encode
from streamer.daemon.metrics import Registry, serve
from streamer.daemon.pipeline import Message, Pipeline
from streamer.errors import StreamerError
from streamer.events import BookChanged, Event, FeedStatus
from streamer.feeds.base import Feed, FrameParser
from streamer.feeds.venues import open_feed
from streamer.models import REGISTRY
from streamer.publish.base import Publisher
from streamer.publish.payloads import retopic
from streamer.publish.urls import from_url

log = structlog.get_logger(__name__)

SHUTDOWN_TIMEOUT_S = 3.0
FIT_DRAIN_S = 1.0
# events applied between two turns of the event loop when the feed has a backlog: websockets
# hands over every frame already received without suspending (a 64 KiB read is ~130 tickers,
# ~3.5 ms of parsing), and a fit's reply or a surface's publish would wait for all of them
CONSUME_YIELD_EVERY = 16
# while the fits in flight take every core, the feed's frames wait in the socket (at most
# FEED_HOLD_S): parsing them meanwhile would take a core from a fit (on 2 cores the second
# model of an underlying waited for the event loop's time slice), and the surfaces in flight
# do not depend on them; the backlog is parsed once a fit is done (~27 us a frame)
FEED_HOLD_S = 0.01
# the GIL hand-off interval while a fit thread and the event loop both want the CPU: Python's
# 5 ms default would let a 2 ms fit take 15 ms of wall time behind a busy feed
SWITCH_INTERVAL_S = 0.0005
# the derived worker process's niceness: its tens of milliseconds of greeks give the cores
# to the fits (CFS weight 110 against 1024)
DERIVED_NICE = 10
# a surface's tenors and greeks (~10-15 ms of Python and numpy holding the GIL) are built at
# most every DERIVED_INTERVAL_S per model and underlying (of the latest surface), one job at a
# time, each waiting up to DERIVED_YIELD_S for the fits in flight (other models', other
# underlyings') to publish their surfaces first, and pausing between its steps while fits are
# in flight (up to DERIVED_YIELD_S more): the surfaces are what tick-to-publish is about
DERIVED_INTERVAL_S = 0.5
# a job that picks up a snapshot older than this (it was busy when the trigger took it) fits
# a fresh snapshot of the book instead, if the book changed since
RESNAPSHOT_AFTER_S = 0.002
DERIVED_YIELD_S = 0.05
TICK_S = 0.1
LATENCY_WINDOW = 10_000  # tick-to-publish samples kept (a ring)
HANG_FIT_ENV = "STREAMER_TEST_HANG_FIT_S"  # test hook: every fit blocks this long first
CLEAR_LIST_TIMEOUT_S = 10.0


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

FeedFactory = Callable[[Config, FrameParser, Callable[[str, int], None] | None], Feed]


@dataclass(frozen=True, slots=True)
class PublishRecord:
    """Where one surface's tick-to-publish went (``Service.publish_log``, opt-in): wall-clock
    ns (``time.time_ns``) of the newest frame of its snapshot entering the parser, of the
    snapshot, of the fit starting and ending in its worker thread, of the event loop taking
    the result back and of the surface handed to every publisher; ``fit_cpu_ns``: the fit
    thread's CPU time (``time.thread_time_ns``); ``resnapshot``: the book changed after the
    trigger's snapshot, and the job fitted a fresh one (``Service._take``)."""

    topic: str
    seq: int
    newest_ns: int
    snap_ns: int
    start_ns: int
    done_ns: int
    resumed_ns: int
    published_ns: int
    fit_cpu_ns: int
    resnapshot: bool = False  # the job fitted a fresh snapshot, not the trigger's


@dataclass(eq=False)
class _Job:
    """One model of one underlying: its worker task and the snapshot waiting for it."""

    model: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    snap: ChainSnapshot | None = None
    snap_ns: int = 0  # when the waiting snapshot was taken (wall clock, ns)
    mark: int = 0  # the book's change count when ``snap`` was taken
    newest_ns: int | None = None  # receive ns of the newest frame that changed it then
    fitted_mark: int = -1  # the book's change count in the snapshot this job fitted last
    busy: bool = False
    # the latest surface published whose tenors and greeks are not built yet (latest wins)
    derived: tuple[ChainSnapshot, list[Message]] | None = None
    derived_next: float = 0.0  # monotonic: its derived topics not before this
    worker: FitProcess | None = None  # its fit process (``[models] workers = "process"``)
    # a snapshot ``_kick`` handed to its process at once: (reply, snapshot, mark, newest ns,
    # snapshot ns)
    sent: tuple[asyncio.Future[Any], ChainSnapshot, int, int | None, int] | None = None


class Service:
    """One daemon instance (one shard: a venue and its currencies)."""

    def __init__(
        self,
        config: Config,
        *,
        feed_factory: FeedFactory = open_feed,
        publishers: Sequence[Publisher] | None = None,
        record_only: bool = False,
        extra_publishers: Sequence[Publisher] = (),
    ) -> None:
        self.config = config
        self._extra_publishers = list(extra_publishers)  # e.g. the live page ([web] listen)
        self.pipeline = Pipeline.from_config(config, models=[] if record_only else None)
        self.metrics = Registry()
        self.metrics.on_scrape = self._refresh_metrics
        self._feed_factory = feed_factory
        self._given_publishers = list(publishers) if publishers is not None else None
        self.publishers: list[Publisher] = []
        self.recorder: Any = None
        # per underlying, one fit job per model (its own worker task, latest snapshot wins)
        self._jobs: dict[tuple[str, str], dict[str, _Job]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._closing = False
        # per book: changes seen (a counter) and the receive time of the newest change
        self._changes: dict[tuple[str, str], int] = {}
        self._changed_ns: dict[tuple[str, str], int] = {}
        self.resnapshots = 0  # jobs that fitted the book as it was when they started
        self.metrics_port: int | None = None
        self.ready = asyncio.Event()
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._frames_seen = 0
        self._events_seen = 0
        # liveness (the watchdog): fits in flight since (monotonic), the feed's progress
        self._fit_started: dict[tuple[str, str, str], float] = {}  # (venue, und, model)
        self._fitting: set[tuple[str, str, str]] = set()  # surface fits in flight
        self._no_fits = asyncio.Event()  # set while there are none
        self._no_fits.set()
        self._no_fits_thread = threading.Event()  # the same, for the derived thread's pauses
        self._no_fits_thread.set()
        self._derived_wake = asyncio.Event()  # a surface's derived topics are waiting
        self._derived_task: asyncio.Task[None] | None = None
        self._derived_busy = False
        self._flush = False  # on the way out: every waiting derived topic now
        self._feed_connected = False
        self._progress_mark = -1
        self._progress_at = time.monotonic()
        self._withheld: tuple[str, ...] = ()
        self.watchdog_pings = 0
        self._hang_fit_s = float(os.environ.get(HANG_FIT_ENV, "") or 0.0)
        # fit processes started with the kernels, per model, until a job takes one
        self._spare: dict[str, list[FitProcess]] = {}
        self._workers: list[FitProcess] = []  # every fit process (closed on the way out)
        self._derived_proc: FitProcess | None = None  # tenors and greeks, in process mode
        # fits in flight at most (one per core: more only queue for a core, or for the GIL),
        # and the books whose due refit waits for one
        self._cores = max(1, len(os.sched_getaffinity(0)))
        self._hold_feed = False  # the fits just handed out take every core (FEED_HOLD_S)
        self._fit_done = asyncio.Event()  # a fit job finished (set, then cleared by a hold)
        self.feed_holds = 0
        self._deferred: set[tuple[str, str]] = set()
        self._aux: list[asyncio.Task[None]] = []
        self.cleared: list[str] = []  # retained topics of switched-off models cleared at start
        self._stale_due = False
        # (surface topic, seq, receive ns of the newest frame in its snapshot) when enabled
        self.publish_log: list[PublishRecord] | None = None

    # ------------------------------------------------------------------ run
    async def run(self, stop: asyncio.Event | None = None, *, signals: bool = True) -> int:
        """Run until ``stop`` is set, SIGTERM/SIGINT, or the feed ends: ``EXIT_OK``; after a
        task failed: ``EXIT_FAILURE`` (the failure is logged with its cause)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        previous_switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
        code = EXIT_OK
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self._open(stack)
                await self._warm_up()
                try:
                    async with asyncio.TaskGroup() as tg:
                        self._tg = tg
                        feed = tg.create_task(self._consume(stop), name="feed")
                        ticker = tg.create_task(self._ticker(stop), name="ticker")
                        if self.pipeline.models:
                            self._aux.append(
                                tg.create_task(self._clear_switched_off(), name="clear")
                            )
                        tg.create_task(self._watch_stop(stop, feed, ticker), name="stop")
                except* Exception as group:
                    code = EXIT_FAILURE
                    for exc in group.exceptions:
                        log.error(
                            "service_failed",
                            instance=self.config.instance,
                            error=repr(exc),
                            exc_info=exc,
                        )
                    for pub in self.publishers:  # the offline status says why
                        if hasattr(pub, "offline_reason"):
                            pub.offline_reason = f"failed: {group.exceptions[0]!r}"[:200]
                finally:
                    self._tg = None
                    await self._close_workers()
                sdnotify.notify("STOPPING=1")
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
        log.info("service_stopped", instance=self.config.instance, exit_code=code)
        return code

    async def _warm_up(self) -> None:
        if self._hang_fit_s:
            log.warning("test_hook_hang_fit", env=HANG_FIT_ENV, seconds=self._hang_fit_s)
        warm_s = await asyncio.to_thread(self.pipeline.warm_up)
        log.info("kernels_ready", seconds=round(warm_s, 3))
        if self._processes:  # one per model and configured underlying, started together
            t0 = time.monotonic()
            for model in self.pipeline.models:
                self._spare[model] = [self._new_worker(model) for _ in self.config.feed.currencies]
            spares = [w for per in self._spare.values() for w in per]
            self._derived_proc = FitProcess(self.config, None, nice=DERIVED_NICE)
            self._workers.append(self._derived_proc)
            started = await asyncio.gather(
                *(asyncio.to_thread(w.start) for w in [*spares, self._derived_proc]),
                return_exceptions=True,
            )
            for w, res in zip([*spares, self._derived_proc], started, strict=True):
                if isinstance(res, BaseException):  # its first fit starts it again
                    log.error("fit_worker_start_failed", model=w.model, error=repr(res))
            log.info(
                "fit_workers_ready",
                workers=len(spares),
                pids=[w.pid for w in spares],
                seconds=round(time.monotonic() - t0, 3),
            )
        # everything alive now (~140k objects: modules, compiled kernels, config) lives for the
        # whole run; out of the cyclic collector's sight, a full collection no longer walks it
        # (such pauses took 20-65 ms: README, tick-to-publish)
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

    async def _watch_stop(
        self, stop: asyncio.Event, feed: asyncio.Task[None], ticker: asyncio.Task[None]
    ) -> None:
        """On stop: end the feed and the ticker, let fits in flight publish, then the derived
        topics still waiting (each job's last surface's), end the workers."""
        await stop.wait()
        log.info("service_stopping", reason="feed ended" if feed.done() else "stop")
        for task in (feed, ticker, *self._aux):
            task.cancel()
        self._closing = True
        jobs = [job for per in self._jobs.values() for job in per.values()]
        workers = [job.task for job in jobs if job.task is not None]
        for job in jobs:
            job.wake.set()
        deadline = time.monotonic() + FIT_DRAIN_S
        if workers:
            _, late = await asyncio.wait(workers, timeout=FIT_DRAIN_S)
            for task in late:
                task.cancel()
        # a fit still in flight (a hung kernel) is given up here; the derived worker stays
        await self._close_workers(keep=self._derived_proc)
        derived = self._derived_task
        if derived is not None:
            self._flush = True
            self._derived_wake.set()
            _, late = await asyncio.wait([derived], timeout=max(deadline - time.monotonic(), 0.5))
            for task in late:
                task.cancel()
        await self._close_workers()

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.config
        if cfg.recorder.dir:
            from streamer.feeds.recordings.recorder import Recorder

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
        for pub in self._extra_publishers:
            self.publishers.append(await stack.enter_async_context(pub))
        if cfg.metrics.port:
            server = await serve(
                self.metrics,
                cfg.metrics.host,
                cfg.metrics.port,
                allow_remote=cfg.metrics.allow_remote,
            )
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

    async def _consume(self, stop: asyncio.Event) -> None:
        feed = self._feed_factory(self.config, self.pipeline.fast, self._on_frame)
        try:
            events = feed.events()
            every = CONSUME_YIELD_EVERY
            n = 0
            async with contextlib.aclosing(events):  # type: ignore[type-var]
                async for ev in events:
                    self._on_event(ev)
                    n += 1
                    if self._hold_feed:  # the fits take every core: let them run
                        n = 0
                        await self._held()
                    elif n == every:  # a backlog: let fit replies and publishes in between
                        n = 0
                        await asyncio.sleep(0)
        finally:
            await feed.aclose()
        stop.set()  # the feed ended (a replay): the service ends with it

    def _fits_busy(self) -> int:
        return sum(job.busy for per in self._jobs.values() for job in per.values())

    async def _held(self) -> None:
        """Wait (at most ``FEED_HOLD_S``) until a core is free of fits, then until the
        surfaces published meanwhile are with the broker."""
        self._hold_feed = False
        self.feed_holds += 1
        deadline = time.monotonic() + FEED_HOLD_S
        while self._fits_busy() >= self._cores and not self._closing:
            left = deadline - time.monotonic()
            if left <= 0.0:
                return
            self._fit_done.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._fit_done.wait()
        for pub in self.publishers:
            left = deadline - time.monotonic()
            if left <= 0.0 or self._closing:
                return
            await pub.wait_sent(left)

    def _on_event(self, ev: Event) -> None:
        p = self.pipeline
        self._events_seen += 1
        self.metrics.events.inc(type=type(ev).__name__)
        if type(ev) is FeedStatus and not ev.instrument:
            self._feed_state(ev)
        book = p.on_event(ev)
        if book is None or not p.models:
            return
        key = (book.venue, book.underlying)
        recv_ns = p.fast.last_recv_ns if type(ev) is BookChanged else getattr(ev, "recv_ns", 0)
        self._changes[key] = self._changes.get(key, 0) + 1
        self._changed_ns[key] = recv_ns or time.time_ns()
        self._kick(book)

    def _feed_state(self, ev: FeedStatus) -> None:
        self.metrics.feed_up.set(1.0 if ev.state == "connected" else 0.0)
        self._feed_connected = ev.state == "connected"
        self._progress_at = time.monotonic()  # the silence clock starts now
        for pub in self.publishers:
            setter = getattr(pub, "set_feed_state", None)
            if setter is not None:
                setter(ev.venue, ev.state)
        log.info("feed_state", venue=ev.venue, state=ev.state, detail=ev.detail)
        # the ticker re-stamps the surfaces "stale" once no fit is in flight (ordering)
        self._stale_due = ev.state == "disconnected"

    # ------------------------------------------------------------------ fits
    def _kick(self, book: Book) -> None:
        """If ``book``'s refit is due and one of its models is free, snapshot it and hand the
        snapshot to every model's job (latest wins). A job busy with an earlier fit takes it
        when done, and fits the book as it is then if it changed since (``_take``)."""
        jobs = self._jobs_of(book)
        if not jobs or all(job.busy for job in jobs.values()):
            return  # changes accumulate; a job that finishes kicks again
        p = self.pipeline
        if not p.is_due(book, time.monotonic()):
            return
        key = (book.venue, book.underlying)
        elsewhere = sum(
            1
            for k, per in self._jobs.items()
            if k != key
            for j in per.values()
            if j.busy or j.snap is not None
        )
        if elsewhere and elsewhere + len(jobs) > self._cores:
            # the cores are taken by another underlying's fits: snapshot when they are done
            # (a snapshot taken now would wait for a core and be older when published)
            self._deferred.add(key)
            return
        self._deferred.discard(key)
        snap = p.take_snapshot(book, time.monotonic())
        mark, newest, snap_ns = self._changes.get(key, 0), self._changed_ns.get(key), time.time_ns()
        data: bytes | None = None
        for job in jobs.values():
            worker = job.worker
            if not job.busy and job.sent is None and worker is not None and worker.ready:
                # straight to its process from here: no wait for the job's task to be run
                data = data if data is not None else encode(snap)
                job.sent = (worker.submit(data), snap, mark, newest, snap_ns)
                job.busy = True
            else:
                job.snap, job.mark, job.newest_ns, job.snap_ns = snap, mark, newest, snap_ns
            job.wake.set()
        self._hold_feed = self._fits_busy() >= self._cores

    def _take(self, book: Book, job: _Job) -> tuple[ChainSnapshot, int | None, int, bool] | None:
        """The work ``job`` picks up: the snapshot handed to it, or, when that snapshot is
        older than ``RESNAPSHOT_AFTER_S`` (the job was busy when it was taken) and the book
        changed since, a fresh snapshot of the book as it is now: the surface is fitted on the
        newest quotes, not on quotes as old as the job's queue (a job that starts right away
        fits the trigger's snapshot: a snapshot costs the event loop about a millisecond).
        ``(snapshot, receive ns of its newest frame, wall ns it was taken, fresh?)``: the
        receive time is None when the book did not change since the job's previous fit (a
        fit at a settlement), as tick-to-publish is measured from it. None if nothing is
        waiting."""
        snap, job.snap = job.snap, None
        if snap is None:
            return None
        key = (book.venue, book.underlying)
        mark, newest, snap_ns = job.mark, job.newest_ns, job.snap_ns
        now_ns = time.time_ns()
        fresh = self._changes.get(key, 0) != mark and now_ns - snap_ns > RESNAPSHOT_AFTER_S * 1e9
        if fresh:
            snap = self.pipeline.resnapshot(book)
            self.resnapshots += 1
            mark, newest, snap_ns = self._changes.get(key, 0), self._changed_ns.get(key), now_ns
        return snap, self._newest(job, mark, newest), snap_ns, fresh

    @staticmethod
    def _newest(job: _Job, mark: int, newest: int | None) -> int | None:
        """The receive ns that ``job``'s fit of a snapshot at change count ``mark`` is timed
        from: None when the book did not change since the job's previous fit."""
        fitted, job.fitted_mark = job.fitted_mark, mark
        return None if mark == fitted else newest

    def _jobs_of(self, book: Book) -> dict[str, _Job]:
        """The fit jobs of ``book``'s underlying, one per model (started on first use)."""
        key = (book.venue, book.underlying)
        jobs = self._jobs.get(key)
        if jobs is None:
            if self._tg is None or self._closing:
                return {}
            jobs = self._jobs[key] = {}
            for model in self.pipeline.models:
                job = jobs[model] = _Job(model)
                if self._processes:  # a spare started with the kernels, else one started now
                    spare = self._spare.get(model)
                    job.worker = spare.pop() if spare else self._new_worker(model)
                job.task = self._tg.create_task(
                    self._fit_worker(book, job), name=f"fit-{key[1]}-{model}"
                )
            if self._derived_task is None:
                self._derived_task = self._tg.create_task(self._derived_worker(), name="derived")
        return jobs

    def _busy(self) -> bool:
        """A fit in flight, or derived topics (tenors, greeks) not yet out."""
        return self._derived_busy or any(
            job.busy or job.derived is not None
            for per in self._jobs.values()
            for job in per.values()
        )

    async def _fit_worker(self, book: Book, job: _Job) -> None:
        """Fit one model of ``book`` on each snapshot handed to it, until the service closes."""
        while True:
            await job.wake.wait()
            job.wake.clear()
            sent, job.sent = job.sent, None
            if self._closing and sent is None:  # a fit sent already still publishes
                return
            if sent is not None:  # handed to its process by ``_kick`` already
                fut, snap, mark, newest, snap_ns = sent
                work: tuple[ChainSnapshot, int | None, int, bool] | None = (
                    snap,
                    self._newest(job, mark, newest),
                    snap_ns,
                    False,
                )
            else:
                fut, work = None, self._take(book, job)
            if work is None:
                continue
            job.busy = True
            try:
                await self._fit_once(job, *work, sent=fut)
            except Exception as exc:  # a bug in a fit must not take the feed down
                log.exception(
                    "fit_loop_failed", underlying=book.underlying, model=job.model, error=repr(exc)
                )
            finally:
                job.busy = False
                self._fit_done.set()
            if self._closing:
                return
            self._kick(book)  # quotes that changed while it fitted
            for key in list(self._deferred):  # books that waited for a core
                waiting = self.pipeline.books.get(*key)
                if waiting is not None:
                    self._kick(waiting)

    async def _fit_once(
        self,
        job: _Job,
        snap: ChainSnapshot,
        trigger_ns: int | None,
        snap_ns: int,
        fresh: bool = False,
        *,
        sent: asyncio.Future[Any] | None = None,
    ) -> None:
        """Fit ``job``'s model on ``snap`` in its worker process (``sent``: the reply of the
        snapshot ``_kick`` handed it already), or in a worker thread, and publish its surface
        at once; its tenors and greeks go to the derived worker (``_derived_worker``)."""
        p = self.pipeline
        key = (snap.venue, snap.underlying, job.model)
        fit = self._hanging_fit if self._hang_fit_s else p.fit_snapshot
        worker = job.worker
        self._fit_started[key] = time.monotonic()  # the watchdog watches this span
        try:
            self._fitting.add(key)
            self._no_fits.clear()
            self._no_fits_thread.clear()
            stamps = [0, 0, 0]

            def timed_fit() -> list[Message]:
                stamps[0], cpu0 = time.time_ns(), time.thread_time_ns()
                try:
                    return fit(snap, derived=False, models=(job.model,))
                finally:
                    stamps[1], stamps[2] = time.time_ns(), time.thread_time_ns() - cpu0

            try:
                if worker is not None:  # in its process; counted and numbered here
                    outcome, *times = await (
                        worker.result(sent) if sent is not None else worker.fit(snap)
                    )
                    stamps[:] = times
                    msgs = p.accept(snap, outcome)
                else:
                    msgs = await asyncio.to_thread(timed_fit)
                resumed_ns = time.time_ns()
            finally:
                self._fitting.discard(key)
                if not self._fitting:
                    self._no_fits.set()
                    self._no_fits_thread.set()
            for msg in msgs:  # the model's own fit time (the calibrator's, not the thread's)
                if msg.topic.endswith("/surface"):
                    elapsed_ms = msg.payload["fit"]["elapsed_ms"]
                    self.metrics.fit_seconds.observe(elapsed_ms / 1e3, model=job.model)
            await self._publish(msgs, trigger_ns=trigger_ns)  # the surface first
            if self.publish_log is not None and trigger_ns is not None:
                published_ns = time.time_ns()
                for msg in msgs:
                    if msg.topic.endswith("/surface"):
                        rec = PublishRecord(
                            topic=msg.topic,
                            seq=int(msg.payload["seq"]),
                            newest_ns=trigger_ns,
                            snap_ns=snap_ns,
                            start_ns=stamps[0],
                            done_ns=stamps[1],
                            resumed_ns=resumed_ns,
                            published_ns=published_ns,
                            fit_cpu_ns=stamps[2],
                            resnapshot=fresh,
                        )
                        self.publish_log.append(rec)
            if msgs:  # its tenors and greeks: latest wins, at most every DERIVED_INTERVAL_S
                job.derived = (snap, msgs)
                self._derived_wake.set()
        finally:
            self._fit_started.pop(key, None)

    async def _derived_worker(self) -> None:
        """Build and publish the tenors and greeks of the surfaces published, off the
        surfaces' path: per job at most every ``DERIVED_INTERVAL_S``, of its latest surface
        (a newer surface replaces one whose derived topics are not built yet), one job at a
        time, each once the fits in flight are done (at most ``DERIVED_YIELD_S`` later: they
        hold the GIL for milliseconds of Python and numpy). The last surface of every job
        always gets its derived topics: on the interval, and on the way out (``_flush``)."""
        while True:
            jobs = [j for per in self._jobs.values() for j in per.values() if j.derived]
            if not jobs:
                if self._flush:
                    return
                self._derived_wake.clear()
                await self._derived_wake.wait()
                continue
            now = time.monotonic()
            job = min(jobs, key=lambda j: j.derived_next)
            if job.derived_next > now and not self._flush:
                self._derived_wake.clear()  # a newer surface, or the flush, wakes us early
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(job.derived_next - now):
                        await self._derived_wake.wait()
                continue
            self._derived_busy = True
            try:
                if not self._flush:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DERIVED_YIELD_S):
                            await self._no_fits.wait()
                work, job.derived = job.derived, None
                if work is None:
                    continue
                job.derived_next = time.monotonic() + DERIVED_INTERVAL_S
                try:
                    if self._derived_proc is not None:
                        derived = await self._derived_in_process(*work)
                    else:
                        derived = await asyncio.to_thread(
                            self.pipeline.derived_for, *work, self._derived_pause()
                        )
                    await self._publish(derived, trigger_ns=None)
                except Exception as exc:  # a bug in a derived topic must not stop the others
                    log.exception("derived_failed", model=job.model, error=repr(exc))
            finally:
                self._derived_busy = False

    async def _derived_in_process(self, snap: ChainSnapshot, msgs: list[Message]) -> list[Message]:
        """``Pipeline.derived_for`` in the derived worker process (niced: the fits come
        first on the cores); its reply, the greeks of every instrument as JSON bytes, is
        taken here once the fits in flight are done (at most ``DERIVED_YIELD_S`` later)."""
        proc = self._derived_proc
        assert proc is not None
        p = self.pipeline

        async def after_fits() -> None:
            if not self._flush:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DERIVED_YIELD_S):
                        await self._no_fits.wait()

        out: list[Message] = []
        for msg in msgs:
            if msg.topic.endswith("/surface"):
                derived, *_ = await proc.derive(snap, msg.payload, after_fits)
                p.tenors_failed[str(msg.payload["model"])] += derived.tenors_failed
                out.extend(p.derived_accept(snap, msg.payload, derived))
        return out

    def _derived_pause(self) -> Callable[[], None] | None:
        """What the derived thread calls between its steps (``Pipeline.derived_for``): wait
        while surface fits are in flight, ``DERIVED_YIELD_S`` in all per build (none on the
        way out)."""
        if self._flush:
            return None
        idle = self._no_fits_thread
        deadline = time.monotonic() + DERIVED_YIELD_S

        def pause() -> None:
            left = deadline - time.monotonic()
            if left > 0.0 and not idle.is_set():
                idle.wait(left)

        return pause

    @property
    def _processes(self) -> bool:
        return self.config.models.workers == "process" and bool(self.pipeline.models)

    def _new_worker(self, model: str) -> FitProcess:
        worker = FitProcess(self.config, model, hang_s=self._hang_fit_s)
        self._workers.append(worker)
        return worker

    async def _close_workers(self, keep: FitProcess | None = None) -> None:
        """End every worker process but ``keep`` (a fit still in flight is given up)."""
        workers = [w for w in self._workers if w is not keep]
        self._workers = [w for w in self._workers if w is keep]
        if not workers:
            return
        for worker in workers:
            worker.close()

        def join() -> None:
            for worker in workers:
                worker.join(timeout=1.0)

        await asyncio.to_thread(join)

    def _hanging_fit(
        self, snap: Any, *, derived: bool, models: Sequence[str] | None = None
    ) -> list[Message]:
        """The test hook (``STREAMER_TEST_HANG_FIT_S``): block in the fit thread, as a stuck
        kernel would (until the service closes, at most that long), then fit."""
        end = time.monotonic() + self._hang_fit_s
        while not self._closing and time.monotonic() < end:
            time.sleep(0.01)
        return self.pipeline.fit_snapshot(snap, derived=derived, models=models)

    async def _publish(self, msgs: list[Message], *, trigger_ns: int | None) -> None:
        for msg in msgs:
            for pub in self.publishers:
                topic = retopic(msg.topic, self.pipeline.prefix, pub.prefix)
                await pub.deliver(topic, msg.wire, clear=msg.clear)
        if msgs and trigger_ns is not None:
            lat = (time.time_ns() - trigger_ns) / 1e9
            self.metrics.latency.observe(lat)
            self.latencies_ms.append(lat * 1e3)

    # ---------------------------------------------------------------- ticker
    async def _ticker(self, stop: asyncio.Event) -> None:
        wd = sdnotify.watchdog_interval_s()
        last_wd = 0.0
        while not stop.is_set():
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for book in self.pipeline.due(now):
                self._kick(book)
            if self._stale_due and not self._busy():
                self._stale_due = False
                await self._publish(self.pipeline.stale_messages(), trigger_ns=None)
            if self.recorder is not None:
                self.recorder.flush()
            stuck = self.stuck(now)  # every tick: it keeps the feed's progress clock
            if wd is not None and now - last_wd >= wd:
                last_wd = now
                self._watchdog(stuck)
            self._refresh_metrics()

    # -------------------------------------------------------------- liveness
    def stuck(self, now: float | None = None) -> list[tuple[str, str]]:
        """What is not making progress, as ``(what, why)`` pairs (empty: all is well): a fit
        running longer than ``[watchdog] fit_s``; a connected feed with no frame or event for
        ``[watchdog] feed_s`` (0: twice the feed's dead-after interval)."""
        now = time.monotonic() if now is None else now
        wd = self.config.watchdog
        out: list[tuple[str, str]] = []
        for (venue, under, model), t0 in self._fit_started.items():
            if now - t0 > wd.fit_s:
                out.append(
                    (
                        f"fit:{venue}/{under}/{model}",
                        f"a fit running {now - t0:.1f} s > {wd.fit_s} s",
                    )
                )
        mark = self._frames_seen + self._events_seen
        if mark != self._progress_mark:
            self._progress_mark, self._progress_at = mark, now
        limit = wd.feed_s or 2.0 * self._feed_dead_after_s()
        silent = now - self._progress_at
        if self._feed_connected and silent > limit:
            out.append(("feed", f"connected, but no frame or event for {silent:.1f} s > {limit} s"))
        return out

    def _feed_dead_after_s(self) -> float:
        """The feed adapter's own silence limit (after it, the adapter reconnects)."""
        if self.config.feed.venue == "ccxt":
            from streamer.feeds.ccxt.connection import DEFAULT_STALE_AFTER_S

            return DEFAULT_STALE_AFTER_S
        return self.config.feed.dead_after_s

    def _watchdog(self, stuck: list[tuple[str, str]]) -> None:
        """``WATCHDOG=1`` unless something is stuck (then systemd restarts us)."""
        what = tuple(w for w, _ in stuck)
        if what != self._withheld:
            if what:
                log.error("watchdog_withheld", stuck=dict(stuck), instance=self.config.instance)
            else:
                log.info("watchdog_resumed", instance=self.config.instance)
            self._withheld = what
        if not what:
            sdnotify.notify("WATCHDOG=1")
            self.watchdog_pings += 1

    # ------------------------------------------------- switched-off models
    def _topic_filters(self, prefix: str) -> list[str]:
        """Where this shard's retained topics live: one filter per underlying (Deribit's
        ``USDC`` listing holds the linear ``*_USDC`` underlyings: any underlying there)."""
        cfg = self.config.feed
        if cfg.venue == "ccxt":
            from streamer.feeds.ccxt.mapping import venue_of

            venue = venue_of(cfg.ccxt_exchange)
        else:
            venue = cfg.venue
        return [
            f"{prefix}/{venue}/{'+' if cur.upper() == 'USDC' else cur.upper()}/+/#"
            for cur in cfg.currencies
        ]

    def _owned(self, prefix: str, topic: str) -> str | None:
        """The model segment of one of this shard's topics, if it names a registered model
        this shard does not run (to be cleared), else None."""
        parts = topic[len(prefix) + 1 :].split("/")
        if len(parts) < 4 or not topic.startswith(prefix + "/"):
            return None
        under, model = parts[1], parts[2]
        currencies = {c.upper() for c in self.config.feed.currencies}
        if under not in currencies and not ("USDC" in currencies and under.endswith("_USDC")):
            return None
        if model in REGISTRY and model not in self.pipeline.models:
            return model
        return None

    async def _clear_switched_off(self) -> None:
        """Clear the retained topics of models this shard no longer runs, once per
        publisher that can list them (module docstring)."""
        for pub in self.publishers:
            lister = getattr(pub, "retained_topics", None)
            wait = getattr(pub, "wait_connected", None)
            if lister is None or wait is None:
                continue
            await wait()  # a broker that is away: whenever it comes
            try:
                found: set[str] = set()
                for flt in self._topic_filters(pub.prefix):
                    found |= await lister(flt, timeout=CLEAR_LIST_TIMEOUT_S)
                gone = sorted(t for t in found if self._owned(pub.prefix, t) is not None)
                for topic in gone:
                    await pub.clear_retained(topic)
            except StreamerError as exc:  # not fatal: the topics stay until the next start
                log.warning("switched_off_clear_failed", error=str(exc))
                continue
            self.cleared.extend(gone)
            if gone:
                models = sorted({self._owned(pub.prefix, t) or "" for t in gone})
                log.info("switched_off_cleared", models=models, topics=len(gone))

    def _refresh_metrics(self) -> None:
        m, p = self.metrics, self.pipeline
        m.frames.set(float(p.parser.frames or self._frames_seen))
        for reason, n in p.parser.drops.items():
            m.drops.set(float(n), stage="parse", reason=reason)
        for book in p.books:
            for reason, n in book.drops.items():
                m.drops.set(float(n), stage="book", reason=reason, underlying=book.underlying)
            for reason, n in book.rejected.items():  # cumulative (book.py): refused input
                m.drops.set(float(n), stage="book_in", reason=reason, underlying=book.underlying)
        for name in p.models:
            m.fits.set(float(p.fits[name] - p.failed[name]), model=name, result="ok")
            m.fits.set(float(p.failed[name]), model=name, result="degraded")
        # each broker's state (a refusal: reason and error) in the metrics and, through
        # whichever MQTT publisher is connected, in every status topic
        brokers: dict[str, dict[str, Any]] = {}
        for i, pub in enumerate(self.publishers):
            stats = getattr(pub, "stats", None)
            st = stats() if callable(stats) else None
            m.set_broker(str(i), st)
            if st is not None and getattr(st, "broker", None):
                brokers[st.broker] = {
                    "connected": st.connected,
                    "reason": st.reason,
                    "error": st.error,
                }
        for pub in self.publishers:
            share = getattr(pub, "set_broker_states", None)
            if share is not None:
                share(brokers)


def serve_forever(
    config: Config,
    *,
    record_only: bool = False,
    command: str = "run",
    extra_publishers: Sequence[Publisher] = (),
) -> int:
    """Run a service on ``config`` in a fresh event loop: its exit code (2: a config or
    start-up error, printed to stderr). ``extra_publishers`` get every message too (the live
    page of ``[web] listen``, built by ``streamer.cli.run``)."""
    from streamer.daemon import logs

    logs.configure(config.log.level, config.log.format)
    try:
        service = Service(config, record_only=record_only, extra_publishers=extra_publishers)
        return asyncio.run(service.run())
    except StreamerError as exc:
        print(f"streamer {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
