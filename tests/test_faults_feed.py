"""Feed faults end to end: the daemon (``Service``, a real ``DeribitFeed``, the fused parser,
books, fits, a memory publisher) talks to the fake Deribit server through the fault proxy
(``streamer.feeds.faultproxy``), which drops, resets, stalls, slows, slices and cuts the
connection while the fake sends bad data (malformed frames, duplicates, timestamps in the
wrong unit or skewed, book change_id gaps and reordering, test_request storms, -32600 on
subscribe, 10028, oversized frames).

What must hold, each checked against what the fake and the proxy say they did (never
against the daemon's own view of itself): reconnects back off (delays grow, and reset after a
session that streamed), no channel is ever subscribed twice on one connection, stale quotes
leave the snapshot, the surfaces go ``stale`` and back to ``ok``, every bad frame is counted
under its reason (parser, book, metrics), no valid frame is lost, nothing crashes (the service
exits 0), and the book recovers by itself.

Every wait is a multiple of the suite's ``UNIT``; no speed is asserted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from streamer.book.book import MAX_TS_MS, Book
from streamer.config import Config, load_config
from streamer.daemon.service import Service
from streamer.feeds.base import FrameParser
from streamer.feeds.deribit.connection import DeribitFeed
from streamer.feeds.deribit.fake import (
    MALFORMED,
    FakeDeribitServer,
    ScriptFrame,
    notification,
    synthetic_book_script,
)
from streamer.feeds.deribit.protocol import (
    book_channel,
    index_channel,
    instrument_state_channel,
    ticker_channel,
)
from streamer.feeds.faultproxy import (
    FaultProxy,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Stall,
    Toxic,
)
from streamer.publish.memory import MemoryPublisher
from tests.conftest import UNIT
from tests.synth import DAY_MS, deribit_chain, make_chain, svi_surface

SURFACE = "streamer/deribit/BTC/svi/surface"
DAYS = (7, 14, 30)
BACKOFF_S = 0.1 * UNIT
JITTER = 0.5


def chain() -> tuple[list[dict[str, Any]], list[ScriptFrame]]:
    """A BTC chain around an SVI surface, listed today at 08:00 UTC (3 expiries, 9 strikes,
    calls and puts: 54 options), one ticker each (the fake stamps and loops them)."""
    today = time.time_ns() // 1_000_000 // DAY_MS * DAY_MS + 8 * 3_600_000
    _, fn = svi_surface(days=DAYS)
    snap = make_chain(fn, days=DAYS, n_strikes=9, ts_ms=today, rng=np.random.default_rng(5))
    instruments, tickers = deribit_chain(snap)
    return instruments, [ScriptFrame(f"ticker.{t['instrument_name']}", t) for t in tickers]


class Rig:
    """fake Deribit <- fault proxy <- Service (one DeribitFeed) -> MemoryPublisher."""

    def __init__(
        self,
        *,
        fake: dict[str, Any] | None = None,
        feed: dict[str, Any] | None = None,
        toxics: Sequence[Toxic] = (),
        stale_after_s: float = 60.0,
        book_channels: bool = False,
    ) -> None:
        self.instruments, script = chain()
        if book_channels:
            book = synthetic_book_script(self.instruments, rounds=3)
            script = [f for pair in zip(script * 3, book, strict=False) for f in pair]
        self.script = script
        self.fake_kw = {
            "instruments": self.instruments,
            "script": script,
            "loops": None,
            "interval_s": 0.004 * UNIT,
            "live_timestamps": True,
            **(fake or {}),
        }
        self.feed_kw = feed or {}
        self.toxics = list(toxics)
        self.book_channels = book_channels
        self.stale_after_s = stale_after_s
        self.delays: list[float] = []  # every reconnect wait the feed chose
        self.feeds: list[DeribitFeed] = []
        self.mem = MemoryPublisher()
        self.stop = asyncio.Event()
        self.t0_ms = time.time_ns() // 1_000_000

    def config(self) -> Config:
        cfg = load_config(None)
        return dataclasses.replace(
            cfg,
            instance="faults",
            feed=dataclasses.replace(cfg.feed, currencies=("BTC",)),
            book=dataclasses.replace(cfg.book, stale_after_s=self.stale_after_s),
            models=dataclasses.replace(cfg.models, names=("svi",)),
            trigger=dataclasses.replace(
                cfg.trigger,
                min_changed_quotes=20,
                min_interval_s=0.05 * UNIT,
                max_interval_s=0.5 * UNIT,
                warmup_s=0.05 * UNIT,
            ),
        )

    async def _sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(seconds)

    def _factory(
        self, config: Config, parser: FrameParser, on_frame: Callable[[str, int], None] | None
    ) -> DeribitFeed:
        args: dict[str, Any] = {
            "url": self.proxy.url(),
            "currencies": ("BTC",),
            "parser": parser,
            "on_frame": on_frame,
            "book_channels": self.book_channels,
            "dead_after_s": 1.0 * UNIT,
            "backoff_initial": BACKOFF_S,
            "backoff_max": 8 * BACKOFF_S,
            "backoff_jitter": JITTER,
            "rate_limit_backoff_s": 0.0,
            "open_timeout_s": 2.0 * UNIT,
            "sleep": self._sleep,
            "rng": random.Random(7),
            "proxy": None,
            **self.feed_kw,
        }
        feed = DeribitFeed(**args)
        self.feeds.append(feed)
        return feed

    async def __aenter__(self) -> Rig:
        self.fake = FakeDeribitServer(**self.fake_kw)
        await self.fake.start()
        port = int(self.fake.url.rsplit(":", 1)[1].split("/", 1)[0])
        self.proxy = FaultProxy("127.0.0.1", port, seed=3)
        await self.proxy.start()
        for toxic in self.toxics:
            self.proxy.add(toxic)
        self.service = Service(self.config(), feed_factory=self._factory, publishers=[self.mem])
        self.task = asyncio.create_task(self.service.run(self.stop, signals=False))
        async with asyncio.timeout(120 * UNIT):  # numba kernels: loaded from the cache
            await self.service.ready.wait()
        await self.wait(lambda: bool(self.feeds))
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.stop.set()
        try:
            code = await asyncio.wait_for(self.task, 20 * UNIT)
        finally:
            await self.proxy.aclose()
            await self.fake.aclose()
        if exc_type is None:
            assert code == 0  # no crash: the service ran until told to stop

    # -- conveniences ---------------------------------------------------------------------

    @property
    def feed(self) -> DeribitFeed:
        assert len(self.feeds) == 1
        return self.feeds[0]

    def book(self) -> Book:
        book = self.service.pipeline.books.get("deribit", "BTC")
        assert book is not None
        return book

    def surfaces(self) -> list[dict[str, Any]]:
        return [m.payload for m in self.mem.messages if m.topic == SURFACE]

    def statuses(self) -> list[str]:
        return [str(p["status"]) for p in self.surfaces()]

    async def wait(self, predicate: Callable[[], bool], timeout: float = 60 * UNIT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.task.done():
                    self.task.result()  # raise what ended the service
                    raise AssertionError("the service ended by itself")
                await asyncio.sleep(0.02 * UNIT)

    async def wait_ok_surface(self, after: int = 0, expiries: int = len(DAYS)) -> dict[str, Any]:
        """The first ``ok`` surface published after the ``after``-th, covering ``expiries``."""

        def found() -> bool:
            return any(
                p["status"] == "ok" and len(p["expiries"]) >= expiries
                for p in self.surfaces()[after:]
            )

        await self.wait(found)
        return next(
            p
            for p in self.surfaces()[after:]
            if p["status"] == "ok" and len(p["expiries"]) >= expiries
        )

    def wanted(self) -> set[str]:
        chans = {instrument_state_channel("BTC"), str(index_channel("BTC"))}
        for i in self.instruments:
            name = str(i["instrument_name"])
            chans.add(ticker_channel(name))
            if self.book_channels:
                chans.add(book_channel(name))
        return chans

    def check_subscriptions(self) -> None:
        """No channel was ever subscribed while subscribed on any connection, and each
        connection that got through its listing subscribed every wanted channel."""
        for conn in self.fake.connections:
            assert not conn.doubled, (conn.index, conn.doubled)
            assert all(n == 1 for ch, n in conn.subscribe_counts.items() if "ticker." in ch)


def delay_bounds(i: int) -> tuple[float, float]:
    """The i-th wait since a reset: drawn from [d (1 - jitter), d], d = initial 2**i, capped."""
    d = min(8 * BACKOFF_S, BACKOFF_S * 2**i)
    return d * (1 - JITTER) - 1e-12, d + 1e-12


# -- connection faults ---------------------------------------------------------------------------


async def test_drops_reconnect_with_backoff_and_never_a_doubled_subscription() -> None:
    """No upstream handshake gets through (the proxy closes at the first byte back): waits
    grow. Then the link heals: data flows, and the next waits start over. Then every
    connection is reset (RST) shortly after it opens, several times: each reconnect
    subscribes every channel once, and surfaces go stale and back to ok each time."""
    async with Rig(toxics=[LimitData(max_bytes=0, name="refuse")]) as rig:
        await rig.wait(lambda: len(rig.delays) >= 4)
        assert rig.feed.sessions == 0
        for i, d in enumerate(rig.delays[:4]):  # nothing streamed: no reset, the wait grows
            lo, hi = delay_bounds(i)
            assert lo <= d <= hi, (i, d)
        rig.proxy.remove("refuse")
        first = await rig.wait_ok_surface()
        assert first["status"] == "ok"
        grown = len(rig.delays)
        rig.proxy.add(ResetPeer(after_s=1.5 * UNIT))
        await rig.wait(lambda: rig.feed.sessions >= 4 and rig.statuses().count("stale") >= 2)
        rig.proxy.clear()
        n = len(rig.surfaces())
        await rig.wait_ok_surface(after=n)
        resets = [c for c in rig.proxy.connections if c.how == "rst"]
        assert len(resets) >= 2
        # after sessions that streamed, every wait is the initial one again
        for d in rig.delays[grown:]:
            lo, hi = delay_bounds(0)
            assert lo <= d <= hi, d
        rig.check_subscriptions()
        wanted = rig.wanted()
        for conn in rig.fake.connections:
            if conn.script_frames:  # got through its listing: everything asked, once
                assert set(conn.subscribe_counts) == wanted
        statuses = rig.statuses()
        assert statuses[0] == "ok" and statuses[-1] == "ok" and "stale" in statuses


async def test_backoff_resets_in_a_quiet_market_too() -> None:
    """A market where nothing moves (the same tickers again and again): after the first
    session the fused path writes them without an event (nothing changed), yet sessions that
    kept receiving for the dead-after interval worked, so the waits do not grow."""
    async with Rig(fake={"live_timestamps": False}, toxics=[ResetPeer(after_s=1.5 * UNIT)]) as rig:
        await rig.wait(lambda: rig.feed.sessions >= 4 and len(rig.delays) >= 3)
        for d in rig.delays:
            lo, hi = delay_bounds(0)
            assert lo <= d <= hi, rig.delays
        rig.check_subscriptions()


async def test_silent_stall_goes_stale_and_stale_quotes_leave_the_snapshot() -> None:
    """The link goes silent with the sockets open (toxiproxy's timeout). The feed notices
    after its dead-after interval, the surfaces go stale, it reconnects once the link heals.
    Meanwhile the exchange stopped quoting the first expiry: those quotes age past
    ``stale_after_s`` and leave the snapshot, and the next surfaces no longer fit it."""
    stale_after = 3.0 * UNIT
    async with Rig(stale_after_s=stale_after) as rig:
        await rig.wait_ok_surface()
        first = rig.surfaces()[-1]["expiries"][0]["expiry"]
        gone = [i for i in rig.instruments if f"-{first}-" in str(i["instrument_name"])]
        rig.fake.script[:] = [f for f in rig.script if f"-{first}-" not in f.channel]
        rig.proxy.add(Stall())
        await rig.wait(lambda: rig.feed.stale >= 1 and "stale" in rig.statuses())
        # silence, not a close: data was swallowed on an open socket until the feed gave up
        assert rig.proxy.connections[0].stalled_bytes > 0 and rig.feed.stale == 1
        assert rig.fake.connections[0].closed_by_server == ""
        rig.proxy.clear()
        n = len(rig.surfaces())
        surf = await rig.wait_ok_surface(after=n, expiries=len(DAYS) - 1)

        def without_first() -> bool:
            return any(
                p["status"] == "ok" and first not in {e["expiry"] for e in p["expiries"]}
                for p in rig.surfaces()[n:]
            )

        book = rig.book()
        # as their quotes age past stale_after_s, snapshots leave them out, all of them
        await rig.wait(lambda: without_first() and book.drops["stale"] == len(gone))
        # nothing else left them (a slow machine may also snapshot a listing whose first
        # ticker after the reconnect has not arrived yet: counted no_quote, not a loss)
        assert set(book.drops) - {"no_quote"} == {"stale"}
        assert len(book) == len(rig.instruments)  # still listed, only not quoted
        assert surf["status"] == "ok" and rig.feed.sessions >= 2
        statuses = rig.statuses()
        last_stale = len(statuses) - 1 - statuses[::-1].index("stale")
        assert "ok" in statuses[last_stale:]
        rig.check_subscriptions()


async def test_byte_limit_cuts_frames_in_the_middle() -> None:
    """Every connection is cut after a number of bytes, inside a websocket frame. The half
    frame is never parsed (the parser drops nothing), the feed reconnects each time, data
    keeps flowing and surfaces keep coming."""
    async with Rig(toxics=[LimitData(max_bytes=120_000)]) as rig:
        await rig.wait(lambda: rig.feed.sessions >= 3)
        n = len(rig.surfaces())
        await rig.wait_ok_surface(after=n)
        cut = [c for c in rig.proxy.connections if c.closed.startswith("limitdata")]
        assert len(cut) >= 2
        assert all(c.bytes_down == 120_000 for c in cut)
        assert not rig.service.pipeline.parser.drops  # no half frame got to the parser
        rig.check_subscriptions()


async def test_slow_close_after_the_exchange_drops_us() -> None:
    """The exchange aborts every connection after 60 frames, and the proxy passes each close
    on late (the feed sees a silent open socket first): every time the feed reconnects,
    subscribes once, and the surfaces go stale and come back."""
    async with Rig(
        fake={"drop_after_frames": 60, "faulty_connections": None},
        toxics=[SlowClose(delay_s=0.5 * UNIT)],
    ) as rig:
        await rig.wait(lambda: rig.feed.sessions >= 3 and rig.statuses().count("stale") >= 2)
        n = len(rig.surfaces())
        await rig.wait_ok_surface(after=n)
        ended = [c for c in rig.proxy.connections if not c.open]
        assert len(ended) >= 2 and all(c.closed.startswith("upstream") for c in ended)
        assert all(c.closed_by_server == "drop" for c in rig.fake.connections[:2])
        rig.check_subscriptions()


async def test_latency_and_slicing_lose_nothing() -> None:
    """A slow link that splits every write into small pieces: every frame the fake sent
    arrives whole and is parsed (no drop), one session throughout."""
    toxics = [Latency(latency_s=0.02 * UNIT), Slicer(average_bytes=40, variation_bytes=30)]
    async with Rig(toxics=toxics, fake={"loops": 2}, feed={"dead_after_s": 30 * UNIT}) as rig:
        conn = await _first_connection(rig)
        await rig.wait(lambda: conn.script_frames == 2 * len(rig.script))
        await rig.wait(lambda: rig.feed.frames >= len(conn.sent))
        await rig.wait_ok_surface()
        assert rig.feed.frames == len(conn.sent) and rig.feed.sessions == 1
        assert rig.service.pipeline.parser.frames == len(conn.sent)
        assert not rig.service.pipeline.parser.drops
        assert rig.proxy.connections[0].slices > len(conn.sent)


async def _first_connection(rig: Rig) -> Any:
    await rig.fake.wait_until(lambda: len(rig.fake.connections) >= 1, 30 * UNIT)
    return rig.fake.connections[0]


# -- protocol faults -----------------------------------------------------------------------------


async def test_rate_limit_and_subscribe_refusals() -> None:
    """The first subscribe requests are refused with -32600 (no id: the feed halves its
    batches and asks again), then every request gets 10028: the session ends and the next
    connect waits at least the rate-limit backoff. The second connection is clean."""
    wait = 0.5 * UNIT
    async with Rig(
        fake={"subscribe_refusals": 2, "rate_limit_after_requests": 8},
        feed={"rate_limit_backoff_s": wait, "batch_size": 20},
    ) as rig:
        await rig.wait_ok_surface()
        first = rig.fake.connections[0]
        assert first.faults["subscribe_refused"] == 2 and first.rate_limited_requests >= 1
        assert rig.feed.rate_limited == 1 and rig.feed.subscribe_errors >= 2
        assert rig.delays[0] >= wait
        second = rig.fake.connections[1]
        assert set(second.subscribe_counts) == rig.wanted()
        rig.check_subscriptions()


async def test_oversized_frames_are_dropped_before_decoding() -> None:
    """A frame over ``max_frame_bytes`` is dropped and counted, the session goes on; one over
    twice that is refused by the websocket library itself (1009): counted, reconnect."""
    limit = 64 * 1024
    big = notification("ticker.BTC-X", {"pad": "x" * (limit + 1000)})
    async with Rig(fake={"oversized_frames": [big]}, feed={"max_frame_bytes": limit}) as rig:
        await rig.wait_ok_surface()
        parser = rig.service.pipeline.parser
        assert parser.drops == Counter(too_large=1) and rig.feed.drops == Counter(too_large=1)
        assert rig.feed.sessions == 1
        huge = notification("ticker.BTC-X", {"pad": "x" * (2 * limit + 1000)})
        await rig.fake.push_raw(huge)
        await rig.wait(lambda: rig.feed.sessions >= 2)
        n = len(rig.surfaces())
        await rig.wait_ok_surface(after=n)
        assert rig.feed.drops["too_large"] == 2 and parser.drops["too_large"] == 2
        rig.service._refresh_metrics()
        values = rig.service.metrics.drops.values
        assert values[(("reason", "too_large"), ("stage", "parse"))] == 2.0


# -- bad data ------------------------------------------------------------------------------------


async def test_bad_data_is_counted_by_reason_no_valid_frame_is_lost_and_the_book_recovers() -> None:
    """The first connection carries everything at once: 10% malformed frames (five kinds),
    10% duplicated, 3% each of timestamps in us, in s and a day ahead, book gaps and
    reordered changes, test_request storms, two -32600 refusals, over a slow slicing link.
    It then goes silent (the fake stops sending), the feed reconnects, the second connection
    is clean. Checked against what the fake says it sent."""
    rig_fake = {
        "malformed_ratio": 0.1,
        "duplicate_ratio": 0.1,
        "timestamp_faults": {"us": 0.03, "s": 0.03, "skew": 0.03},
        "book_gap_ratio": 0.05,
        "book_reorder_ratio": 0.05,
        "subscribe_refusals": 2,
        "test_request_storm": 20,
        "test_request_storm_every_s": 0.5 * UNIT,
        "fault_seed": 11,
    }
    toxics = [Slicer(average_bytes=200, variation_bytes=150), Latency(latency_s=0.002 * UNIT)]
    feed = {"dead_after_s": 3 * UNIT}
    async with Rig(fake=rig_fake, feed=feed, toxics=toxics, book_channels=True) as rig:
        parser = rig.service.pipeline.parser
        conn0 = await _first_connection(rig)
        await rig.wait(lambda: conn0.script_frames >= 3 * len(rig.script))
        await rig.wait(lambda: sum(conn0.faults[k] for k in MALFORMED) >= 25)
        rig.fake.stall_after_frames = conn0.script_frames  # the first connection goes silent
        await rig.wait(lambda: conn0.stalled)
        await rig.wait(lambda: rig.feed.frames >= len(conn0.sent))
        # everything the first connection carried arrived and was parsed or counted
        assert rig.feed.frames == len(conn0.sent) and parser.frames == len(conn0.sent)
        faults = Counter(conn0.faults)
        dropped = Counter(parser.drops)
        for kind in MALFORMED:
            assert dropped[kind] == faults[kind] >= 1, kind
        assert sum(dropped.values()) == sum(faults[k] for k in MALFORMED)  # nothing else
        valid = len(conn0.sent) - sum(faults[k] for k in MALFORMED)
        assert parser.frames - sum(dropped.values()) == valid  # valid frames lost: 0
        assert faults["duplicate"] >= 1 and faults["test_request"] >= 40
        assert conn0.test_requests_answered == conn0.test_requests_sent
        assert faults["subscribe_refused"] == 2 and rig.feed.subscribe_errors == 2
        gaps = faults["book_gap"] + faults["book_reorder"]
        assert 1 <= rig.feed.resubscribes <= gaps
        book = rig.book()
        bad_ts = faults["timestamp_us"] + faults["timestamp_s"] + faults["timestamp_skew"]
        assert faults["timestamp_us"] and faults["timestamp_s"] and faults["timestamp_skew"]
        assert 1 <= book.rejected["bad_timestamp"] <= bad_ts
        # the clock never followed them: nothing expired, no surface stamped in us or a day on
        assert len(book) == len(rig.instruments) and book.settled_ms < min(
            int(i["expiration_timestamp"]) for i in rig.instruments
        )
        now_ms = time.time_ns() // 1_000_000
        for p in rig.surfaces():
            assert rig.t0_ms - 60_000 <= p["ts_ms"] <= now_ms + 60_000 < MAX_TS_MS
        # the silence ends the session; the second connection is clean and the book recovers
        await rig.wait(lambda: rig.feed.sessions >= 2)
        conn1 = rig.fake.connections[1]
        await rig.wait(lambda: conn1.script_frames >= len(rig.script))
        rig.fake.loops = 0  # the exchange stops after this pass
        await rig.wait(lambda: conn1.script_done)
        await rig.wait(lambda: rig.feed.frames >= len(conn0.sent) + len(conn1.sent))
        last: dict[str, int] = {}
        for frame in conn1.notifications:
            data = json.loads(frame)["params"]["data"]
            last[str(data["instrument_name"])] = int(data["timestamp"])
        book.snapshot()
        assert set(last) == {str(i["instrument_name"]) for i in rig.instruments}
        # every row is the exchange's latest: no bad time left, nothing stale or unquoted
        assert not {"bad_timestamp", "stale", "no_quote", "expiring"} & set(book.drops)
        for name, ts in last.items():
            row = book.quote_row(name)
            assert row is not None and row["ts_ms"] == ts, name
        assert set(parser.drops) == set(MALFORMED)  # and nothing else, on either connection
        # the metrics carry the same counts
        rig.service._refresh_metrics()
        values = rig.service.metrics.drops.values
        for kind in MALFORMED:
            assert values[(("reason", kind), ("stage", "parse"))] == parser.drops[kind]
        key = (("reason", "bad_timestamp"), ("stage", "book_in"), ("underlying", "BTC"))
        assert values[key] == book.rejected["bad_timestamp"]
        rig.check_subscriptions()
        assert "ok" in rig.statuses()


@pytest.mark.parametrize("kind", ["us", "skew"])
async def test_every_quote_in_a_wrong_unit_or_skewed_for_a_while(kind: str) -> None:
    """A third of the tickers in microseconds (or a day ahead) for a whole connection: the
    book keeps its clock, the surfaces stay ok, and the next connection heals every row."""
    async with Rig(fake={"timestamp_faults": {kind: 0.33}, "loops": 3}) as rig:
        conn0 = await _first_connection(rig)
        await rig.wait(lambda: conn0.script_frames == 3 * len(rig.script))
        await rig.wait(lambda: rig.feed.frames >= len(conn0.sent))
        await rig.wait_ok_surface()
        book = rig.book()
        assert len(book) == len(rig.instruments) and book.rejected["bad_timestamp"] >= 1
        rig.proxy.reset_all()  # a new, clean connection
        await rig.wait(lambda: rig.feed.sessions >= 2)
        conn1 = rig.fake.connections[1]
        await rig.wait(lambda: conn1.script_frames == 3 * len(rig.script))
        await rig.wait(lambda: rig.feed.frames >= len(conn0.sent) + len(conn1.sent))
        snap = book.snapshot()
        assert snap.n_quotes == len(rig.instruments) and not book.drops["bad_timestamp"]
        assert all(p["status"] in ("ok", "stale") for p in rig.surfaces())
