"""Options feeds of OKX, Bybit, Binance (and Deribit) through ccxt.pro, as normalized events.

ccxt is an optional extra (``pip install 'streamer[ccxt]'``) imported only when a real exchange
is made. The mapping from ccxt's dicts to our events is pure and needs no ccxt:

- ``instrument_from_market(venue, market)``: a ccxt unified market (``type: "option"``,
  ``id``, ``base``, ``settle``, ``strike``, ``optionType``, ``expiry`` ms, ``contractSize``,
  ``inverse``, ``precision.price``) -> ``Instrument`` named by the venue's id
  (``BTC-USD-241227-100000-C`` on OKX, ``BTC-27DEC24-100000-C`` on Bybit/Deribit,
  ``BTC-241227-100000-C`` on Binance).
- ``quote_from_ticker(venue, ticker, market, recv_ns, greeks=None)``: a ccxt unified ticker
  (as ``watch_tickers`` returns it) plus, where the venue's ticker lacks them, a ccxt greeks
  structure (``fetch_greeks``/``fetch_all_greeks``) -> ``Quote``.

ccxt's unified ticker has no IVs or Greeks, and for options its unified fields are not always
right, so the venue's raw payload (``ticker["info"]``, ``greeks["info"]``) is read first. Per
venue (``FIELDS`` below lists every key read, first present wins):

- **Deribit** (``info`` = the ``ticker.{inst}.100ms`` data, DESIGN section 2): ``best_bid_price``/
  ``best_bid_amount``/``best_ask_*``, ``mark_price``, ``mark_iv``/``bid_iv``/``ask_iv`` (percent,
  divided by 100), ``underlying_price`` and ``underlying_index`` (forward), ``index_price``,
  ``greeks.{delta,gamma,vega,theta,rho}``, ``open_interest``, ``timestamp``.
- **OKX** (``info`` = the ``tickers`` channel: ``bidPx``/``bidSz``/``askPx``/``askSz``, ``ts``;
  no IVs there). IVs, forward and Greeks come from the ``opt-summary`` row (REST
  ``/api/v5/public/opt-summary``, ccxt ``fetch_all_greeks``): ``markVol``/``bidVol``/``askVol``
  (fractions), ``fwdPx``, and the Black-Scholes Greeks ``deltaBS``, ``gammaBS``, ``vegaBS``,
  ``thetaBS`` (the same conventions as Deribit's: delta N(d1), USD vega and theta). OKX's plain
  ``delta``/``gamma``/``vega``/``theta`` are price-adjusted coin Greeks and are not used.
- **Bybit** (``info`` = the ``tickers.{symbol}`` websocket data, or the REST v5 ticker):
  ``bidPrice``/``bid1Price``, ``bidSize``/``bid1Size``, ``askPrice``/``ask1Price``,
  ``askSize``/``ask1Size``, ``bidIv``/``bid1Iv``, ``askIv``/``ask1Iv``, ``markPriceIv``/``markIv``
  (fractions), ``markPrice``, ``underlyingPrice`` (forward), ``indexPrice``, ``delta``,
  ``gamma``, ``vega``, ``theta``, ``openInterest``. ccxt's unified ``bid``/``ask`` are empty for
  websocket option tickers (it reads ``bid1Price``), hence the raw keys.
- **Binance** (``info`` = the European options ``<symbol>@ticker`` stream): ``bo``/``bq`` and
  ``ao``/``aq`` (best bid/ask price and size), ``b``/``a`` (bid/ask IV), ``vo`` (mark IV), ``mp``
  (mark price), ``d``/``g``/``v``/``t`` (delta, gamma, vega, theta), ``E`` (event time); or the
  REST ``/eapi/v1/mark`` row in ``greeks["info"]``: ``markIV``/``bidIV``/``askIV``,
  ``markPrice``, ``delta``/``gamma``/``vega``/``theta``. ccxt's unified ``bid``/``ask`` of that
  stream are the IVs (its ``b``/``a``), so they are never used. No forward is sent: NaN.

Anything absent, empty, non-numeric or non-finite is NaN; a side whose price is missing or not
positive, or whose size is zero, is empty (price, size and IV NaN); an IV that is not positive
is NaN. Prices stay in the venue's unit (coin on OKX/Deribit, USD(C/T) on Bybit/Binance). The
exact keys were taken from the venues' API documentation as known at the time of writing and
from ccxt's own parsers' sample payloads; a venue renaming a field shows up as NaN, not as an
error.

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
For Deribit prefer the native ``streamer.feeds.deribit`` adapter: ccxt subscribes every ticker
channel in one request, which Deribit refuses for large chains. ``FakeCcxtExchange`` is the
in-package test double: it replays recorded market, ticker and greeks dicts, and raises what it
is told to.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from streamer.backoff import Backoff
from streamer.errors import FeedError, InputError
from streamer.feeds.events import (
    Event,
    FeedStatus,
    Instrument,
    InstrumentExpired,
    InstrumentListed,
    Quote,
)
from streamer.instruments import expiry_code_of, parse_option

log = structlog.get_logger(__name__)

NAN = math.nan
TICK_SIZE = 4  # ccxt.base.decimal_to_precision.TICK_SIZE (precision values are tick sizes)

DEFAULT_BACKOFF_INITIAL_S = 1.0
DEFAULT_BACKOFF_MAX_S = 60.0
DEFAULT_BACKOFF_FACTOR = 2.0
DEFAULT_STALE_AFTER_S = 120.0
DEFAULT_RELOAD_MARKETS_S = 3600.0
DEFAULT_GREEKS_INTERVAL_S = 15.0

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

Source = str  # "info" (ticker["info"]), "ginfo" (greeks["info"]), "ticker", "greeks"
FieldSpec = tuple[tuple[Source, str, float], ...]  # (source, dotted key, scale)


def _spec(*items: tuple[Source, str] | tuple[Source, str, float]) -> FieldSpec:
    return tuple((it[0], it[1], it[2] if len(it) == 3 else 1.0) for it in items)


FIELDS: dict[str, dict[str, FieldSpec]] = {
    "deribit": {
        "bid": _spec(("info", "best_bid_price"), ("ticker", "bid")),
        "bid_size": _spec(("info", "best_bid_amount"), ("ticker", "bidVolume")),
        "ask": _spec(("info", "best_ask_price"), ("ticker", "ask")),
        "ask_size": _spec(("info", "best_ask_amount"), ("ticker", "askVolume")),
        "mark_price": _spec(("info", "mark_price"), ("ticker", "markPrice")),
        "mark_iv": _spec(("info", "mark_iv", 0.01), ("ginfo", "mark_iv", 0.01)),
        "bid_iv": _spec(("info", "bid_iv", 0.01), ("ginfo", "bid_iv", 0.01)),
        "ask_iv": _spec(("info", "ask_iv", 0.01), ("ginfo", "ask_iv", 0.01)),
        "forward": _spec(("info", "underlying_price"), ("ginfo", "underlying_price")),
        "index_price": _spec(("info", "index_price"), ("ticker", "indexPrice")),
        "delta": _spec(("info", "greeks.delta"), ("ginfo", "greeks.delta")),
        "gamma": _spec(("info", "greeks.gamma"), ("ginfo", "greeks.gamma")),
        "vega": _spec(("info", "greeks.vega"), ("ginfo", "greeks.vega")),
        "theta": _spec(("info", "greeks.theta"), ("ginfo", "greeks.theta")),
        "rho": _spec(("info", "greeks.rho"), ("ginfo", "greeks.rho")),
        "open_interest": _spec(("info", "open_interest")),
        "ts_ms": _spec(("info", "timestamp"), ("ticker", "timestamp")),
    },
    "okx": {
        "bid": _spec(("info", "bidPx"), ("ticker", "bid")),
        "bid_size": _spec(("info", "bidSz"), ("ticker", "bidVolume")),
        "ask": _spec(("info", "askPx"), ("ticker", "ask")),
        "ask_size": _spec(("info", "askSz"), ("ticker", "askVolume")),
        "mark_price": _spec(("info", "markPx"), ("ticker", "markPrice")),
        "mark_iv": _spec(("ginfo", "markVol"), ("greeks", "markImpliedVolatility")),
        "bid_iv": _spec(("ginfo", "bidVol"), ("greeks", "bidImpliedVolatility")),
        "ask_iv": _spec(("ginfo", "askVol"), ("greeks", "askImpliedVolatility")),
        "forward": _spec(("ginfo", "fwdPx")),
        "index_price": _spec(("info", "idxPx"), ("ticker", "indexPrice")),
        "delta": _spec(("ginfo", "deltaBS")),
        "gamma": _spec(("ginfo", "gammaBS")),
        "vega": _spec(("ginfo", "vegaBS")),
        "theta": _spec(("ginfo", "thetaBS")),
        "rho": (),
        "open_interest": _spec(("info", "oi")),
        "ts_ms": _spec(("info", "ts"), ("ticker", "timestamp")),
    },
    "bybit": {
        "bid": _spec(("info", "bidPrice"), ("info", "bid1Price"), ("ticker", "bid")),
        "bid_size": _spec(("info", "bidSize"), ("info", "bid1Size"), ("ticker", "bidVolume")),
        "ask": _spec(("info", "askPrice"), ("info", "ask1Price"), ("ticker", "ask")),
        "ask_size": _spec(("info", "askSize"), ("info", "ask1Size"), ("ticker", "askVolume")),
        "mark_price": _spec(("info", "markPrice"), ("ticker", "markPrice")),
        "mark_iv": _spec(
            ("info", "markPriceIv"),
            ("info", "markIv"),
            ("ginfo", "markIv"),
            ("greeks", "markImpliedVolatility"),
        ),
        "bid_iv": _spec(("info", "bidIv"), ("info", "bid1Iv"), ("ginfo", "bid1Iv")),
        "ask_iv": _spec(("info", "askIv"), ("info", "ask1Iv"), ("ginfo", "ask1Iv")),
        "forward": _spec(
            ("info", "underlyingPrice"), ("ginfo", "underlyingPrice"), ("greeks", "underlyingPrice")
        ),
        "index_price": _spec(("info", "indexPrice"), ("ticker", "indexPrice")),
        "delta": _spec(("info", "delta"), ("ginfo", "delta")),
        "gamma": _spec(("info", "gamma"), ("ginfo", "gamma")),
        "vega": _spec(("info", "vega"), ("ginfo", "vega")),
        "theta": _spec(("info", "theta"), ("ginfo", "theta")),
        "rho": (),
        "open_interest": _spec(("info", "openInterest")),
        "ts_ms": _spec(("ticker", "timestamp"), ("info", "ts")),
    },
    "binance": {
        "bid": _spec(("info", "bo"), ("info", "bidPrice")),
        "bid_size": _spec(("info", "bq"), ("info", "bidQty")),
        "ask": _spec(("info", "ao"), ("info", "askPrice")),
        "ask_size": _spec(("info", "aq"), ("info", "askQty")),
        "mark_price": _spec(("info", "mp"), ("ginfo", "markPrice"), ("ticker", "markPrice")),
        "mark_iv": _spec(("info", "vo"), ("ginfo", "markIV"), ("greeks", "markImpliedVolatility")),
        "bid_iv": _spec(("info", "b"), ("ginfo", "bidIV"), ("greeks", "bidImpliedVolatility")),
        "ask_iv": _spec(("info", "a"), ("ginfo", "askIV"), ("greeks", "askImpliedVolatility")),
        "forward": (),
        "index_price": _spec(("ticker", "indexPrice")),
        "delta": _spec(("info", "d"), ("ginfo", "delta")),
        "gamma": _spec(("info", "g"), ("ginfo", "gamma")),
        "vega": _spec(("info", "v"), ("ginfo", "vega")),
        "theta": _spec(("info", "t"), ("ginfo", "theta")),
        "rho": (),
        "open_interest": (),
        "ts_ms": _spec(("info", "E"), ("ticker", "timestamp")),
    },
}

# ccxt exchange ids -> our venue names (and whose FIELDS they use)
VENUE_OF: dict[str, str] = {
    "okx": "okx",
    "bybit": "bybit",
    "binance": "binance",
    "deribit": "deribit",
}


def venue_of(exchange_id: str) -> str:
    """Our venue name for a ccxt exchange id; InputError if it has no mapping."""
    venue = VENUE_OF.get(exchange_id)
    if venue is None:
        raise InputError(
            "exchange_id", f"no option mapping for {exchange_id!r}: {sorted(VENUE_OF)}"
        )
    return venue


# -- pure mapping ---------------------------------------------------------------------------


def _num(value: object) -> float:
    if value is None or isinstance(value, bool):
        return NAN
    if isinstance(value, int | float):
        x = float(value)
    elif isinstance(value, str):
        if not value.strip():
            return NAN
        try:
            x = float(value)
        except ValueError:
            return NAN
    else:
        return NAN
    return x if math.isfinite(x) else NAN


def _get(source: Mapping[str, Any] | None, dotted: str) -> object:
    node: object = source
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _pick(spec: FieldSpec, sources: Mapping[str, Mapping[str, Any] | None]) -> float:
    for source, key, scale in spec:
        x = _num(_get(sources.get(source), key))
        if not math.isnan(x):
            return x * scale
    return NAN


def _positive(x: float) -> float:
    return x if x > 0 else NAN


def is_option_market(market: Mapping[str, Any]) -> bool:
    """A ccxt market that is a single option (``type: "option"`` or ``option: True``)."""
    return market.get("type") == "option" or market.get("option") is True


def instrument_from_market(
    venue: str, market: Mapping[str, Any], *, precision_mode: int = TICK_SIZE
) -> Instrument | None:
    """The ``Instrument`` of a ccxt option market, or None for anything else (or unusable).

    Reads ``id``, ``base``, ``strike``, ``optionType`` (``call``/``put``), ``expiry`` (ms),
    ``contractSize`` (default 1), ``inverse`` and ``precision.price`` (a tick size under ccxt's
    ``TICK_SIZE`` precision mode, a number of decimals otherwise). Deribit names go through
    ``streamer.instruments.parse_option`` so linear USDC options get the same underlying
    (``XRP_USDC``) as the native Deribit feed.
    """
    if not is_option_market(market):
        return None
    name = market.get("id")
    if not isinstance(name, str) or not name:
        return None
    parsed = parse_option(name) if venue == "deribit" else None
    strike = _num(market.get("strike"))
    option_type = str(market.get("optionType") or "").lower()
    expiry_ms_raw = _num(market.get("expiry"))
    if parsed is not None:
        strike = parsed.strike if math.isnan(strike) else strike
        if option_type not in {"call", "put"}:
            option_type = "call" if parsed.is_call else "put"
        if math.isnan(expiry_ms_raw):
            expiry_ms_raw = float(parsed.expiry_ms)
    if not strike > 0 or option_type not in {"call", "put"} or math.isnan(expiry_ms_raw):
        return None
    expiry_ms = int(expiry_ms_raw)
    underlying = parsed.underlying if parsed is not None else str(market.get("base") or "")
    if not underlying:
        return None
    contract_size = _num(market.get("contractSize"))
    precision = market.get("precision")
    tick = _num(precision.get("price")) if isinstance(precision, Mapping) else NAN
    if not math.isnan(tick) and precision_mode != TICK_SIZE:
        tick = 10.0 ** (-tick)
    return Instrument(
        venue=venue,
        name=name,
        underlying=underlying,
        expiry=expiry_code_of(expiry_ms),
        expiry_ms=expiry_ms,
        strike=strike,
        is_call=option_type == "call",
        contract_size=contract_size if contract_size > 0 else 1.0,
        inverse=bool(market.get("inverse")),
        tick_size=tick,
    )


def quote_from_ticker(
    venue: str,
    ticker: Mapping[str, Any],
    market: Mapping[str, Any],
    recv_ns: int,
    greeks: Mapping[str, Any] | None = None,
) -> Quote:
    """A ``Quote`` from a ccxt unified ticker of an option market (see the module docstring
    for the keys read per venue). ``greeks`` is a ccxt greeks structure for the same market
    (its ``info`` the venue's raw row), used where the ticker lacks IVs/Greeks."""
    spec = FIELDS.get(venue)
    if spec is None:
        raise InputError("venue", f"no ticker mapping for {venue!r}: {sorted(FIELDS)}")
    info = ticker.get("info")
    ginfo = greeks.get("info") if greeks is not None else None
    sources: dict[str, Mapping[str, Any] | None] = {
        "info": info if isinstance(info, Mapping) else None,
        "ginfo": ginfo if isinstance(ginfo, Mapping) else None,
        "ticker": ticker,
        "greeks": greeks,
    }
    v = {name: _pick(fs, sources) for name, fs in spec.items()}
    bid, bid_size, bid_iv = v["bid"], v["bid_size"], _positive(v["bid_iv"])
    if not (bid > 0 and bid_size != 0):
        bid, bid_size, bid_iv = NAN, NAN, NAN
    ask, ask_size, ask_iv = v["ask"], v["ask_size"], _positive(v["ask_iv"])
    if not (ask > 0 and ask_size != 0):
        ask, ask_size, ask_iv = NAN, NAN, NAN
    ts = v["ts_ms"]
    greeks_ts = _num(_get(greeks, "timestamp")) if greeks is not None else NAN
    if math.isnan(ts) or (not math.isnan(greeks_ts) and greeks_ts > ts):
        ts = greeks_ts
    ts_ms = int(ts) if not math.isnan(ts) else recv_ns // 1_000_000
    forward_index = ""
    if venue == "deribit" and sources["info"] is not None:
        forward_index = str(sources["info"].get("underlying_index") or "")
    name = market.get("id")
    return Quote(
        venue=venue,
        instrument=name if isinstance(name, str) else str(ticker.get("symbol", "")),
        ts_ms=ts_ms,
        recv_ns=recv_ns,
        bid=bid,
        bid_size=bid_size,
        ask=ask,
        ask_size=ask_size,
        mark_price=v["mark_price"],
        mark_iv=_positive(v["mark_iv"]),
        bid_iv=bid_iv,
        ask_iv=ask_iv,
        forward=_positive(v["forward"]),
        forward_index=forward_index,
        index_price=_positive(v["index_price"]),
        delta=v["delta"],
        gamma=v["gamma"],
        vega=v["vega"],
        theta=v["theta"],
        rho=v["rho"],
        open_interest=v["open_interest"],
    )


def select_option_markets(
    venue: str,
    markets: Mapping[str, Mapping[str, Any]],
    underlyings: Iterable[str],
    *,
    precision_mode: int = TICK_SIZE,
) -> dict[str, tuple[Mapping[str, Any], Instrument]]:
    """ccxt symbol -> (market, Instrument) for the active options of ``underlyings``
    (matched, case-insensitively, against the instrument's underlying or the market's base)."""
    wanted = {u.upper() for u in underlyings}
    out: dict[str, tuple[Mapping[str, Any], Instrument]] = {}
    for symbol, market in markets.items():
        if market.get("active") is False:
            continue
        inst = instrument_from_market(venue, market, precision_mode=precision_mode)
        if inst is None:
            continue
        if inst.underlying.upper() in wanted or str(market.get("base", "")).upper() in wanted:
            out[symbol] = (market, inst)
    return out


# -- the exchange plug point and its fake ---------------------------------------------------


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


class FakeCcxtExchange:
    """A stand-in for a ccxt.pro exchange that replays recorded dicts (no network).

    Args:
        exchange_id: the ccxt id it pretends to be (``okx``, ...).
        markets: ccxt market dicts (keyed by ``symbol`` when given as a list).
        ticker_batches: what successive ``watch_tickers`` calls return, in order: a mapping
            symbol -> ticker dict, or an exception instance to raise from that call. Once used
            up, ``watch_tickers`` waits forever (a quiet market) or raises ``exhausted`` if set.
        greeks_batches: successive ``fetch_all_greeks`` results (symbol -> greeks dict) or
            exceptions; the last one repeats. ``has["fetchAllGreeks"]`` is True when given.
        load_errors: exceptions the first ``load_markets`` calls raise, in order.
        precision_mode: what ``precisionMode`` reports.

    ``calls`` records each method call (name, argument) for the tests; ``closed`` counts
    ``close`` calls. The same batches are shared by every copy made by ``factory``.
    """

    def __init__(
        self,
        exchange_id: str,
        markets: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
        ticker_batches: Iterable[Mapping[str, Mapping[str, Any]] | BaseException] = (),
        *,
        greeks_batches: Sequence[Mapping[str, Mapping[str, Any]] | BaseException] | None = None,
        load_errors: Iterable[BaseException] = (),
        exhausted: BaseException | None = None,
        precision_mode: int = TICK_SIZE,
    ) -> None:
        self.id = exchange_id
        if isinstance(markets, Mapping):
            self.markets: dict[str, Mapping[str, Any]] = dict(markets)
        else:
            self.markets = {str(m["symbol"]): m for m in markets}
        self._batches = list(ticker_batches)
        self._greeks = list(greeks_batches) if greeks_batches is not None else None
        self._load_errors = list(load_errors)
        self._exhausted = exhausted
        self.precisionMode = precision_mode
        self.has: Mapping[str, Any] = {
            "watchTickers": True,
            "fetchAllGreeks": greeks_batches is not None,
        }
        self.calls: list[tuple[str, object]] = []
        self.closed = 0

    def factory(self) -> FakeCcxtExchange:
        """``exchange_factory`` for ``CcxtFeed``: hands out this same object every time."""
        return self

    async def load_markets(self, reload: bool = False) -> Mapping[str, Mapping[str, Any]]:
        self.calls.append(("load_markets", reload))
        await asyncio.sleep(0)
        if self._load_errors:
            raise self._load_errors.pop(0)
        return self.markets

    async def watch_tickers(
        self, symbols: list[str] | None = None, params: Mapping[str, Any] | None = None
    ) -> Mapping[str, Mapping[str, Any]]:
        self.calls.append(("watch_tickers", None if symbols is None else tuple(symbols)))
        await asyncio.sleep(0)
        if not self._batches:
            if self._exhausted is not None:
                raise self._exhausted
            await asyncio.Event().wait()  # a market where nothing happens
        item = self._batches.pop(0)
        if isinstance(item, BaseException):
            raise item
        wanted = None if symbols is None else set(symbols)
        return {s: t for s, t in item.items() if wanted is None or s in wanted}

    async def fetch_all_greeks(
        self, symbols: list[str] | None = None, params: Mapping[str, Any] | None = None
    ) -> Mapping[str, Mapping[str, Any]]:
        self.calls.append(("fetch_all_greeks", dict(params or {})))
        await asyncio.sleep(0)
        if not self._greeks:
            raise FeedError("fetch_all_greeks is not available on this fake")
        item = self._greeks.pop(0) if len(self._greeks) > 1 else self._greeks[0]
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        self.calls.append(("close", None))
        self.closed += 1


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


class CcxtFeed:
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
        self._selected: dict[str, tuple[Mapping[str, Any], Instrument]] = {}
        self._listed: set[str] = set()
        self._tickers: dict[str, Mapping[str, Any]] = {}
        self._greeks: dict[str, Mapping[str, Any]] = {}
        self.delays: list[float] = []  # every backoff delay slept (metrics, tests)
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

    async def _load(self, exchange: ExchangeLike, reload: bool) -> list[Event]:
        markets = await exchange.load_markets(reload)
        mode = getattr(exchange, "precisionMode", TICK_SIZE)
        selected = select_option_markets(
            self.venue, markets, self.underlyings, precision_mode=int(mode)
        )
        if not selected:
            raise FeedError(f"{self.exchange_id}: no option markets for {list(self.underlyings)}")
        now = self._clock_ns()
        events: list[Event] = []
        names = {inst.name for _, inst in selected.values()}
        for gone in sorted(self._listed - names):
            events.append(InstrumentExpired(self.venue, gone, now // 1_000_000, now))
            self._listed.discard(gone)
        for _, inst in selected.values():
            if inst.name not in self._listed:
                self._listed.add(inst.name)
                events.append(InstrumentListed(inst, now))
        for symbol in set(self._tickers) - set(selected):
            del self._tickers[symbol]
        self._selected = selected
        return events

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
            recv_ns = self._clock_ns()
            for symbol, greeks in result.items():
                if symbol not in self._selected:
                    continue
                self._greeks[symbol] = greeks
                market = self._selected[symbol][0]
                ticker = self._tickers.get(symbol, {"symbol": symbol})
                out.append(quote_from_ticker(self.venue, ticker, market, recv_ns, greeks))
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
            symbols = sorted(self._selected)
            try:
                async with asyncio.timeout(self.stale_after_s):
                    tickers = await exchange.watch_tickers(symbols)
            except TimeoutError:
                raise _StaleError(f"no ticker for {self.stale_after_s} s") from None
            recv_ns = self._clock_ns()
            for symbol, ticker in tickers.items():
                entry = self._selected.get(symbol)
                if entry is None:
                    continue
                self._tickers[symbol] = ticker
                yield quote_from_ticker(
                    self.venue, ticker, entry[0], recv_ns, self._greeks.get(symbol)
                )


__all__ = [
    "FIELDS",
    "CcxtFeed",
    "ExchangeLike",
    "FakeCcxtExchange",
    "ccxt_exchange_factory",
    "default_retry_on",
    "instrument_from_market",
    "is_option_market",
    "quote_from_ticker",
    "select_option_markets",
    "venue_of",
]
