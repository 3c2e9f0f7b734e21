"""Memory stays bounded (issue 12, bug 2): every per-fit, per-batch or per-event record that
used to grow for as long as the daemon ran is now a ring or is pruned. Checked by counts (how
many items a structure holds after many more events than its bound), never by timings; the
RSS of a whole day is ``benchmarks/soak.py``'s business.

Bounded elsewhere and tested there: the MQTT pending map (latest per topic,
``tests/test_faults_bus.py``); the Deribit feed's reconnect delays are a ring of its own
(``DeribitFeed.delays``), counted here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np
import pytest

import streamer.daemon.pipeline as pipeline_mod
from streamer.book.book import Book
from streamer.daemon.pipeline import Pipeline
from streamer.daemon.service import LATENCY_WINDOW, Service
from streamer.feeds.ccxt.connection import KEPT_DELAYS, CcxtFeed
from streamer.feeds.deribit.connection import DELAYS_KEPT, DeribitFeed
from streamer.feeds.deribit.parser import DeribitParser
from streamer.instruments import expiry_code_of, parse_option
from tests.conftest import UNIT
from tests.mosquitto import free_port
from tests.synth import make_chain, svi_surface
from tests.test_service import service_config

T0_MS = 1_893_484_800_000  # 2030-01-01 08:00 UTC
MS_PER_DAY = 86_400_000


def test_fit_quality_keeps_a_window_and_exact_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    window = 25
    monkeypatch.setattr(pipeline_mod, "QUALITY_WINDOW", window)
    _, fn = svi_surface()
    rng = np.random.default_rng(1)
    pipe = Pipeline(models=("svi",), greeks=False)
    snap = make_chain(fn, noise_iv=0.002, rng=rng)
    pipe._underlying(pipe.books.book(snap.venue, snap.underlying))
    n = 3 * window + 7
    for _ in range(n):
        pipe.fit_snapshot(snap)
    q = pipe.quality["svi"]
    assert len(q) == window  # the ring holds the newest `window` fits ...
    assert pipe.fits["svi"] == n  # ... while the counts stay exact
    assert all(r[3] for r in q)  # the window is the newest: all warm fits (the first was cold)


async def test_latencies_are_a_ring() -> None:
    service = Service(service_config("ws://127.0.0.1:1", "mqtt://127.0.0.1:1"), publishers=[])
    msg = pipeline_mod.Message("streamer/deribit/BTC/svi/surface", {"seq": 1})
    for _ in range(LATENCY_WINDOW + 500):
        await service._publish([msg], trigger_ns=time.time_ns())
    assert len(service.latencies_ms) == LATENCY_WINDOW


def _option(expiry_ms: int, strike: int) -> Any:
    opt = parse_option(f"BTC-{expiry_code_of(expiry_ms)}-{strike}-C")
    assert opt is not None
    return opt


def test_removed_names_are_forgotten_once_their_expiry_settles() -> None:
    """A year of daily expiries, each listing 30 options of which 10 are delisted early (so
    their names must be remembered until settlement): the memory of removed names never
    holds more than the delisted names of the expiries still live."""
    book = Book("deribit", "BTC")
    peak = 0
    for day in range(365):
        now = T0_MS + day * MS_PER_DAY
        expiry = now + MS_PER_DAY  # tomorrow's 08:00
        for k in range(30):
            assert book.add_option(_option(expiry, 10_000 + 1000 * k), now) is not None
        for k in range(10):
            book.remove(f"BTC-{expiry_code_of(expiry)}-{10_000 + 1000 * k}-C", now + 1)
        book.snapshot(now_ms=now + 2)  # settles yesterday's expiry (08:00 today)
        peak = max(peak, len(book._expired))
    assert peak <= 10  # only today's delisted names; without pruning: 3650
    assert len(book) == 20  # today's live options


async def test_deribit_reconnect_delays_are_bounded() -> None:
    port = free_port()  # nothing listens: every connect fails at once
    sleeps = 0

    async def sleep(_: float) -> None:
        nonlocal sleeps
        sleeps += 1

    feed = DeribitFeed(url=f"ws://127.0.0.1:{port}/ws", parser=DeribitParser(), sleep=sleep)

    async def consume() -> None:  # a feed that never connects yields nothing: just run it
        async for _ in feed.events():
            pass

    task = asyncio.create_task(consume())
    try:
        async with asyncio.timeout(120 * UNIT):
            while sleeps < DELAYS_KEPT + 200:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(feed.delays) == DELAYS_KEPT


async def test_ccxt_reconnect_delays_are_bounded() -> None:
    sleeps = 0

    async def sleep(_: float) -> None:
        nonlocal sleeps
        sleeps += 1

    def down() -> Any:
        raise ConnectionError("exchange unreachable")  # retryable: reconnect, forever

    feed = CcxtFeed("okx", ["BTC"], exchange_factory=down, sleep=sleep)
    events = feed.events()
    async with asyncio.timeout(60 * UNIT):
        while sleeps < 5 * KEPT_DELAYS:
            await anext(events)
    await events.aclose()
    assert len(feed.delays) == KEPT_DELAYS
