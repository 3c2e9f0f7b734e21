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

Used by ``streamer.feeds.ccxt.connection.CcxtFeed``; ``streamer.feeds.ccxt.fake`` replays
such dicts without ccxt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from streamer.errors import InputError
from streamer.events import Instrument, Quote
from streamer.instruments import expiry_code_of, parse_option

NAN = math.nan
TICK_SIZE = 4  # ccxt.base.decimal_to_precision.TICK_SIZE (precision values are tick sizes)

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
