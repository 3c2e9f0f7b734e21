"""The live Deribit adapter: pure protocol helpers without sockets, then the whole feed against
the fake Deribit server on 127.0.0.1 (real JSON-RPC frames, real DeribitParser).

Timeouts are multiples of one step (``TICK``: 50 ms times the suite's ``UNIT``), like
python-websockets' tests, so the file runs in a few seconds and slows down with
``STREAMER_TEST_UNIT`` on a loaded machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest

from streamer.backoff import Backoff
from streamer.errors import InputError
from streamer.events import (
    BookTop,
    Event,
    FeedStatus,
    Heartbeat,
    InstrumentExpired,
    InstrumentListed,
    Quote,
)
from streamer.feeds.deribit.connection import DeribitFeed
from streamer.feeds.deribit.fake import (
    CAPTURE_INSTRUMENTS,
    CAPTURE_WS,
    ConnectionLog,
    FakeDeribitServer,
    ScriptFrame,
    instruments_from_capture,
    script_from_capture,
    synthetic_instruments,
    synthetic_script,
)
from streamer.feeds.deribit.protocol import (
    INVALID_REQUEST,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Subscriptions,
    batch_channels,
    book_channel,
    currency_of,
    index_channel,
    instrument_channels,
    rpc_request,
    static_channels,
    ticker_channel,
)
from tests.conftest import UNIT, shared_file

TICK = 0.05 * UNIT  # seconds: this file's time step, scaled by the suite's one unit
WAIT = 60 * TICK  # the longest any condition may take


# -- pure helpers ------------------------------------------------------------------------------


def test_rpc_request_is_json_rpc_2() -> None:
    msg = json.loads(rpc_request(7, "public/subscribe", {"channels": ["a", "b"]}))
    assert msg == {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "public/subscribe",
        "params": {"channels": ["a", "b"]},
    }


def test_channel_names_follow_deribit() -> None:
    assert ticker_channel("BTC-27DEC24-100000-C") == "ticker.BTC-27DEC24-100000-C.100ms"
    assert book_channel("BTC-7FEB25-90000-P") == "book.BTC-7FEB25-90000-P.100ms"
    assert instrument_channels("X", book=False) == ("ticker.X.100ms",)
    assert instrument_channels("X", book=True) == ("ticker.X.100ms", "book.X.100ms")
    assert index_channel("BTC") == "deribit_price_index.btc_usd"
    assert index_channel("USDC") is None
    assert static_channels(["BTC", "USDC"]) == [
        "instrument.state.option.BTC",
        "deribit_price_index.btc_usd",
        "instrument.state.option.USDC",
    ]
    assert currency_of("ETH") == "ETH"
    assert currency_of("XRP_USDC") == "USDC"


def test_batches_keep_order_and_respect_count_and_bytes() -> None:
    channels = [f"ticker.BTC-27DEC24-{k}-C.100ms" for k in range(1000, 1250)]
    batches = batch_channels(channels, batch_size=40, max_bytes=100_000)
    assert [len(b) for b in batches] == [40] * 6 + [10]
    assert [ch for b in batches for ch in b] == channels
    # the byte cap: each name is 32 characters, 35 with quotes and comma
    batches = batch_channels(channels, batch_size=1000, max_bytes=35 * 9)
    assert {len(b) for b in batches[:-1]} == {9}
    assert [ch for b in batches for ch in b] == channels
    assert batch_channels([], 10) == []
    with pytest.raises(InputError):
        batch_channels(channels, batch_size=0)


def test_backoff_jitter_bounds_cap_and_reset() -> None:
    initial, maximum, factor, jitter = 0.5, 6.0, 2.0, 0.4
    backoff = Backoff(initial, maximum, factor, jitter, random.Random(1))
    bases = [0.5, 1.0, 2.0, 4.0, 6.0, 6.0, 6.0]  # min(cap, initial * factor**n), by hand
    for _ in range(50):
        backoff.reset()
        delays = [backoff.next_delay() for _ in bases]
        for d, base in zip(delays, bases, strict=True):
            assert base * (1 - jitter) <= d <= base
    assert backoff.attempts == len(bases)
    backoff.reset()
    assert backoff.attempts == 0 and backoff.base() == initial
    assert initial * (1 - jitter) <= backoff.next_delay() <= initial
    # jitter really spreads the delays; no jitter makes them exact
    spread = Backoff(1.0, 1.0, 2.0, 0.5, random.Random(2))
    assert len({round(spread.next_delay(), 9) for _ in range(20)}) == 20
    exact = Backoff(1.0, 8.0, 2.0, 0.0)
    assert [exact.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    for bad in ({"initial": 0.0}, {"maximum": 0.1}, {"factor": 0.5}, {"jitter": 1.5}):
        with pytest.raises(InputError):
            Backoff(**bad)  # type: ignore[arg-type]


def test_subscriptions_each_channel_asked_once_per_session() -> None:
    subs = Subscriptions()
    subs.want(["c", "a", "b"])
    assert subs.missing() == ["a", "b", "c"]
    subs.sent(1, SUBSCRIBE, ["a", "b", "c"])
    assert subs.missing() == []  # in flight: not asked again
    out = subs.on_result(1, ["a", "c"])  # the server accepted two of three
    assert out is not None and out.accepted == ("a", "c") and out.refused == ("b",)
    assert subs.active == {"a", "c"} and subs.missing() == []  # b refused for this session
    subs.want(["d"])
    assert subs.missing() == ["d"]
    assert subs.requested == {"a": 1, "b": 1, "c": 1}
    subs.new_session()  # a reconnect: everything wanted is missing again, once
    assert subs.missing() == ["a", "b", "c", "d"] and subs.active == set()
    assert subs.requested == {}


def test_subscriptions_unwant_resubscribe_and_errors() -> None:
    subs = Subscriptions()
    subs.want(["a", "b", "c"])
    subs.sent(1, SUBSCRIBE, ["a", "b"])
    subs.sent(2, SUBSCRIBE, ["c"])
    assert subs.oldest(SUBSCRIBE) == 1
    subs.on_result(1, ["a", "b"])
    # unwant: active or in-flight channels must be unsubscribed, the others just dropped
    assert subs.unwant(["a", "c", "zz"]) == ["a", "c"]
    assert "a" not in subs.wanted
    # a gap on b: resubscribe once; while the new subscribe is in flight, not again
    assert subs.resubscribe("b") is True
    assert subs.missing() == ["b"]
    subs.sent(3, UNSUBSCRIBE, ["b"])
    subs.sent(4, SUBSCRIBE, ["b"])
    assert subs.resubscribe("b") is False
    subs.on_result(3, ["b"])
    subs.on_result(4, ["b"])
    assert "b" in subs.active and subs.requested["b"] == 2
    assert subs.resubscribe("never-subscribed") is False
    # a refused request: retried (too large) or refused for the session
    subs.want(["e", "f"])
    subs.sent(5, SUBSCRIBE, ["e", "f"])
    out = subs.on_error(5, retry=True)
    assert out is not None and out.channels == ("e", "f") and subs.missing() == ["e", "f"]
    subs.sent(6, SUBSCRIBE, ["e", "f"])
    subs.on_error(6, retry=False)
    assert subs.missing() == [] and {"e", "f"} <= subs.refused
    assert subs.on_result(99, []) is None and subs.on_error(99, retry=True) is None


def test_feed_rejects_bad_arguments() -> None:
    from streamer.feeds.deribit.parser import DeribitParser

    p = DeribitParser()
    with pytest.raises(InputError, match="heartbeat_s"):
        DeribitFeed(url="ws://127.0.0.1:1", parser=p, heartbeat_s=5)
    with pytest.raises(InputError, match="url"):
        DeribitFeed(url="http://127.0.0.1:1", parser=p)
    with pytest.raises(InputError, match="currencies"):
        DeribitFeed(url="ws://127.0.0.1:1", parser=p, currencies="BTC")
    with pytest.raises(InputError, match="batch_size"):
        DeribitFeed(url="ws://127.0.0.1:1", parser=p, batch_size=0)


# -- the feed against the fake server ----------------------------------------------------------


def make_parser() -> Any:
    from streamer.feeds.deribit.parser import DeribitParser

    return DeribitParser()


def parser_drops(parser: Any) -> int:
    """The parser's count of dropped frames (an int or a Counter of reasons)."""
    drops = parser.drops
    return sum(drops.values()) if isinstance(drops, Mapping) else int(drops)


