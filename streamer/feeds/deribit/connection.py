"""Live Deribit options feed: the JSON-RPC v2 websocket API, reconnecting, in one async iterator.

Protocol (Deribit API v2 docs, "JSON-RPC over websocket", "Subscriptions", "Rate limits";
DESIGN.md section 2). Each session:

1. connect (websockets >= 13 ``websockets.asyncio.client.connect``);
2. ``public/set_heartbeat {interval}`` (Deribit refuses intervals under 10 s); every
   ``{"method": "heartbeat", "params": {"type": "test_request"}}`` is answered with
   ``public/test`` straight away, or Deribit closes the connection;
3. ``public/subscribe`` to ``instrument.state.option.{CUR}`` (listings and expiries) and
   ``deribit_price_index.{cur}_usd``, then ``public/get_instruments {currency, kind: "option",
   expired: false}`` per currency;
4. when a currency's listing arrives: ``ticker.{inst}.100ms`` (and ``book.{inst}.100ms`` with
   ``book_channels``) for each option, in batches (Deribit refuses a too large request with
   -32600 "request entity too large", without an id; users report 250 channels a request to
   pass, tmatic-trading/crypto-platform#439; we default to 100 and a byte cap). The subscribe
   result lists the channels accepted; a channel is asked for at most once per session
   (``Subscriptions``);
5. then follow the stream: ``instrument.state`` created/started -> subscribe the new option,
   settled/closed -> unsubscribe and forget it; a book ``change_id`` gap reported by the parser ->
   unsubscribe + subscribe only that instrument's book channel (Deribit then sends a fresh
   snapshot); JSON-RPC error 10028 ``too_many_requests`` ends the session and the next connect
   waits at least ``rate_limit_backoff_s``.

A session ends when the socket closes, when no frame arrived for ``dead_after_s`` (found with
a timeout around ``recv``, like python-websockets' keepalive: with a 10 s heartbeat a
healthy connection is never silent that long; ``_Silence``, one timer a session rather than
one a frame), or on 10028. Reconnects wait a capped,
jittered exponential delay (``Backoff``; Brooker, "Exponential Backoff And Jitter", AWS
Architecture Blog, 2015) that resets after a session that worked: market data flowed, or frames
kept coming for at least ``dead_after_s`` (a quiet market through a fused parser yields no
events for tickers that only refresh their times).

The parser (``DeribitParser``, or anything with the ``FrameParser`` shape: the daemon
passes the book's fused path) is pure; this module only moves frames and keeps the
subscription state. Every raw
frame goes to ``on_frame(text, recv_ns)`` (the recorder) before it is parsed.

Frame size: a frame over ``max_frame_bytes`` is dropped before the recorder and the parser
see it (never decoded), counted in ``drops["too_large"]`` and in the parser's own ``drops``
(``DeribitParser.too_large``; reached through a fused path's ``parser``), so the daemon's
metrics show it with the parser's other reasons. The websocket library's own ``max_size``
is set to twice that: a bigger message makes ``websockets`` close the connection (1009,
"message too big") before it is ever buffered whole, which ends the session (counted as
``too_large`` too) and reconnects. Protocol
decisions live in small pure helpers (request builders, ``batch_channels``, ``Backoff``,
``Subscriptions``) that the tests drive without sockets.

Use::

    feed = DeribitFeed(url=..., currencies=("BTC", "ETH"), parser=DeribitParser())
    async with contextlib.aclosing(feed.events()) as events:
        async for event in events:
            ...

The consumer must not block for long between events: protocol replies (``public/test``,
resubscriptions) are sent from inside the iterator, before the events of the frame that
triggered them are yielded.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from streamer.backoff import (
    DEFAULT_BACKOFF_FACTOR,
    DEFAULT_BACKOFF_INITIAL_S,
    DEFAULT_BACKOFF_JITTER,
    DEFAULT_BACKOFF_MAX_S,
    Backoff,
)
from streamer.errors import FeedError, InputError, ParseError
from streamer.events import (
    BookChanged,
    BookTop,
    Event,
    FeedStatus,
    Heartbeat,
    IndexPrice,
    InstrumentExpired,
    InstrumentListed,
    MarkPrice,
    Quote,
    RpcResponse,
    Trade,
)
from streamer.feeds.base import Feed, FrameParser
from streamer.feeds.deribit.parser import DEFAULT_MAX_FRAME_BYTES, frame_too_large
from streamer.feeds.deribit.protocol import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_INTERVAL,
    DEFAULT_MAX_REQUEST_BYTES,
    GET_INSTRUMENTS,
    INVALID_REQUEST,
    MIN_HEARTBEAT_S,
    SET_HEARTBEAT,
    SUBSCRIBE,
    TEST,
    TOO_MANY_REQUESTS,
    UNSUBSCRIBE,
    VENUE,
    Subscriptions,
    batch_channels,
    book_channel,
    currency_of,
    instrument_channels,
    rpc_request,
    static_channels,
)

log = structlog.get_logger(__name__)

# what makes a session count as having worked (the backoff resets after it); BookChanged is
# what a fused parser (the daemon's) returns for a ticker it wrote straight into a book row
_MARKET_DATA = (Quote, BookTop, IndexPrice, MarkPrice, Trade, BookChanged)
DEFAULT_OPEN_TIMEOUT_S = 10.0
MESSAGE_TOO_BIG = 1009  # the websocket close code for a message over max_size (RFC 6455)
DELAYS_KEPT = 1_000  # reconnect delays remembered (a ring: memory stays bounded)
DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_DEAD_AFTER_S = 30.0
DEFAULT_RATE_LIMIT_BACKOFF_S = 10.0  # after 10028 wait at least this long
DEFAULT_URL = "wss://www.deribit.com/ws/api/v2"


# -- the feed ----------------------------------------------------------------------------------


class _EndSessionError(Exception):
    """Internal: the current session must end (``reason`` says why)."""

    def __init__(self, reason: str, *, rate_limited: bool = False, stale: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rate_limited = rate_limited
        self.stale = stale


@dataclass
class _Session:
    """Per-connection state."""

    number: int
    batch_size: int
    listings: dict[int, str] = field(default_factory=dict)  # get_instruments id -> currency
    requests: dict[int, str] = field(default_factory=dict)  # other request ids -> method
    streamed: bool = False  # market data arrived: the session worked (reset the backoff)
    started: float = 0.0  # loop time of the connect
    frames_at_start: int = 0  # the feed's frame count then
    dirty: bool = True  # wanted channels may be missing: plan subscriptions
    end: _EndSessionError | None = None  # set: end the session after this frame's events


class _Silence:
    """``asyncio.timeout(after)`` around every ``recv`` of a session, for two stores a frame.

    ``asyncio.timeout`` costs a timer handle, a heap push and a cancel per ``recv`` (~5 µs,
    more than the fused parse of the frame). Here one timer checks, every ``after`` seconds
    or when due, whether the task has been waiting in ``recv`` (``start``..``stop``) that long,
    and then cancels it, exactly as ``asyncio.timeout`` does (cancel, then ``uncancel`` on the
    way out, and a cancellation from anyone else still propagates). websockets' ``recv`` is
    safe to cancel: no message is lost.
    """

    __slots__ = ("after", "cancelling", "fired", "handle", "loop", "since", "task")

    def __init__(self, after: float) -> None:
        self.after = after
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Task[object] | None = None  # the task waiting in recv
        self.since = 0.0  # when that wait began (loop time)
        self.handle: asyncio.TimerHandle | None = None
        self.fired = False  # cancelled the waiting task
        self.cancelling = 0  # its cancel requests before that

    def start(self, task: asyncio.Task[object]) -> None:
        self.since = self.loop.time()
        self.task = task
        if self.handle is None:
            self.handle = self.loop.call_at(self.since + self.after, self._check)

    def stop(self, task: asyncio.Task[object]) -> None:
        """``recv`` returned (or raised something else): as ``asyncio.timeout``'s exit, an
        expiry that came too late is withdrawn."""
        self.task = None
        if self.fired:
            self.fired = False
            task.uncancel()

    def expired(self, task: asyncio.Task[object]) -> bool:
        """``recv`` was cancelled: by this watch (True, and the cancel is withdrawn) or by
        someone else (False: let the CancelledError go on)."""
        self.task = None
        if not self.fired:
            return False
        self.fired = False
        return task.uncancel() <= self.cancelling

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _check(self) -> None:
        self.handle = None
        task = self.task
        if task is None:  # not waiting now: the next start arms the timer again
            return
        due = self.since + self.after
        if self.loop.time() < due:
            self.handle = self.loop.call_at(due, self._check)
            return
        self.fired = True
        self.cancelling = task.cancelling()
        task.cancel()


@dataclass(frozen=True, slots=True)
class DeribitStats:
    """Counters for metrics."""

    sessions: int
    frames: int
    parse_errors: int
    rpc_errors: int
    subscribe_errors: int
    refused_channels: int
    test_requests_answered: int
    stale: int
    resubscribes: int
    rate_limited: int
    active_channels: int
    instruments: int
    drops: dict[str, int] = field(default_factory=dict)


class DeribitFeed(Feed):
    """Deribit options over the websocket API, as one endless stream of normalized events.

    Args:
        url: the websocket endpoint (``wss://www.deribit.com/ws/api/v2``; test.deribit.com
            for the testnet; the fake server's ``url`` in tests).
        currencies: ``get_instruments`` currencies, e.g. ``("BTC", "ETH")`` (``"USDC"`` lists
            the linear options).
        parser: turns one frame into events (``DeribitParser()``); the feed owns it.
        book_channels: also follow ``book.{inst}.100ms`` (best bid/ask with sizes, gap checks).
        heartbeat_s: the ``public/set_heartbeat`` interval, >= 10 s.
        dead_after_s: no frame for this long -> the connection is dead: close and reconnect.
        batch_size: channels per subscribe request (halved for the session on a -32600 reply).
        max_request_bytes: and at most about this many bytes of channel names per request.
        max_frame_bytes: a longer frame is dropped and counted, never decoded (module
            docstring); the websocket library refuses messages over twice this.
        interval: the ticker/book interval suffix (``100ms``; ``raw`` needs authentication).
        backoff_initial, backoff_max, backoff_factor, backoff_jitter: reconnect delays
            (``Backoff``); reset after a session that worked (module docstring).
        rate_limit_backoff_s: after error 10028 the next connect waits at least this long.
        open_timeout_s: websocket opening handshake timeout.
        proxy: passed to ``websockets`` (True: the environment's proxy settings; None: direct).
        on_frame: called with every raw frame text and its receive time before parsing (the
            recorder); it must be quick.
        clock_ns: the receive-time clock (ns since the epoch); a hook for tests.
        sleep: the backoff sleep (``asyncio.sleep``); a hook for tests.
        rng: the jitter's random source (seed it for reproducible delays).
        venue: the ``venue`` field of the FeedStatus events this feed makes.
    """

    def __init__(
        self,
        *,
        url: str = DEFAULT_URL,
        currencies: Sequence[str] = ("BTC",),
        parser: FrameParser,
        book_channels: bool = False,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        dead_after_s: float = DEFAULT_DEAD_AFTER_S,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        interval: str = DEFAULT_INTERVAL,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL_S,
        backoff_max: float = DEFAULT_BACKOFF_MAX_S,
        backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
        backoff_jitter: float = DEFAULT_BACKOFF_JITTER,
        rate_limit_backoff_s: float = DEFAULT_RATE_LIMIT_BACKOFF_S,
        open_timeout_s: float = DEFAULT_OPEN_TIMEOUT_S,
        proxy: str | Literal[True] | None = True,
        on_frame: Callable[[str, int], None] | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        venue: str = VENUE,
    ) -> None:
        if not url.startswith(("ws://", "wss://")):
            raise InputError("url", f"not a websocket URL: {url!r}")
        if isinstance(currencies, str) or not currencies:
            raise InputError("currencies", f"need a non-empty sequence, got {currencies!r}")
        if not heartbeat_s >= MIN_HEARTBEAT_S:
            raise InputError(
                "heartbeat_s", f"Deribit needs >= {MIN_HEARTBEAT_S}, got {heartbeat_s}"
            )
        if not dead_after_s > 0:
            raise InputError("dead_after_s", f"must be > 0, got {dead_after_s}")
        if batch_size < 1:
            raise InputError("batch_size", f"must be >= 1, got {batch_size}")
        if max_request_bytes < 64:
            raise InputError("max_request_bytes", f"must be >= 64, got {max_request_bytes}")
        if max_frame_bytes < 1024:
            raise InputError("max_frame_bytes", f"must be >= 1024, got {max_frame_bytes}")
        if not rate_limit_backoff_s >= 0:
            raise InputError("rate_limit_backoff_s", f"must be >= 0, got {rate_limit_backoff_s}")
        self.url = url
        self.currencies = tuple(c.upper() for c in currencies)
        self.book_channels = book_channels
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.batch_size = batch_size
        self.max_request_bytes = max_request_bytes
        self.max_frame_bytes = max_frame_bytes
        self.interval = interval
        self.rate_limit_backoff_s = rate_limit_backoff_s
        self.open_timeout_s = open_timeout_s
        self.venue = venue
        self.backoff = Backoff(
            backoff_initial, backoff_max, backoff_factor, backoff_jitter, rng or random.Random()
        )
        self.subscriptions = Subscriptions()
        self._parser = parser
        self._proxy = proxy
        self._on_frame = on_frame
        self._clock_ns = clock_ns
        self._sleep = sleep
        self._next_id = 0
        self._instruments: dict[str, str] = {}  # option name -> listing currency
        self.connected = False
        # the reconnect delays chosen, newest last (metrics, tests; the latest DELAYS_KEPT)
        self.delays: deque[float] = deque(maxlen=DELAYS_KEPT)
        self.drops: Counter[str] = Counter()  # frames dropped here, before parsing, by reason
        self.sessions = 0
        self.frames = 0
        self.parse_errors = 0
        self.rpc_errors = 0
        self.subscribe_errors = 0
        self.refused_channels = 0
        self.test_requests_answered = 0
        self.stale = 0
        self.resubscribes = 0
        self.rate_limited = 0

    def __repr__(self) -> str:
        return f"DeribitFeed({self.url}, {','.join(self.currencies)})"

    @property
    def instruments(self) -> frozenset[str]:
        """The options followed now."""
        return frozenset(self._instruments)

    def stats(self) -> DeribitStats:
        return DeribitStats(
            sessions=self.sessions,
            frames=self.frames,
            parse_errors=self.parse_errors,
            rpc_errors=self.rpc_errors,
            subscribe_errors=self.subscribe_errors,
            refused_channels=self.refused_channels,
            test_requests_answered=self.test_requests_answered,
            stale=self.stale,
            resubscribes=self.resubscribes,
            rate_limited=self.rate_limited,
            active_channels=len(self.subscriptions.active),
            instruments=len(self._instruments),
            drops=dict(self.drops),
        )

    # -- the stream -------------------------------------------------------------------------

    async def events(self) -> AsyncGenerator[Event, None]:
        """Every parsed event, plus FeedStatus connected/stale/disconnected; never ends by
        itself (close it with ``aclose``, e.g. through ``contextlib.aclosing``)."""
        first = True
        while True:
            if not first:
                delay = self.delays[-1]
                log.info("deribit.reconnect_wait", delay_s=round(delay, 3), url=self.url)
                await self._sleep(delay)
            first = False
            session = _Session(number=self.sessions + 1, batch_size=self.batch_size)
            reason, rate_limited, stale = "", False, False
            try:
                ws = await connect(
                    self.url,
                    open_timeout=self.open_timeout_s,
                    max_size=2 * self.max_frame_bytes,
                    ping_interval=None,  # dead peers: dead_after_s around recv (heartbeats)
                    close_timeout=1.0,
                    proxy=self._proxy,
                )
            except InvalidURI as exc:
                raise FeedError(f"deribit: bad url {self.url!r}") from exc
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                reason = f"connect failed: {type(exc).__name__}: {exc}"
                log.warning("deribit.connect_failed", url=self.url, error=str(exc))
            else:
                try:
                    self.sessions += 1
                    self.connected = True
                    session.started = asyncio.get_running_loop().time()
                    session.frames_at_start = self.frames
                    log.info("deribit.connected", url=self.url, session=session.number)
                    yield FeedStatus(self.venue, "connected", self._clock_ns(), self.url)
                    silence = _Silence(self.dead_after_s)
                    try:
                        await self._open_session(ws, session)
                        while session.end is None:
                            for event in await self._next_events(ws, session, silence):
                                yield event
                        raise session.end
                    except _EndSessionError as end:
                        reason, rate_limited, stale = end.reason, end.rate_limited, end.stale
                    except ConnectionClosed as exc:  # while sending the session's first requests
                        reason = f"connection closed: {exc}"
                    finally:
                        silence.close()
                    if stale:
                        yield FeedStatus(self.venue, "stale", self._clock_ns(), reason)
                finally:
                    self.connected = False
                    await ws.close()
                log.info(
                    "deribit.disconnected",
                    reason=reason,
                    session=session.number,
                    streamed=session.streamed,
                )
                yield FeedStatus(self.venue, "disconnected", self._clock_ns(), reason)
            self.delays.append(self._next_delay(self._worked(session), rate_limited))

    def _worked(self, session: _Session) -> bool:
        """Did the session work (the backoff resets)? Market data arrived, or frames kept
        coming for at least ``dead_after_s``: in a quiet market a fused parser turns tickers
        that only refresh their times into no events at all."""
        if session.streamed:
            return True
        lived = asyncio.get_running_loop().time() - session.started
        return self.frames > session.frames_at_start and lived >= self.dead_after_s

    def _next_delay(self, streamed: bool, rate_limited: bool) -> float:
        """The wait before the next connect: backoff (reset after a session that worked),
        at least ``rate_limit_backoff_s`` after a 10028."""
        if streamed and not rate_limited:
            self.backoff.reset()
        delay = self.backoff.next_delay()
        if rate_limited:
            delay = max(delay, self.rate_limit_backoff_s)
        return delay

    # -- one session ------------------------------------------------------------------------

    async def _open_session(self, ws: ClientConnection, session: _Session) -> None:
        """Heartbeat, the per-currency channels, then a listing per currency."""
        self.subscriptions.new_session()
        reset = getattr(self._parser, "reset", None)  # DeribitParser: forget book levels
        if callable(reset):
            reset()
        # instrument channels come back with this session's listings
        self.subscriptions.wanted = set(static_channels(self.currencies))
        await self._request(ws, session, SET_HEARTBEAT, {"interval": self.heartbeat_s})
        await self._flush_subscriptions(ws, session)
        for cur in self.currencies:
            rid = await self._request(
                ws, session, GET_INSTRUMENTS, {"currency": cur, "kind": "option", "expired": False}
            )
            session.listings[rid] = cur

    async def _next_events(
        self, ws: ClientConnection, session: _Session, silence: _Silence
    ) -> Sequence[Event]:
        """Wait for one frame (at most ``dead_after_s``), react to it, return its events."""
        task = asyncio.current_task()
        assert task is not None
        silence.start(task)
        try:
            frame = await ws.recv()
        except asyncio.CancelledError:
            if not silence.expired(task):
                raise
            self.stale += 1
            log.warning("deribit.stale", silent_s=self.dead_after_s, session=session.number)
            raise _EndSessionError(f"no frame for {self.dead_after_s} s", stale=True) from None
        except ConnectionClosed as exc:
            silence.stop(task)
            sent = exc.sent
            if sent is not None and sent.code == MESSAGE_TOO_BIG:  # over 2 x max_frame_bytes
                self._drop_frame(2 * self.max_frame_bytes + 1, "")
            raise _EndSessionError(f"connection closed: {exc}") from None
        except BaseException:
            silence.stop(task)
            raise
        silence.stop(task)
        recv_ns = self._clock_ns()
        self.frames += 1
        size = frame_too_large(frame, self.max_frame_bytes)
        if size:
            self._drop_frame(size, frame)
            return []
        if self._on_frame is not None:
            text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
            self._on_frame(text, recv_ns)
        try:
            events = self._parser.parse(frame, recv_ns)
        except ParseError as exc:
            self.parse_errors += 1
            log.debug("deribit.parse_error", reason=exc.reason, detail=exc.detail)
            return []
        if len(events) == 1 and type(events[0]) is BookChanged and not session.dirty:
            # a ticker the fused path wrote: market data, nothing for the protocol to do
            # (what _react would conclude, without its two passes and an await per frame)
            session.streamed = True
            return events
        try:
            extra = await self._react(ws, session, events, recv_ns)
        except ConnectionClosed as exc:
            raise _EndSessionError(f"connection closed while sending: {exc}") from None
        return [*events, *extra] if extra else events

    def _drop_frame(self, size: int, frame: str | bytes) -> None:
        """A frame over ``max_frame_bytes``: counted here and in the parser's drops."""
        self.drops["too_large"] += 1
        parser = getattr(self._parser, "parser", self._parser)  # a fused path wraps one
        count = getattr(parser, "too_large", None)
        if callable(count):
            count(size, frame[:160], self.max_frame_bytes)
        else:
            log.warning("deribit.frame_too_large", size=size, limit=self.max_frame_bytes)

    async def _react(
        self, ws: ClientConnection, session: _Session, events: Sequence[Event], recv_ns: int
    ) -> list[Event]:
        """The protocol side of one frame's events; returns events the feed adds."""
        extra: list[Event] = []
        listing: str | None = None
        end: _EndSessionError | None = None
        for ev in events:
            if isinstance(ev, Heartbeat):
                if ev.test_request:
                    await self._request(ws, session, TEST, {})
                    self.test_requests_answered += 1
            elif isinstance(ev, RpcResponse):
                cur, stop = self._on_response(session, ev)
                listing = cur or listing
                end = end or stop
            elif isinstance(ev, _MARKET_DATA):
                session.streamed = True
        for ev in events:  # listings after the replies: a listing frame says which currency
            if isinstance(ev, InstrumentListed):
                self._on_listed(session, ev)
            elif isinstance(ev, InstrumentExpired):
                await self._on_expired(ws, session, ev.name)
            elif (
                isinstance(ev, FeedStatus)
                and ev.state == "gap"
                and ev.instrument
                and await self._resubscribe_book(ws, session, ev.instrument)
            ):
                extra.append(
                    FeedStatus(self.venue, "resubscribe", recv_ns, "book gap", ev.instrument)
                )
        if listing is not None:
            extra.extend(self._delisted(listing, events, recv_ns))
        if end is not None:  # yield this frame's events first, then end the session
            session.end = end
            return extra
        if session.dirty:
            await self._flush_subscriptions(ws, session)
        return extra

    def _on_response(
        self, session: _Session, ev: RpcResponse
    ) -> tuple[str | None, _EndSessionError | None]:
        """Match a reply to its request. Returns (the currency whose listing this is, a reason
        to end the session)."""
        rid = ev.id
        subs = self.subscriptions
        if ev.error_code:
            self.rpc_errors += 1
        if ev.error_code == TOO_MANY_REQUESTS:
            self.rate_limited += 1
            log.warning("deribit.rate_limited", id=rid, message=ev.error_message)
            return None, _EndSessionError("rate limited (10028)", rate_limited=True)
        if rid is None and ev.error_code == INVALID_REQUEST:
            # Deribit answers "request entity too large" without an id; replies come in
            # request order, so it is the oldest subscribe still unanswered.
            rid = subs.oldest(SUBSCRIBE)
        if rid is not None and subs.is_tracked(rid):
            if ev.error_code:
                retry = ev.error_code == INVALID_REQUEST and session.batch_size > 1
                out = subs.on_error(rid, retry=retry)
                if out is not None and out.method == SUBSCRIBE:
                    self.subscribe_errors += 1
                    if retry:
                        session.batch_size = max(1, min(session.batch_size, len(out.channels) // 2))
                        session.dirty = True
                    else:
                        self.refused_channels += len(out.channels)
                log.warning(
                    "deribit.subscribe_error",
                    code=ev.error_code,
                    message=ev.error_message,
                    channels=len(out.channels) if out else 0,
                    retry=retry,
                    batch_size=session.batch_size,
                )
                return None, None
            out = subs.on_result(rid, ev.result)
            if out is not None and out.refused:
                self.refused_channels += len(out.refused)
                log.warning("deribit.channels_refused", n=len(out.refused), first=out.refused[0])
            return None, None
        if rid is not None and rid in session.listings:
            cur = session.listings.pop(rid)
            if ev.error_code:
                log.warning(
                    "deribit.listing_failed",
                    currency=cur,
                    code=ev.error_code,
                    message=ev.error_message,
                )
                return None, _EndSessionError(f"get_instruments {cur} failed: {ev.error_message}")
            return cur, None
        method = session.requests.pop(rid, "") if rid is not None else ""
        if ev.error_code:
            log.warning(
                "deribit.rpc_error",
                id=rid,
                method=method,
                code=ev.error_code,
                message=ev.error_message,
            )
        return None, None

    def _on_listed(self, session: _Session, ev: InstrumentListed) -> None:
        name = ev.instrument.name
        new = name not in self._instruments
        self._instruments[name] = currency_of(ev.instrument.underlying)
        chans = instrument_channels(name, book=self.book_channels, interval=self.interval)
        if new or not self.subscriptions.wanted.issuperset(chans):
            self.subscriptions.want(chans)
            session.dirty = True

    async def _on_expired(self, ws: ClientConnection, session: _Session, name: str) -> None:
        self._instruments.pop(name, None)
        chans = instrument_channels(name, book=True, interval=self.interval)
        gone = self.subscriptions.unwant(chans)
        if gone:
            log.info("deribit.unsubscribe_expired", instrument=name)
            await self._send_channels(ws, session, UNSUBSCRIBE, gone)

    def _delisted(self, currency: str, events: Sequence[Event], recv_ns: int) -> list[Event]:
        """After a reconnect's listing: options of ``currency`` still followed but no longer
        listed (they expired while we were away) are forgotten, with an InstrumentExpired."""
        listed = {ev.instrument.name for ev in events if isinstance(ev, InstrumentListed)}
        gone = [n for n, c in self._instruments.items() if c == currency and n not in listed]
        out: list[Event] = []
        for name in gone:
            del self._instruments[name]
            self.subscriptions.unwant(instrument_channels(name, book=True, interval=self.interval))
            out.append(InstrumentExpired(self.venue, name, recv_ns // 1_000_000, recv_ns))
        if gone:
            log.info("deribit.delisted", currency=currency, n=len(gone))
        return out

    async def _resubscribe_book(self, ws: ClientConnection, session: _Session, name: str) -> bool:
        """A change_id gap: unsubscribe + subscribe this instrument's book channel only."""
        ch = book_channel(name, self.interval)
        if not self.subscriptions.resubscribe(ch):
            return False
        self.resubscribes += 1
        log.info("deribit.book_resubscribe", instrument=name)
        await self._send_channels(ws, session, UNSUBSCRIBE, [ch])
        await self._send_channels(ws, session, SUBSCRIBE, [ch])
        return True

    async def _flush_subscriptions(self, ws: ClientConnection, session: _Session) -> None:
        """Ask for every wanted channel not subscribed, in batches."""
        session.dirty = False
        missing = self.subscriptions.missing()
        if not missing:
            return
        batches = batch_channels(missing, session.batch_size, self.max_request_bytes)
        log.info(
            "deribit.subscribe", channels=len(missing), batches=len(batches), session=session.number
        )
        for batch in batches:
            await self._send_channels(ws, session, SUBSCRIBE, batch)

    async def _send_channels(
        self, ws: ClientConnection, session: _Session, method: str, channels: Sequence[str]
    ) -> None:
        rid = self._new_id()
        self.subscriptions.sent(rid, method, channels)
        await ws.send(rpc_request(rid, method, {"channels": list(channels)}))

    async def _request(
        self, ws: ClientConnection, session: _Session, method: str, params: Mapping[str, object]
    ) -> int:
        rid = self._new_id()
        if method != GET_INSTRUMENTS:
            session.requests[rid] = method
        await ws.send(rpc_request(rid, method, params))
        return rid

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id
