"""Options feeds of OKX, Bybit, Binance (and Deribit) through ccxt.pro, as normalized events.

ccxt is an optional extra (``pip install 'streamer[ccxt]'``) imported only when a real exchange
is made; the mapping of its dicts to our events is pure (``streamer.feeds.ccxt.mapping``).

``CcxtFeed(exchange_id, underlyings)`` loads the markets, keeps the options of the configured
underlyings, emits an ``InstrumentListed`` per option, then loops ``watch_tickers`` and yields a
``Quote`` per ticker update. Where the venue's tickers carry no IVs (OKX) it also polls
``fetch_all_greeks`` every ``greeks_interval_s`` and merges the latest of both into each quote.
Markets are reloaded every ``reload_markets_s`` (new listings -> ``InstrumentListed``, gone ->
``InstrumentExpired``). Errors that retrying can fix (network, timeouts, exchange unavailable,
rate limits, a silent stream for ``stale_after_s``) close the exchange, yield
``FeedStatus(disconnected)`` and reconnect after a capped exponential delay with jitter (Brooker,
"Exponential Backoff And Jitter", AWS Architecture Blog, 2015), reset once data flows again;
others (authentication, unknown symbol, unsupported method) raise ``FeedError``. ``retry_on``
replaces that decision (a failed greeks poll is logged and skipped, the stream goes on).
Every ``load_markets``, ``watch_tickers`` and ``fetch_all_greeks`` result becomes a frame
(``streamer.feeds.ccxt.frames``: JSON, recorded by ``on_frame`` like a websocket frame) and
the events come from that frame through ``CcxtFrames``, the same code a replay of the
recording runs.
For Deribit prefer the native ``streamer.feeds.deribit`` adapter: ccxt subscribes every ticker
channel in one request, which Deribit refuses for large chains. ``FakeCcxtExchange``
(``streamer.feeds.ccxt.fake``) is the
in-package test double: it replays recorded market, ticker and greeks dicts, and raises what it
is told to.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from streamer.backoff import Backoff
from streamer.errors import FeedError, InputError
from streamer.events import (
    Event,
    FeedStatus,
    Quote,
)
from streamer.feeds.base import Feed
from streamer.feeds.ccxt.frames import (
    CcxtFrames,
    encode,
    greeks_frame,
    markets_frame,
    tickers_frame,
)
from streamer.feeds.ccxt.mapping import TICK_SIZE, venue_of

log = structlog.get_logger(__name__)

DEFAULT_BACKOFF_INITIAL_S = 1.0
DEFAULT_BACKOFF_MAX_S = 60.0
DEFAULT_BACKOFF_FACTOR = 2.0
DEFAULT_STALE_AFTER_S = 120.0
DEFAULT_RELOAD_MARKETS_S = 3600.0
DEFAULT_GREEKS_INTERVAL_S = 15.0
KEPT_DELAYS = 100  # reconnect delays kept in ``CcxtFeed.delays``

# venues whose tickers carry no IVs: poll fetch_all_greeks (with these params per underlying)
GREEKS_POLLED: dict[str, Callable[[str], dict[str, str]]] = {
    "okx": lambda underlying: {"instFamily": f"{underlying}-USD"},
}


def _no_params(underlying: str) -> dict[str, str]:
    return {}


# ccxt error classes (by name, so ccxt need not be imported) that retrying cannot fix
FATAL_ERRORS = frozenset(
    {
        "AuthenticationError",
        "PermissionDenied",
        "AccountNotEnabled",
        "AccountSuspended",
        "BadSymbol",
        "NotSupported",
        "ArgumentsRequired",
    }
)

# -- the exchange plug point (its fake: streamer.feeds.ccxt.fake) --------------------------


class ExchangeLike(Protocol):
    """What ``CcxtFeed`` uses of a ccxt.pro exchange (``FakeCcxtExchange`` has the same)."""

    id: str
    has: Mapping[str, Any]
    precisionMode: int

    async def load_markets(self, reload: bool = False) -> Mapping[str, Mapping[str, Any]]: ...

    async def watch_tickers(
        self, symbols: list[str] | None = None, params: Mapping[str, Any] | None = None
    ) -> Mapping[str, Mapping[str, Any]]: ...

    async def close(self) -> None: ...


def ccxt_exchange_factory(
    exchange_id: str, underlyings: Sequence[str], config: Mapping[str, Any] | None = None
) -> Callable[[], ExchangeLike]:
    """A factory of real ``ccxt.pro`` exchanges set up to load option markets only."""

    def make() -> ExchangeLike:
        try:
            import ccxt.pro as ccxtpro
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise FeedError("ccxt is not installed: pip install 'streamer[ccxt]'") from exc
        cls = getattr(ccxtpro, exchange_id, None)
        if cls is None:
            raise InputError("exchange_id", f"ccxt.pro has no exchange {exchange_id!r}")
        options: dict[str, Any] = {"fetchMarkets": {"types": ["option"]}}
        if exchange_id == "bybit":
            options["fetchMarkets"]["options"] = list(underlyings)
        settings: dict[str, Any] = {"enableRateLimit": True, "newUpdates": True}
        settings.update(config or {})
        settings["options"] = {**options, **dict(settings.get("options") or {})}
        exchange: ExchangeLike = cls(settings)
        return exchange

    return make


# -- the adapter ----------------------------------------------------------------------------


def default_retry_on(exc: BaseException) -> bool:
    """Retry anything but ccxt's configuration errors (``FATAL_ERRORS``, by class name, MRO
    included) and our own ``InputError``/``FeedError``."""
    if isinstance(exc, InputError | FeedError):
        return False
    return not any(cls.__name__ in FATAL_ERRORS for cls in type(exc).__mro__)


class _StaleError(Exception):
    """No ticker for ``stale_after_s``: treat the stream as dead and reconnect."""


class CcxtFeed(Feed):
    """Options of ``underlyings`` on one ccxt.pro exchange as an async stream of events.

    Args:
        exchange_id: ccxt id (``okx``, ``bybit``, ``binance``, ``deribit``); also the venue.
        underlyings: base currencies to follow (``("BTC", "ETH")``).
        exchange_factory: makes the exchange object (default: a real ccxt.pro exchange,
            ``ccxt_exchange_factory``); called again after each failure.
        config: extra ccxt constructor settings for the default factory.
        greeks_interval_s: seconds between ``fetch_all_greeks`` polls; None polls only on
            venues whose tickers lack IVs (OKX, ``GREEKS_POLLED``) at 15 s; 0 disables.
        stale_after_s: no ticker for this long counts as a dead stream (reconnect).
        reload_markets_s: how often markets are reloaded to find listings and expiries.
        backoff_initial, backoff_max, backoff_factor: reconnect delays (capped exponential,
            equal jitter), reset after a session in which tickers arrived.
        retry_on: is this exception worth a reconnect (default ``default_retry_on``)?
        sleep: the backoff sleep (``asyncio.sleep``; tests inject).
        clock_ns: receive-time clock (``time.time_ns``).
        rng: jitter source.
        on_frame: called with each frame's JSON text and receive time (the recorder); the
            events are then made from that very text (``streamer.feeds.ccxt.frames``).
    """

    def __init__(
        self,
        exchange_id: str,
        underlyings: Iterable[str],
        *,
        exchange_factory: Callable[[], ExchangeLike] | None = None,
        config: Mapping[str, Any] | None = None,
        greeks_interval_s: float | None = None,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        reload_markets_s: float = DEFAULT_RELOAD_MARKETS_S,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL_S,
        backoff_max: float = DEFAULT_BACKOFF_MAX_S,
        backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
        retry_on: Callable[[BaseException], bool] = default_retry_on,
        sleep: Callable[[float], Any] = asyncio.sleep,
        clock_ns: Callable[[], int] = time.time_ns,
        rng: random.Random | None = None,
        on_frame: Callable[[str, int], None] | None = None,
    ) -> None:
        self.exchange_id = exchange_id
        self.venue = venue_of(exchange_id)
        self.underlyings = tuple(u.upper() for u in underlyings)
        if not self.underlyings:
            raise InputError("underlyings", "at least one underlying is needed")
        if not backoff_initial > 0 or not backoff_max >= backoff_initial or backoff_factor < 1:
            raise InputError("backoff", "need 0 < initial <= max and factor >= 1")
        if not stale_after_s > 0:
            raise InputError("stale_after_s", f"must be positive: {stale_after_s}")
        self._factory = exchange_factory or ccxt_exchange_factory(
            exchange_id, self.underlyings, config
        )
        if greeks_interval_s is None:
            greeks_interval_s = DEFAULT_GREEKS_INTERVAL_S if self.venue in GREEKS_POLLED else 0.0
        self.greeks_interval_s = greeks_interval_s
        self.stale_after_s = stale_after_s
        self.reload_markets_s = reload_markets_s
        self.retry_on = retry_on
        self._sleep = sleep
        self._clock_ns = clock_ns
        self._backoff = Backoff(
            backoff_initial, backoff_max, backoff_factor, 0.5, rng or random.Random()
        )  # "equal jitter": each delay in [d/2, d]
        self._exchange: ExchangeLike | None = None
        self._on_frame = on_frame
        self.frames = CcxtFrames(self.venue, self.underlyings)  # markets, tickers, greeks
        self.delays: list[float] = []  # the last KEPT_DELAYS backoff delays (metrics, tests)
        self.connected = False

    async def events(self) -> AsyncGenerator[Event, None]:
        """Listings, quotes and feed status, forever (reconnecting); ``FeedError`` on a fault
        retrying cannot fix."""
        try:
            while True:
                streamed = False
                try:
                    exchange = self._exchange = self._factory()
                    async for event in self._session(exchange):
                        if isinstance(event, Quote) and not streamed:
                            streamed = True
                            self._backoff.reset()
                        yield event
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not self.retry_on(exc):
                        await self._close_exchange()
                        if isinstance(exc, FeedError | InputError):
                            raise
                        raise FeedError(f"{self.exchange_id}: {type(exc).__name__}: {exc}") from exc
                    was_connected = self.connected
                    self.connected = False
                    await self._close_exchange()
                    detail = f"{type(exc).__name__}: {exc}"
                    log.warning(
                        "ccxt_feed_error",
                        venue=self.venue,
                        error=detail,
                        was_connected=was_connected,
                    )
                    yield FeedStatus(self.venue, "disconnected", self._clock_ns(), detail)
                delay = self._backoff.next_delay()
                self.delays.append(delay)
                del self.delays[:-KEPT_DELAYS]  # bounded: an exchange down for days
                await self._sleep(delay)
        finally:
            self.connected = False
            await self._close_exchange()

    async def aclose(self) -> None:
        """Close the exchange (``events`` does this too when its generator is closed)."""
        self.connected = False
        await self._close_exchange()

    # -- one session ------------------------------------------------------------------------

    async def _close_exchange(self) -> None:
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            try:
                await exchange.close()
            except Exception as exc:
                log.info("ccxt_feed_close_failed", venue=self.venue, error=repr(exc))

    def _frame(self, frame: Mapping[str, Any], recv_ns: int) -> list[Event]:
        """The events of one frame; while recording, of the text the recorder got."""
        if self._on_frame is not None:
            text = encode(frame)
            self._on_frame(text, recv_ns)
            return self.frames.parse(text, recv_ns)
        return self.frames.apply(frame, recv_ns)

    async def _load(self, exchange: ExchangeLike, reload: bool) -> list[Event]:
        markets = await exchange.load_markets(reload)
        mode = getattr(exchange, "precisionMode", TICK_SIZE)
        frame = markets_frame(self.exchange_id, self.underlyings, markets, int(mode))
        return self._frame(frame, self._clock_ns())  # no option markets: FeedError, fatal

    async def _poll_greeks(self, exchange: ExchangeLike) -> list[Event]:
        fetch = getattr(exchange, "fetch_all_greeks", None)
        if fetch is None or not exchange.has.get("fetchAllGreeks"):
            return []
        params_of = GREEKS_POLLED.get(self.venue, _no_params)
        out: list[Event] = []
        for underlying in self.underlyings:
            try:
                result = await fetch(None, params_of(underlying))
            except Exception as exc:  # a failed poll must not tear down the ticker stream
                if not self.retry_on(exc):
                    raise
                log.warning("ccxt_greeks_poll_failed", venue=self.venue, error=repr(exc))
                continue
            out.extend(self._frame(greeks_frame(result), self._clock_ns()))
        return out

    async def _session(self, exchange: ExchangeLike) -> AsyncIterator[Event]:
        for event in await self._load(exchange, reload=True):
            yield event
        self.connected = True
        yield FeedStatus(self.venue, "connected", self._clock_ns(), self.exchange_id)
        loaded_at = time.monotonic()
        greeks_due = 0.0
        while True:
            now = time.monotonic()
            if now - loaded_at >= self.reload_markets_s:
                loaded_at = now
                for event in await self._load(exchange, reload=True):
                    yield event
            if self.greeks_interval_s > 0 and now >= greeks_due:
                greeks_due = now + self.greeks_interval_s
                for event in await self._poll_greeks(exchange):
                    yield event
            symbols = sorted(self.frames.selected)
            try:
                async with asyncio.timeout(self.stale_after_s):
                    tickers = await exchange.watch_tickers(symbols)
            except TimeoutError:
                raise _StaleError(f"no ticker for {self.stale_after_s} s") from None
            for event in self._frame(tickers_frame(tickers), self._clock_ns()):
                yield event