class Run:
    """Consume a feed's events in a background task; wait for conditions on them."""

    def __init__(self, feed: DeribitFeed) -> None:
        self.feed = feed
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Run:
        self._task = asyncio.create_task(self._consume())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _consume(self) -> None:
        async with contextlib.aclosing(self.feed.events()) as events:
            async for ev in events:
                self.events.append(ev)
                self._changed.set()

    async def wait(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                assert self._task is not None
                if self._task.done():
                    self._task.result()  # raise what killed the feed
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def states(self) -> list[str]:
        return [e.state for e in self.of(FeedStatus) if not e.instrument]


async def connection(server: FakeDeribitServer, index: int = 0) -> ConnectionLog:
    """The server's log of its ``index``-th connection, once the feed made it."""
    await server.wait_until(lambda: len(server.connections) > index, WAIT)
    return server.connections[index]


def make_feed(server: FakeDeribitServer, **kw: Any) -> DeribitFeed:
    args: dict[str, Any] = {
        "url": server.url,
        "currencies": ("BTC", "ETH"),
        "parser": make_parser(),
        "dead_after_s": 8 * TICK,
        "backoff_initial": TICK / 5,
        "backoff_max": TICK,
        "proxy": None,
    }
    args.update(kw)
    return DeribitFeed(**args)


def ticker_frames(frames: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for f in frames:
        msg = json.loads(f)
        if msg.get("method") == "subscription" and msg["params"]["channel"].startswith("ticker."):
            out.append(msg["params"]["data"])
    return out


def side(x: object) -> float:
    """The wire's price/IV: 0 or null means no quote (NaN)."""
    return math.nan if x is None or x == 0 else float(x)  # type: ignore[arg-type]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12)


def synthetic(n_btc: int = 0) -> list[dict[str, Any]]:
    """The fake's synthetic options, plus ``n_btc`` more BTC calls."""
    out = synthetic_instruments()
    base = dict(out[0])
    for k in range(n_btc):
        strike = 70_000 + 1_000 * k
        out.append(base | {"instrument_name": f"BTC-3JAN31-{strike}-C", "strike": float(strike)})
    return out


@pytest.fixture
async def capture_server() -> AsyncIterator[FakeDeribitServer]:
    instruments = instruments_from_capture(shared_file(CAPTURE_INSTRUMENTS))
    script = script_from_capture(shared_file(CAPTURE_WS))
    # 808 BTC/ETH options, ticker + book each, + 4 per-currency channels: then play the script
    async with FakeDeribitServer(
        instruments=instruments, script=script, start_when=lambda c: len(c.subscribed) == 1620
    ) as server:
        yield server


async def test_happy_path_real_capture(capture_server: FakeDeribitServer) -> None:
    """Listing, subscriptions and the real 2021 ticker/book frames, end to end."""
    server = capture_server
    recorded: list[tuple[str, int]] = []
    feed = make_feed(
        server, book_channels=True, on_frame=lambda text, ns: recorded.append((text, ns))
    )
    n_script_tickers = sum(1 for f in server.script if f.channel.startswith("ticker."))
    assert n_script_tickers == 89
    async with Run(feed) as run:
        await run.wait(lambda: len(run.of(Quote)) >= n_script_tickers)
        conn = await connection(server)
        await server.wait_until(lambda: conn.script_frames == 135, WAIT)
        await run.wait(lambda: len(recorded) == len(server.connections[0].sent))
    conn = server.connections[0]
    # the requests, in Deribit's shapes
    assert conn.methods()[:2] == ["public/set_heartbeat", "public/subscribe"]
    assert conn.heartbeat_interval == 10.0
    listings = [r["params"] for r in conn.requests if r["method"] == "public/get_instruments"]
    assert listings == [
        {"currency": "BTC", "kind": "option", "expired": False},
        {"currency": "ETH", "kind": "option", "expired": False},
    ]
    # the options listed, read from the capture independently
    expected: set[str] = set()
    with shared_file(CAPTURE_INSTRUMENTS).open() as fh:
        for line in fh:
            head, _, body = line.partition(": ")
            if "get_instruments" in head:
                for inst in json.loads(body)["result"]:
                    if inst["kind"] == "option" and inst["base_currency"] in ("BTC", "ETH"):
                        expected.add(inst["instrument_name"])
    assert len(expected) == 808
    assert {e.instrument.name for e in run.of(InstrumentListed)} == expected
    assert feed.instruments == expected
    # every channel asked for exactly once, and all accepted
    wanted = {ch for n in expected for ch in instrument_channels(n, book=True)}
    wanted |= set(static_channels(["BTC", "ETH"]))
    assert set(conn.subscribe_counts) == wanted
    assert set(conn.subscribe_counts.values()) == {1}
    assert conn.subscribed == wanted and feed.subscriptions.active == wanted
    assert max(len(r["params"]["channels"]) for r in conn.requests if r["method"] == SUBSCRIBE) <= (
        feed.batch_size
    )
    # the recorder saw exactly what the server sent, in order, before parsing
    assert [text for text, _ in recorded] == conn.sent
    assert all(b >= a for (_, a), (_, b) in itertools.pairwise(recorded))
    # quotes match the ticker frames sent, one for one, in order
    sent = ticker_frames(conn.sent)
    quotes = run.of(Quote)
    assert len(sent) == len(quotes) == n_script_tickers
    for q, d in zip(quotes, sent, strict=True):
        assert (q.venue, q.instrument, q.ts_ms) == ("deribit", d["instrument_name"], d["timestamp"])
        assert same(q.bid, side(d["best_bid_price"])) and same(q.ask, side(d["best_ask_price"]))
        assert same(q.mark_iv, d["mark_iv"] / 100) and q.forward == d["underlying_price"]
        assert q.mark_price == d["mark_price"]
    # book snapshots with both sides give their best levels
    tops = run.of(BookTop)
    assert tops
    for f in conn.notifications:
        params = json.loads(f)["params"]
        data = params["data"]
        if params["channel"].startswith("book.") and data["type"] == "snapshot":
            if not (data["bids"] and data["asks"]):
                continue
            best_bid = max(level[1] for level in data["bids"])
            best_ask = min(level[1] for level in data["asks"])
            assert any(
                t.instrument == data["instrument_name"] and t.bid == best_bid and t.ask == best_ask
                for t in tops
            )
    assert run.states() == ["connected"]
    assert feed.stats().parse_errors == 0 and parser_drops(feed._parser) == 0


async def test_test_request_is_answered() -> None:
    async with FakeDeribitServer(
        instruments=synthetic(), test_request_every_s=2 * TICK, close_unanswered=True
    ) as server:
        feed = make_feed(server)
        async with Run(feed) as run:
            conn = await connection(server)
            await server.wait_until(lambda: conn.test_requests_answered >= 3, WAIT)
            await server.send_test_request()
            await server.wait_until(lambda: conn.test_requests_answered >= 4, WAIT)
            await run.wait(lambda: sum(e.test_request for e in run.of(Heartbeat)) >= 4)
        assert conn.closed_by_server == "" and len(server.connections) == 1
        assert conn.methods().count("public/test") >= 4
        assert feed.test_requests_answered >= 4


async def test_unanswered_test_request_closes_the_fake() -> None:
    """The fake's check bites: a client that never answers is closed, like on Deribit."""
    async with FakeDeribitServer(
        instruments=synthetic(), test_request_every_s=TICK, close_unanswered=True
    ) as server:
        async with asyncio.timeout(WAIT):
            from websockets.asyncio.client import connect

            async with connect(server.url, proxy=None) as ws:
                with contextlib.suppress(Exception):
                    while True:
                        await ws.recv()
        assert server.connections[0].closed_by_server == "unanswered test_request"
        assert server.connections[0].test_requests_answered == 0


async def test_drop_reconnects_and_subscribes_each_channel_once_per_session() -> None:
    instruments = synthetic()
    script = synthetic_script(instruments, rounds=20)
    async with FakeDeribitServer(
        instruments=instruments, script=script, drop_after_frames=5
    ) as server:
        feed = make_feed(server)
        async with Run(feed) as run:
            second = await connection(server, 1)
            await server.wait_until(lambda: second.script_frames >= 10, WAIT)
            await run.wait(lambda: len(run.of(Quote)) >= 15)
        first, second = server.connections[:2]
        assert first.closed_by_server == "drop" and first.script_frames == 5
        wanted = {ticker_channel(str(i["instrument_name"])) for i in instruments}
        wanted |= set(static_channels(["BTC", "ETH"]))
        for conn in (first, second):
            assert set(conn.subscribe_counts) == wanted
            assert set(conn.subscribe_counts.values()) == {1}
        assert run.states()[:3] == ["connected", "disconnected", "connected"]
        assert feed.sessions == 2
        assert (
            len(feed.delays) == 1 and feed.delays[0] <= feed.backoff.initial
        )  # reset: it streamed
        # quotes from both sessions, in the order sent
        sent = ticker_frames(first.sent) + ticker_frames(second.sent)
        got = [(q.instrument, q.ts_ms) for q in run.of(Quote)]
        assert got == [(d["instrument_name"], d["timestamp"]) for d in sent][: len(got)]


async def test_stall_is_detected_and_the_feed_reconnects() -> None:
    instruments = synthetic()
    async with FakeDeribitServer(
        instruments=instruments,
        script=synthetic_script(instruments, rounds=5),
        stall_after_frames=3,
    ) as server:
        dead_after = 6 * TICK
        feed = make_feed(server, dead_after_s=dead_after)
        loop = asyncio.get_running_loop()
        async with Run(feed) as run:
            first = await connection(server)
            await server.wait_until(lambda: first.stalled, WAIT)
            stalled_at = loop.time()
            await run.wait(lambda: "stale" in run.states())
            stale_after = loop.time() - stalled_at
            await connection(server, 1)
            await run.wait(lambda: run.states().count("connected") == 2)
        assert run.states()[:4] == ["connected", "stale", "disconnected", "connected"]
        # the stalled socket stayed open: only the silence ended the session, after dead_after
        assert server.connections[0].closed_by_server == ""
        assert dead_after * 0.9 <= stale_after <= dead_after + 10 * TICK
        assert feed.stale == 1


async def test_garbage_frames_are_counted_and_skipped() -> None:
    instruments = synthetic()
    garbage = ["not json at all", "{", '{"jsonrpc":"2.0","method":"subscription","params":{}}']
    async with FakeDeribitServer(
        instruments=instruments,
        script=synthetic_script(instruments),
        garbage_frames=garbage,
        start_when=lambda c: len(c.subscribed) == 14,
    ) as server:
        feed = make_feed(server)
        async with Run(feed) as run:
            await run.wait(lambda: len(run.of(Quote)) == len(server.script))
        dropped = parser_drops(feed._parser) + feed.parse_errors
        assert dropped == len(garbage)
        assert run.states() == ["connected"] and len(server.connections) == 1


async def test_subscribe_batches_respect_the_server_limit() -> None:
    instruments = synthetic(n_btc=30)  # 40 options: 44 channels with the per-currency ones
    async with FakeDeribitServer(instruments=instruments, max_channels=7) as server:
        feed = make_feed(server, batch_size=7)
        async with Run(feed) as run:
            await run.wait(lambda: len(feed.subscriptions.active) == 44)
        conn = server.connections[0]
        sizes = [len(r["params"]["channels"]) for r in conn.requests if r["method"] == SUBSCRIBE]
        assert max(sizes) <= 7 and sum(sizes) == 44
        assert conn.refused_requests == 0 and feed.subscribe_errors == 0
        assert set(conn.subscribe_counts.values()) == {1}


@pytest.mark.parametrize("with_id", [False, True])
async def test_too_large_subscribe_is_split_and_retried(with_id: bool) -> None:
    """A list over the server's limit is refused with -32600 (without an id, like Deribit);
    the feed halves its batch for the session and asks again, nothing lost."""
    instruments = synthetic(n_btc=30)
    async with FakeDeribitServer(
        instruments=instruments, max_channels=7, refusal_with_id=with_id
    ) as server:
        feed = make_feed(server, batch_size=25)
        async with Run(feed) as run:
            await run.wait(lambda: len(feed.subscriptions.active) == 44)
        conn = server.connections[0]
        assert conn.refused_requests >= 1 and feed.subscribe_errors == conn.refused_requests
        assert conn.subscribed == feed.subscriptions.active
        assert run.states() == ["connected"]
        errors = [e for e in run.events if getattr(e, "error_code", 0) == INVALID_REQUEST]
        assert len(errors) == conn.refused_requests


async def test_server_closing_at_once_only_makes_the_feed_retry() -> None:
    """A server that accepts the websocket and closes it straight away (maintenance, a
    proxy): every session ends, none kills the feed, the backoff keeps growing."""
    from websockets.asyncio.server import ServerConnection, serve

    async def close_now(ws: ServerConnection) -> None:
        await ws.close(1012, "service restart")

    delays: list[float] = []

    async def no_sleep(d: float) -> None:
        delays.append(d)
        await asyncio.sleep(0)

    async with serve(close_now, "127.0.0.1", 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        feed = DeribitFeed(
            url=f"ws://127.0.0.1:{port}",
            parser=make_parser(),
            backoff_initial=1.0,
            backoff_max=4.0,
            backoff_jitter=0.0,
            sleep=no_sleep,
            proxy=None,
        )
        async with Run(feed) as run:
            await run.wait(lambda: feed.sessions >= 5)
    assert run.states()[:4] == ["connected", "disconnected"] * 2
    assert delays[:4] == [1.0, 2.0, 4.0, 4.0]  # nothing streamed: no reset


async def test_reconnect_backoff_grows_capped_and_resets() -> None:
    """Nothing listens: delays grow by the factor up to the cap (jitter within bounds)."""
    delays: list[float] = []

    async def no_sleep(d: float) -> None:
        delays.append(d)
        await asyncio.sleep(0)

    async with FakeDeribitServer(instruments=synthetic()) as server:
        url = server.url
    feed = DeribitFeed(
        url=url,
        parser=make_parser(),
        backoff_initial=1.0,
        backoff_max=8.0,
        backoff_jitter=0.25,
        sleep=no_sleep,
        proxy=None,
        rng=random.Random(3),
    )
    async with Run(feed):
        while len(delays) < 7:
            await asyncio.sleep(TICK / 5)
    for d, base in zip(delays, [1, 2, 4, 8, 8, 8, 8], strict=False):
        assert 0.75 * base <= d <= base
    assert feed.sessions == 0


async def test_backoff_resets_after_a_session_that_streamed() -> None:
    delays: list[float] = []

    async def short_sleep(d: float) -> None:
        delays.append(d)
        await asyncio.sleep(TICK / 10)

    instruments = synthetic()
    async with FakeDeribitServer(
        instruments=instruments,
        script=synthetic_script(instruments),
        drop_after_frames=2,
        faulty_connections=None,
    ) as server:
        feed = make_feed(server, backoff_initial=1.0, backoff_max=8.0, sleep=short_sleep)
        async with Run(feed):
            await connection(server, 4)
    # every session streamed two frames before the drop: every wait is the initial one
    assert len(delays) >= 4
    assert all(0.5 <= d <= 1.0 for d in delays)


async def test_new_listing_is_subscribed_and_settlement_unsubscribed() -> None:
    instruments = synthetic()
    async with FakeDeribitServer(instruments=instruments, script=[]) as server:
        feed = make_feed(server)
        async with Run(feed) as run:
            await run.wait(lambda: len(feed.subscriptions.active) == 14)
            new_name = "BTC-3JAN31-99000-C"
            new = dict(instruments[0]) | {"instrument_name": new_name, "strike": 99_000.0}
            assert await server.list_instrument(new) == 1
            conn = await connection(server)
            await server.wait_until(
                lambda: conn.subscribe_counts["ticker.BTC-3JAN31-99000-C.100ms"] == 1, WAIT
            )
            await run.wait(lambda: ticker_channel(new_name) in feed.subscriptions.active)
            assert await server.settle_instrument("BTC-3JAN31-40000-P") == 1
            await server.wait_until(
                lambda: conn.unsubscribe_counts["ticker.BTC-3JAN31-40000-P.100ms"] == 1, WAIT
            )
            await run.wait(lambda: bool(run.of(InstrumentExpired)))
        listed = [e.instrument.name for e in run.of(InstrumentListed)]
        assert listed.count("BTC-3JAN31-99000-C") == 1
        assert [e.name for e in run.of(InstrumentExpired)] == ["BTC-3JAN31-40000-P"]
        assert "BTC-3JAN31-40000-P" not in feed.instruments
        assert "ticker.BTC-3JAN31-40000-P.100ms" not in conn.subscribed
        assert set(conn.subscribe_counts.values()) == {1}


async def test_options_gone_while_disconnected_are_expired_not_resubscribed() -> None:
    instruments = synthetic()
    gone = "ETH-3JAN31-2000-P"
    async with FakeDeribitServer(instruments=instruments, script=[]) as server:
        feed = make_feed(server)
        async with Run(feed) as run:
            first = await connection(server)
            await run.wait(lambda: len(feed.subscriptions.active) == 14)
            del server.instruments[gone]  # settled while we were away: no notification seen
            await server.drop_all()
            second = await connection(server, 1)
            await run.wait(lambda: bool(run.of(InstrumentExpired)))
            await run.wait(lambda: len(feed.subscriptions.active) == 13)
        assert first.subscribe_counts[ticker_channel(gone)] == 1
        assert ticker_channel(gone) not in second.subscribe_counts
        assert set(second.subscribe_counts.values()) == {1}
        assert [e.name for e in run.of(InstrumentExpired)] == [gone]
        assert gone not in feed.instruments and len(feed.instruments) == 9


def _book(name: str, kind: str, change_id: int, prev: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": kind,
        "timestamp": 1_700_000_000_000 + change_id,
        "instrument_name": name,
        "change_id": change_id,
        "bids": [["new", 0.05, 10.0]] if kind == "snapshot" else [["change", 0.05, 11.0]],
        "asks": [["new", 0.06, 12.0]] if kind == "snapshot" else [],
    }
    if prev is not None:
        data["prev_change_id"] = prev
    return data


async def test_book_gap_resubscribes_only_that_instrument() -> None:
    instruments = synthetic()
    a, b = "BTC-3JAN31-40000-C", "BTC-3JAN31-50000-C"
    script = [
        ScriptFrame(f"book.{a}", _book(a, "snapshot", 100)),
        ScriptFrame(f"book.{b}", _book(b, "snapshot", 200)),
        ScriptFrame(f"book.{a}", _book(a, "change", 101, 100)),
        ScriptFrame(f"book.{b}", _book(b, "change", 201, 200)),
    ]
    async with FakeDeribitServer(
        instruments=instruments, script=script, start_when=lambda c: len(c.subscribed) == 24
    ) as server:
        feed = make_feed(server, book_channels=True)
        async with Run(feed) as run:
            conn0 = await connection(server)
            await server.wait_until(lambda: conn0.script_frames == 4, WAIT)
            await run.wait(lambda: len(run.of(BookTop)) >= 2)
            # a change whose prev_change_id is not the last change_id: a gap on a only
            await server.push(f"book.{a}", _book(a, "change", 150, 140))
            await server.wait_until(lambda: conn0.subscribe_counts[f"book.{a}.100ms"] == 2, WAIT)
            await run.wait(lambda: any(e.state == "resubscribe" for e in run.of(FeedStatus)))
            # the fresh snapshot then lets the book go on without another gap
            await server.push(f"book.{a}", _book(a, "change", 151, 150))
            await run.wait(lambda: sum(t.instrument == a for t in run.of(BookTop)) >= 3)
        counts = conn0.subscribe_counts
        assert {ch for ch, n in counts.items() if n != 1} == {f"book.{a}.100ms"}
        assert dict(conn0.unsubscribe_counts) == {f"book.{a}.100ms": 1}
        gaps = [e for e in run.of(FeedStatus) if e.state == "gap"]
        resubs = [e for e in run.of(FeedStatus) if e.state == "resubscribe"]
        assert [e.instrument for e in gaps] == [a] and [e.instrument for e in resubs] == [a]
        assert feed.resubscribes == 1 and len(server.connections) == 1


async def test_rate_limit_ends_the_session_with_a_longer_backoff() -> None:
    delays: list[float] = []

    async def short_sleep(d: float) -> None:
        delays.append(d)
        await asyncio.sleep(TICK / 10)

    instruments = synthetic()
    # set_heartbeat, subscribe, get_instruments BTC pass; get_instruments ETH gets 10028
    async with FakeDeribitServer(
        instruments=instruments,
        script=synthetic_script(instruments),
        rate_limit_after_requests=3,
        start_when=lambda c: len(c.subscribed) == 14,
    ) as server:
        feed = make_feed(server, backoff_initial=0.01, rate_limit_backoff_s=5.0, sleep=short_sleep)
        async with Run(feed) as run:
            await connection(server, 1)
            await run.wait(lambda: len(run.of(Quote)) == len(server.script))
        first = server.connections[0]
        assert first.rate_limited_requests >= 1
        assert run.states() == ["connected", "disconnected", "connected"]
        assert feed.rate_limited == 1
        assert delays == [5.0]  # at least rate_limit_backoff_s, where the backoff said 0.01
        status = [e for e in run.of(FeedStatus) if e.state == "disconnected"]
        assert "10028" in status[0].detail
