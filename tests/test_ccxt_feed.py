"""ccxt adapter, offline: venue payload mapping (hand-written dicts in ccxt's shapes, as
``watch_tickers``/``load_markets``/``fetch_all_greeks`` return them), the adapter over the
in-package fake exchange, reconnects with backoff, and (where ccxt is installed) checks that
the hand-written dicts are what ccxt's own parsers make of the raw venue payloads."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
from typing import Any

import pytest

from streamer.errors import FeedError, InputError
from streamer.events import Event, FeedStatus, InstrumentExpired, InstrumentListed, Quote
from streamer.feeds.ccxt.connection import CcxtFeed, ccxt_exchange_factory, default_retry_on
from streamer.feeds.ccxt.fake import FakeCcxtExchange
from streamer.feeds.ccxt.mapping import (
    instrument_from_market,
    quote_from_ticker,
    select_option_markets,
    venue_of,
)
from streamer.feeds.recordings.reader import read_cryptofeed_capture
from tests.conftest import shared_file

EXPIRY_MS = 1_735_286_400_000  # 2024-12-27 08:00 UTC
RECV_NS = 1_733_011_201_000_000_000

# -- recorded dicts, one option (BTC 27 Dec 2024 100000 call) per venue ------------------------

OKX_MARKET: dict[str, Any] = {
    "id": "BTC-USD-241227-100000-C",
    "symbol": "BTC/USD:BTC-241227-100000-C",
    "base": "BTC",
    "quote": "USD",
    "settle": "BTC",
    "type": "option",
    "spot": False,
    "swap": False,
    "future": False,
    "option": True,
    "active": True,
    "contract": True,
    "linear": False,
    "inverse": True,
    "contractSize": 0.01,
    "expiry": EXPIRY_MS,
    "expiryDatetime": "2024-12-27T08:00:00.000Z",
    "strike": 100000.0,
    "optionType": "call",
    "precision": {"amount": 1.0, "price": 0.0005},
    "info": {
        "ctMult": "1",
        "ctVal": "0.01",
        "ctValCcy": "BTC",
        "expTime": "1735286400000",
        "instFamily": "BTC-USD",
        "instId": "BTC-USD-241227-100000-C",
        "instType": "OPTION",
        "listTime": "1711958400000",
        "lotSz": "1",
        "minSz": "1",
        "optType": "C",
        "settleCcy": "BTC",
        "state": "live",
        "stk": "100000",
        "tickSz": "0.0005",
        "uly": "BTC-USD",
    },
}
OKX_TICKER: dict[str, Any] = {  # the "tickers" channel: no IVs, no Greeks
    "symbol": "BTC/USD:BTC-241227-100000-C",
    "timestamp": 1733011200123,
    "high": 0.052,
    "low": 0.0445,
    "bid": 0.0495,
    "bidVolume": 120.0,
    "ask": 0.0505,
    "askVolume": 355.0,
    "close": 0.0485,
    "last": 0.0485,
    "baseVolume": 1250.0,
    "markPrice": None,
    "indexPrice": None,
    "info": {
        "instType": "OPTION",
        "instId": "BTC-USD-241227-100000-C",
        "last": "0.0485",
        "lastSz": "10",
        "askPx": "0.0505",
        "askSz": "355",
        "bidPx": "0.0495",
        "bidSz": "120",
        "open24h": "0.047",
        "high24h": "0.052",
        "low24h": "0.0445",
        "volCcy24h": "12.5",
        "vol24h": "1250",
        "ts": "1733011200123",
    },
}
OKX_GREEKS: dict[str, Any] = {  # fetch_all_greeks: a /public/opt-summary row
    "symbol": "BTC/USD:BTC-241227-100000-C",
    "timestamp": 1733011200456,
    "delta": 0.3812,
    "gamma": 1.92,
    "theta": -0.00083,
    "vega": 0.00098,
    "rho": None,
    "bidImpliedVolatility": 0.5512,
    "askImpliedVolatility": 0.5621,
    "markImpliedVolatility": 0.5563,
    "underlyingPrice": None,
    "info": {
        "askVol": "0.5621",
        "bidVol": "0.5512",
        "delta": "0.3812",
        "deltaBS": "0.4305",
        "fwdPx": "97250.5",
        "gamma": "1.92",
        "gammaBS": "0.0000201",
        "instId": "BTC-USD-241227-100000-C",
        "instType": "OPTION",
        "lever": "19.6",
        "markVol": "0.5563",
        "realVol": "0",
        "theta": "-0.00083",
        "thetaBS": "-80.21",
        "ts": "1733011200456",
        "uly": "BTC-USD",
        "vega": "0.00098",
        "vegaBS": "95.12",
        "volLv": "0.5571",
    },
}
BYBIT_MARKET: dict[str, Any] = {
    "id": "BTC-27DEC24-100000-C",
    "symbol": "BTC/USD:USDC-241227-100000-C",
    "base": "BTC",
    "quote": "USD",
    "settle": "USDC",
    "type": "option",
    "spot": False,
    "margin": False,
    "swap": False,
    "future": False,
    "option": True,
    "active": True,
    "contract": True,
    "linear": True,
    "inverse": False,
    "contractSize": 1.0,
    "expiry": EXPIRY_MS,
    "strike": 100000.0,
    "optionType": "call",
    "precision": {"amount": 0.01, "price": 5.0},
    "info": {
        "symbol": "BTC-27DEC24-100000-C",
        "optionsType": "Call",
        "status": "Trading",
        "baseCoin": "BTC",
        "quoteCoin": "USD",
        "settleCoin": "USDC",
        "deliveryTime": "1735286400000",
        "priceFilter": {"minPrice": "5", "maxPrice": "10000000", "tickSize": "5"},
        "lotSizeFilter": {"maxOrderQty": "500", "minOrderQty": "0.01", "qtyStep": "0.01"},
    },
}
BYBIT_TICKER: dict[str, Any] = {  # websocket tickers.{symbol}: ccxt's bid/ask stay None
    "symbol": "BTC/USD:USDC-241227-100000-C",
    "timestamp": 1733011200789,
    "high": 5100.0,
    "low": 4400.0,
    "bid": None,
    "bidVolume": 2.5,
    "ask": None,
    "askVolume": 1.2,
    "close": 4850.0,
    "last": 4850.0,
    "baseVolume": 12.3,
    "quoteVolume": 1200000.0,
    "markPrice": 4851.2,
    "indexPrice": 96950.3,
    "info": {
        "symbol": "BTC-27DEC24-100000-C",
        "bidPrice": "4800",
        "bidSize": "2.5",
        "bidIv": "0.5498",
        "askPrice": "4900",
        "askSize": "1.2",
        "askIv": "0.5633",
        "lastPrice": "4850",
        "highPrice24h": "5100",
        "lowPrice24h": "4400",
        "markPrice": "4851.2",
        "indexPrice": "96950.3",
        "markPriceIv": "0.5561",
        "underlyingPrice": "97240.1",
        "openInterest": "152.3",
        "turnover24h": "1200000",
        "volume24h": "12.3",
        "totalVolume": "1500",
        "totalTurnover": "140000000",
        "delta": "0.4301",
        "gamma": "0.00002011",
        "vega": "95.05",
        "theta": "-80.1",
        "predictedDeliveryPrice": "0",
        "change24h": "0.021",
    },
}
BINANCE_MARKET: dict[str, Any] = {
    "id": "BTC-241227-100000-C",
    "symbol": "BTC/USDT:USDT-241227-100000-C",
    "base": "BTC",
    "quote": "USDT",
    "settle": "USDT",
    "type": "option",
    "spot": False,
    "margin": False,
    "swap": False,
    "future": False,
    "option": True,
    "active": None,
    "contract": True,
    "linear": True,
    "inverse": False,
    "contractSize": 1.0,
    "expiry": EXPIRY_MS,
    "strike": 100000,
    "optionType": "call",
    "precision": {"amount": 0.01, "price": 5.0, "base": None, "quote": None},
    "info": {
        "expiryDate": 1735286400000,
        "symbol": "BTC-241227-100000-C",
        "side": "CALL",
        "strikePrice": "100000",
        "underlying": "BTCUSDT",
        "unit": 1,
        "quoteAsset": "USDT",
        "status": "TRADING",
    },
}
BINANCE_TICKER: dict[str, Any] = {  # <symbol>@ticker: ccxt puts the bid/ask IVs in bid/ask
    "symbol": "BTC/USDT:USDT-241227-100000-C",
    "timestamp": 1733011200999,
    "high": 5100.0,
    "low": 4400.0,
    "bid": 0.5505,
    "bidVolume": None,
    "ask": 0.564,
    "askVolume": 59600.0,
    "open": 4700.0,
    "close": 4850.0,
    "last": 4850.0,
    "baseVolume": 95.08,
    "indexPrice": None,
    "markPrice": None,
    "info": {
        "e": "24hrTicker",
        "E": 1733011200999,
        "T": 1733011200990,
        "s": "BTC-241227-100000-C",
        "o": "4700",
        "h": "5100",
        "l": "4400",
        "c": "4850",
        "V": "12.3",
        "A": "59600",
        "P": "0.0319",
        "p": "150",
        "Q": "0.1",
        "F": "1",
        "L": "42",
        "n": 42,
        "bo": "4810",
        "ao": "4905",
        "bq": "3.2",
        "aq": "1.5",
        "b": "0.5505",
        "a": "0.5640",
        "d": "0.43012",
        "t": "-80.15",
        "g": "0.00002009",
        "v": "95.08",
        "vo": "0.5569",
        "mp": "4852.1",
        "hl": "7000",
        "ll": "3000",
        "eep": "0",
    },
}
DERIBIT_MARKET: dict[str, Any] = {
    "id": "BTC-27DEC24-100000-C",
    "symbol": "BTC/USD:BTC-241227-100000-C",
    "base": "BTC",
    "quote": "USD",
    "settle": "BTC",
    "type": "option",
    "option": True,
    "spot": False,
    "margin": False,
    "swap": False,
    "future": False,
    "active": True,
    "contract": True,
    "linear": False,
    "inverse": True,
    "contractSize": 1.0,
    "expiry": EXPIRY_MS,
    "strike": 100000.0,
    "optionType": "call",
    "precision": {"amount": 0.1, "price": 0.0001},
    "info": {
        "tick_size": 0.0001,
        "strike": 100000.0,
        "settlement_currency": "BTC",
        "option_type": "call",
        "min_trade_amount": 0.1,
        "kind": "option",
        "is_active": True,
        "instrument_name": "BTC-27DEC24-100000-C",
        "expiration_timestamp": 1735286400000,
        "contract_size": 1.0,
        "base_currency": "BTC",
    },
}
DERIBIT_TICKER: dict[str, Any] = {
    "symbol": "BTC/USD:BTC-241227-100000-C",
    "timestamp": 1733011200321,
    "high": 0.052,
    "low": 0.0445,
    "bid": 0.0495,
    "bidVolume": 12.5,
    "ask": 0.0505,
    "askVolume": 3.1,
    "close": 0.0485,
    "last": 0.0485,
    "markPrice": 0.04987,
    "indexPrice": 96951.21,
    "info": {
        "timestamp": 1733011200321,
        "stats": {"volume": 45.2, "price_change": 2.1, "low": 0.0445, "high": 0.052},
        "state": "open",
        "settlement_price": 0.0471,
        "open_interest": 1520.3,
        "min_price": 0.0275,
        "max_price": 0.0755,
        "mark_price": 0.04987,
        "mark_iv": 55.62,
        "last_price": 0.0485,
        "interest_rate": 0.0,
        "instrument_name": "BTC-27DEC24-100000-C",
        "index_price": 96951.21,
        "greeks": {"rho": 20.31, "theta": -80.22, "vega": 95.11, "gamma": 2e-05, "delta": 0.43051},
        "estimated_delivery_price": 96951.21,
        "bid_iv": 55.12,
        "best_bid_price": 0.0495,
        "best_bid_amount": 12.5,
        "best_ask_price": 0.0505,
        "best_ask_amount": 3.1,
        "ask_iv": 56.21,
        "underlying_price": 97250.52,
        "underlying_index": "BTC-27DEC24",
    },
}

MARKETS = {
    "okx": OKX_MARKET,
    "bybit": BYBIT_MARKET,
    "binance": BINANCE_MARKET,
    "deribit": DERIBIT_MARKET,
}


def isnan(*xs: float) -> bool:
    return all(math.isnan(x) for x in xs)


# -- markets -> instruments -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("venue", "name", "contract_size", "inverse", "tick"),
    [
        ("okx", "BTC-USD-241227-100000-C", 0.01, True, 0.0005),
        ("bybit", "BTC-27DEC24-100000-C", 1.0, False, 5.0),
        ("binance", "BTC-241227-100000-C", 1.0, False, 5.0),
        ("deribit", "BTC-27DEC24-100000-C", 1.0, True, 0.0001),
    ],
)
def test_instrument_from_market(
    venue: str, name: str, contract_size: float, inverse: bool, tick: float
) -> None:
    inst = instrument_from_market(venue, MARKETS[venue])
    assert inst is not None
    assert (inst.venue, inst.name, inst.underlying) == (venue, name, "BTC")
    assert (inst.expiry, inst.expiry_ms, inst.strike, inst.is_call) == (
        "27DEC24",
        EXPIRY_MS,
        100000.0,
        True,
    )
    assert (inst.contract_size, inst.inverse, inst.tick_size) == (contract_size, inverse, tick)


def test_instrument_edge_cases() -> None:
    put = {**BYBIT_MARKET, "id": "ETH-7FEB25-3250-P", "base": "ETH", "strike": 3250.0}
    put["optionType"] = "put"
    put["expiry"] = 1738915200000  # 2025-02-07 08:00 UTC
    inst = instrument_from_market("bybit", put)
    assert inst is not None
    assert (inst.expiry, inst.is_call, inst.underlying) == ("7FEB25", False, "ETH")
    # not an option, or not enough to price it
    assert instrument_from_market("okx", {**OKX_MARKET, "type": "future", "option": False}) is None
    assert instrument_from_market("okx", {**OKX_MARKET, "expiry": None}) is None
    assert instrument_from_market("okx", {**OKX_MARKET, "optionType": None}) is None
    assert instrument_from_market("okx", {**OKX_MARKET, "strike": "abc"}) is None
    # ccxt's DECIMAL_PLACES precision mode: 4 decimals is a 0.0001 tick
    inst = instrument_from_market(
        "deribit", {**DERIBIT_MARKET, "precision": {"price": 4}}, precision_mode=2
    )
    assert inst is not None and inst.tick_size == pytest.approx(1e-4)
    # Deribit linear USDC options keep the native feed's underlying name
    xrp = {
        **DERIBIT_MARKET,
        "id": "XRP_USDC-24JAN25-0d625-C",
        "base": "XRP",
        "settle": "USDC",
        "strike": 0.625,
        "expiry": 1737705600000,
        "inverse": False,
        "linear": True,
    }
    inst = instrument_from_market("deribit", xrp)
    assert inst is not None
    assert (inst.underlying, inst.strike, inst.expiry, inst.inverse) == (
        "XRP_USDC",
        0.625,
        "24JAN25",
        False,
    )


def test_select_option_markets_filters_underlying_type_and_activity() -> None:
    eth = {**OKX_MARKET, "id": "ETH-USD-241227-4000-P", "symbol": "ETH/USD:ETH-241227-4000-P"}
    eth.update(base="ETH", strike=4000.0, optionType="put")
    future = {**OKX_MARKET, "id": "BTC-USD-241227", "symbol": "BTC/USD:BTC-241227"}
    future.update(type="future", option=False, future=True)
    dead = {**OKX_MARKET, "id": "BTC-USD-241227-90000-C", "symbol": "BTC/USD:BTC-241227-90000-C"}
    dead.update(active=False, strike=90000.0)
    markets = {m["symbol"]: m for m in (OKX_MARKET, eth, future, dead)}
    got = select_option_markets("okx", markets, ["btc"])
    assert list(got) == ["BTC/USD:BTC-241227-100000-C"]
    got = select_option_markets("okx", markets, ["BTC", "ETH"])
    assert sorted(inst.name for _, inst in got.values()) == [
        "BTC-USD-241227-100000-C",
        "ETH-USD-241227-4000-P",
    ]


# -- tickers -> quotes ----------------------------------------------------------------------


def test_deribit_quote_reads_the_raw_ticker() -> None:
    q = quote_from_ticker("deribit", DERIBIT_TICKER, DERIBIT_MARKET, RECV_NS)
    assert (q.venue, q.instrument, q.ts_ms, q.recv_ns) == (
        "deribit",
        "BTC-27DEC24-100000-C",
        1733011200321,
        RECV_NS,
    )
    assert (q.bid, q.bid_size, q.ask, q.ask_size) == (0.0495, 12.5, 0.0505, 3.1)
    assert (q.mark_iv, q.bid_iv, q.ask_iv) == pytest.approx((0.5562, 0.5512, 0.5621))
    assert (q.mark_price, q.forward, q.forward_index, q.index_price) == (
        0.04987,
        97250.52,
        "BTC-27DEC24",
        96951.21,
    )
    assert (q.delta, q.gamma, q.vega, q.theta, q.rho) == (0.43051, 2e-05, 95.11, -80.22, 20.31)
    assert q.open_interest == 1520.3


def test_deribit_zero_price_or_iv_means_no_quote() -> None:
    t = copy.deepcopy(DERIBIT_TICKER)
    t["info"].update(best_bid_price=0.0, best_bid_amount=0.0, bid_iv=0.0, ask_iv=0.0)
    t["bid"] = 0.0
    q = quote_from_ticker("deribit", t, DERIBIT_MARKET, RECV_NS)
    assert isnan(q.bid, q.bid_size, q.bid_iv)
    assert q.ask == 0.0505 and math.isnan(q.ask_iv)  # a price without an IV keeps the price


def test_okx_quote_without_and_with_opt_summary() -> None:
    q = quote_from_ticker("okx", OKX_TICKER, OKX_MARKET, RECV_NS)
    assert q.instrument == "BTC-USD-241227-100000-C"
    assert (q.bid, q.bid_size, q.ask, q.ask_size) == (0.0495, 120.0, 0.0505, 355.0)
    assert q.ts_ms == 1733011200123
    assert isnan(q.mark_iv, q.bid_iv, q.ask_iv, q.forward, q.delta, q.vega, q.open_interest)
    q = quote_from_ticker("okx", OKX_TICKER, OKX_MARKET, RECV_NS, OKX_GREEKS)
    assert (q.mark_iv, q.bid_iv, q.ask_iv) == (0.5563, 0.5512, 0.5621)
    assert q.forward == 97250.5
    # the Black-Scholes Greeks (Deribit's conventions), not OKX's price-adjusted coin ones
    assert (q.delta, q.gamma, q.vega, q.theta) == (0.4305, 0.0000201, 95.12, -80.21)
    assert math.isnan(q.rho)
    assert q.ts_ms == 1733011200456  # the newer of the two
    # a greeks-only quote (no ticker seen yet): marks, no book
    q = quote_from_ticker("okx", {"symbol": OKX_MARKET["symbol"]}, OKX_MARKET, RECV_NS, OKX_GREEKS)
    assert isnan(q.bid, q.ask, q.bid_iv, q.ask_iv)
    assert q.mark_iv == 0.5563


def test_bybit_quote_reads_raw_prices_that_ccxt_leaves_empty() -> None:
    assert BYBIT_TICKER["bid"] is None
    q = quote_from_ticker("bybit", BYBIT_TICKER, BYBIT_MARKET, RECV_NS)
    assert (q.instrument, q.ts_ms) == ("BTC-27DEC24-100000-C", 1733011200789)
    assert (q.bid, q.bid_size, q.ask, q.ask_size) == (4800.0, 2.5, 4900.0, 1.2)
    assert (q.mark_iv, q.bid_iv, q.ask_iv) == (0.5561, 0.5498, 0.5633)
    assert (q.mark_price, q.forward, q.index_price) == (4851.2, 97240.1, 96950.3)
    assert (q.delta, q.gamma, q.vega, q.theta) == (0.4301, 0.00002011, 95.05, -80.1)
    assert q.open_interest == 152.3
    # REST v5 ticker keys (bid1Price, markIv, ...) read the same
    rest_info = {
        "symbol": "BTC-27DEC24-100000-C",
        "bid1Price": "4800",
        "bid1Size": "2.5",
        "bid1Iv": "0.5498",
        "ask1Price": "0",
        "ask1Size": "0",
        "ask1Iv": "0",
        "markIv": "0.5561",
        "underlyingPrice": "97240.1",
    }
    q = quote_from_ticker("bybit", {"timestamp": 1, "info": rest_info}, BYBIT_MARKET, RECV_NS)
    assert (q.bid, q.bid_iv, q.mark_iv, q.forward) == (4800.0, 0.5498, 0.5561, 97240.1)
    assert isnan(q.ask, q.ask_size, q.ask_iv)


def test_binance_quote_ignores_ccxts_clashing_bid_ask() -> None:
    assert BINANCE_TICKER["bid"] == 0.5505  # ccxt's unified bid is the bid IV here
    q = quote_from_ticker("binance", BINANCE_TICKER, BINANCE_MARKET, RECV_NS)
    assert (q.instrument, q.ts_ms) == ("BTC-241227-100000-C", 1733011200999)
    assert (q.bid, q.bid_size, q.ask, q.ask_size) == (4810.0, 3.2, 4905.0, 1.5)
    assert (q.mark_iv, q.bid_iv, q.ask_iv) == (0.5569, 0.5505, 0.564)
    assert q.mark_price == 4852.1
    assert (q.delta, q.gamma, q.vega, q.theta) == (0.43012, 0.00002009, 95.08, -80.15)
    assert isnan(q.forward, q.open_interest, q.rho)
    # a REST-only view: /eapi/v1/mark row as ccxt greeks, ticker without the stream keys
    mark = {
        "symbol": BINANCE_MARKET["symbol"],
        "info": {
            "symbol": "BTC-241227-100000-C",
            "markPrice": "4852",
            "bidIV": "0.55",
            "askIV": "0.5642",
            "markIV": "0.557",
            "delta": "0.43",
            "theta": "-80.1",
            "gamma": "0.00002",
            "vega": "95.1",
        },
    }
    rest = {"symbol": BINANCE_MARKET["symbol"], "bid": 4800.0, "info": {"bidPrice": "4800"}}
    q = quote_from_ticker("binance", rest, BINANCE_MARKET, RECV_NS, mark)
    assert (q.bid, q.bid_iv, q.mark_iv, q.mark_price, q.vega) == (4800.0, 0.55, 0.557, 4852.0, 95.1)
    assert isnan(q.ask, q.ask_iv)  # no ask in that ticker: the side is empty


def test_garbage_fields_become_nan_and_unknown_venue_is_refused() -> None:
    t = copy.deepcopy(BYBIT_TICKER)
    t["info"].update(bidPrice="", askPrice="n/a", markPriceIv="inf", delta=None, gamma=[1])
    t["timestamp"] = None
    q = quote_from_ticker("bybit", t, BYBIT_MARKET, RECV_NS)
    assert isnan(q.bid, q.bid_size, q.ask, q.mark_iv, q.delta, q.gamma)
    assert q.ts_ms == RECV_NS // 1_000_000  # no venue time: the receive time
    with pytest.raises(InputError, match="venue"):
        quote_from_ticker("kraken", t, BYBIT_MARKET, RECV_NS)
    with pytest.raises(InputError, match="exchange_id"):
        venue_of("kraken")


# -- the adapter over the fake exchange -----------------------------------------------------


class NetworkError(Exception):
    """Named like ccxt's retryable error."""


class AuthenticationError(Exception):
    """Named like ccxt's fatal error."""


class BadSymbol(Exception):  # noqa: N818  (ccxt's name)
    """Named like ccxt's fatal error."""


def okx_markets() -> list[dict[str, Any]]:
    eth = {**OKX_MARKET, "id": "ETH-USD-241227-4000-P", "symbol": "ETH/USD:ETH-241227-4000-P"}
    eth.update(base="ETH", strike=4000.0, optionType="put")
    btc2 = {**OKX_MARKET, "id": "BTC-USD-241227-90000-P", "symbol": "BTC/USD:BTC-241227-90000-P"}
    btc2.update(strike=90000.0, optionType="put")
    perp = {"id": "BTC-USD-SWAP", "symbol": "BTC/USD:BTC", "type": "swap", "base": "BTC"}
    return [OKX_MARKET, eth, btc2, perp]


def ticker_for(market: dict[str, Any], bid: str, ts: int) -> dict[str, Any]:
    t = copy.deepcopy(OKX_TICKER)
    t["symbol"] = market["symbol"]
    t["info"].update(instId=market["id"], bidPx=bid, ts=str(ts))
    return t


async def take(feed: CcxtFeed, n: int, timeout: float = 5.0) -> list[Event]:
    out: list[Event] = []
    async with contextlib.aclosing(feed.events()) as events, asyncio.timeout(timeout):
        async for event in events:
            out.append(event)
            if len(out) >= n:
                break
    return out


class Sleeps:
    """Backoff sleep that records and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


async def test_adapter_lists_filters_and_quotes() -> None:
    markets = okx_markets()
    btc, eth, btc2 = markets[0], markets[1], markets[2]
    batch1 = {btc["symbol"]: ticker_for(btc, "0.049", 1733011201000)}
    batch2 = {
        btc2["symbol"]: ticker_for(btc2, "0.02", 1733011202000),
        eth["symbol"]: ticker_for(eth, "0.1", 1733011202000),  # not subscribed: ignored
    }
    greeks = {btc["symbol"]: OKX_GREEKS}
    fake = FakeCcxtExchange("okx", markets, [batch1, batch2], greeks_batches=[greeks])
    feed = CcxtFeed("okx", ["BTC"], exchange_factory=fake.factory, greeks_interval_s=3600)
    events = await take(feed, 6)
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "InstrumentListed",
        "InstrumentListed",
        "FeedStatus",
        "Quote",  # from the greeks poll (no ticker yet)
        "Quote",
        "Quote",
    ]
    listed = sorted(e.instrument.name for e in events if isinstance(e, InstrumentListed))
    assert listed == ["BTC-USD-241227-100000-C", "BTC-USD-241227-90000-P"]
    status = events[2]
    assert isinstance(status, FeedStatus) and status.state == "connected"
    q_greeks, q1, q2 = (e for e in events if isinstance(e, Quote))
    assert isinstance(q_greeks, Quote) and isinstance(q1, Quote) and isinstance(q2, Quote)
    assert math.isnan(q_greeks.bid) and q_greeks.mark_iv == 0.5563
    assert (q1.instrument, q1.bid, q1.mark_iv, q1.forward) == (
        "BTC-USD-241227-100000-C",
        0.049,
        0.5563,  # the polled greeks merged into the ticker's quote
        97250.5,
    )
    assert (q2.instrument, q2.bid) == ("BTC-USD-241227-90000-P", 0.02)
    assert math.isnan(q2.mark_iv)  # no greeks for that one
    assert ("fetch_all_greeks", {"instFamily": "BTC-USD"}) in fake.calls
    watched = [arg for name, arg in fake.calls if name == "watch_tickers"]
    assert watched[0] == ("BTC/USD:BTC-241227-100000-C", "BTC/USD:BTC-241227-90000-P")
    assert fake.closed == 1  # closing the generator closed the exchange


async def test_errors_reconnect_with_backoff_and_status() -> None:
    btc = OKX_MARKET
    batches: list[Any] = [
        {btc["symbol"]: ticker_for(btc, "0.049", 1)},
        NetworkError("socket closed"),
        NetworkError("still down"),
        {btc["symbol"]: ticker_for(btc, "0.050", 2)},
        NetworkError("again"),
        {btc["symbol"]: ticker_for(btc, "0.051", 3)},
    ]
    fake = FakeCcxtExchange("okx", [btc], batches, load_errors=[])
    sleeps = Sleeps()
    feed = CcxtFeed(
        "okx",
        ["BTC"],
        exchange_factory=fake.factory,
        greeks_interval_s=0,
        backoff_initial=1.0,
        backoff_max=3.0,
        sleep=sleeps,
    )
    events = await take(feed, 11)
    summary = [
        (type(e).__name__, getattr(e, "state", None) or getattr(e, "bid", None)) for e in events
    ]
    assert summary == [
        ("InstrumentListed", None),
        ("FeedStatus", "connected"),
        ("Quote", 0.049),
        ("FeedStatus", "disconnected"),
        ("FeedStatus", "connected"),
        ("FeedStatus", "disconnected"),
        ("FeedStatus", "connected"),
        ("Quote", 0.050),
        ("FeedStatus", "disconnected"),
        ("FeedStatus", "connected"),
        ("Quote", 0.051),
    ]
    down = [e for e in events if isinstance(e, FeedStatus) and e.state == "disconnected"]
    assert "NetworkError: socket closed" in down[0].detail
    # equal jitter: the n-th delay since data last flowed lies in [d/2, d], d = 1, 2, 3 (cap)
    d = sleeps.delays
    assert len(d) == 3
    assert 0.5 <= d[0] <= 1.0  # first failure
    assert 1.0 <= d[1] <= 2.0  # second in a row, no data in between
    assert 0.5 <= d[2] <= 1.0  # data flowed again: reset
    assert feed.delays == d
    assert fake.closed >= 4  # after each failure and at the end


async def test_failed_greeks_poll_keeps_the_stream() -> None:
    batches: list[Any] = [{OKX_MARKET["symbol"]: OKX_TICKER}]
    fake = FakeCcxtExchange(
        "okx", [OKX_MARKET], batches, greeks_batches=[NetworkError("opt-summary 502")]
    )
    feed = CcxtFeed("okx", ["BTC"], exchange_factory=fake.factory, greeks_interval_s=3600)
    events = await take(feed, 3)
    assert [type(e).__name__ for e in events] == ["InstrumentListed", "FeedStatus", "Quote"]
    assert ("fetch_all_greeks", {"instFamily": "BTC-USD"}) in fake.calls
    quote = events[2]
    assert isinstance(quote, Quote) and quote.bid == 0.0495 and math.isnan(quote.mark_iv)


async def test_backoff_is_capped() -> None:
    errors: list[Any] = [NetworkError(str(i)) for i in range(8)]
    fake = FakeCcxtExchange("okx", [OKX_MARKET], errors)
    sleeps = Sleeps()
    feed = CcxtFeed(
        "okx",
        ["BTC"],
        exchange_factory=fake.factory,
        greeks_interval_s=0,
        backoff_initial=1.0,
        backoff_max=4.0,
        sleep=sleeps,
    )
    await take(feed, 1 + 2 * 8)
    assert len(sleeps.delays) >= 7
    for delay in sleeps.delays[2:]:
        assert 2.0 <= delay <= 4.0


async def test_load_failure_then_recovery_and_fatal_errors() -> None:
    fake = FakeCcxtExchange(
        "okx",
        [OKX_MARKET],
        [{OKX_MARKET["symbol"]: OKX_TICKER}],
        load_errors=[NetworkError("503 Service Unavailable")],
    )
    sleeps = Sleeps()
    feed = CcxtFeed(
        "okx", ["BTC"], exchange_factory=fake.factory, greeks_interval_s=0, sleep=sleeps
    )
    events = await take(feed, 4)
    assert [type(e).__name__ for e in events] == [
        "FeedStatus",
        "InstrumentListed",
        "FeedStatus",
        "Quote",
    ]
    assert isinstance(events[0], FeedStatus) and events[0].state == "disconnected"
    assert len(sleeps.delays) == 1

    # authentication-like and bad-symbol errors are not retried
    for exc in (AuthenticationError("bad key"), BadSymbol("no such market")):
        fake = FakeCcxtExchange("okx", [OKX_MARKET], [exc])
        feed = CcxtFeed("okx", ["BTC"], exchange_factory=fake.factory, greeks_interval_s=0)
        with pytest.raises(FeedError, match=type(exc).__name__):
            await take(feed, 10)
        assert fake.closed >= 1
    # an exchange without options of the underlyings is a configuration error
    fake = FakeCcxtExchange("okx", [OKX_MARKET], [])
    feed = CcxtFeed("okx", ["DOGE"], exchange_factory=fake.factory, greeks_interval_s=0)
    with pytest.raises(FeedError, match="no option markets"):
        await take(feed, 10)
    assert not default_retry_on(InputError("x", "y"))
    assert default_retry_on(TimeoutError())


async def test_silent_stream_is_stale_and_reconnects() -> None:
    fake = FakeCcxtExchange("okx", [OKX_MARKET], [{OKX_MARKET["symbol"]: OKX_TICKER}])
    sleeps = Sleeps()
    feed = CcxtFeed(
        "okx",
        ["BTC"],
        exchange_factory=fake.factory,
        greeks_interval_s=0,
        stale_after_s=0.05,
        sleep=sleeps,
    )
    events = await take(feed, 5)
    assert [type(e).__name__ for e in events] == [
        "InstrumentListed",
        "FeedStatus",
        "Quote",
        "FeedStatus",
        "FeedStatus",
    ]
    stale = events[3]
    assert isinstance(stale, FeedStatus) and stale.state == "disconnected"
    assert "no ticker" in stale.detail


async def test_market_reload_lists_and_expires() -> None:
    markets = okx_markets()
    btc, btc2 = markets[0], markets[2]
    batches: list[Any] = [{btc["symbol"]: ticker_for(btc, "0.049", i)} for i in range(3)]
    fake = FakeCcxtExchange("okx", [btc, btc2], batches)
    feed = CcxtFeed(
        "okx", ["BTC"], exchange_factory=fake.factory, greeks_interval_s=0, reload_markets_s=0
    )
    seen: list[Event] = []
    async with contextlib.aclosing(feed.events()) as events, asyncio.timeout(5):
        async for event in events:
            seen.append(event)
            if isinstance(event, Quote) and len([e for e in seen if isinstance(e, Quote)]) == 1:
                # the 90000 put expires, a new strike is listed
                del fake.markets[btc2["symbol"]]
                new = {
                    **btc,
                    "id": "BTC-USD-241227-110000-C",
                    "symbol": "BTC/USD:BTC-241227-110000-C",
                }
                new["strike"] = 110000.0
                fake.markets[new["symbol"]] = new
            if isinstance(event, InstrumentListed) and event.instrument.strike == 110000.0:
                break
    expired = [e for e in seen if isinstance(e, InstrumentExpired)]
    assert [(e.venue, e.name) for e in expired] == [("okx", "BTC-USD-241227-90000-P")]
    listed = [e.instrument.name for e in seen if isinstance(e, InstrumentListed)]
    assert listed[-1] == "BTC-USD-241227-110000-C"
    assert len(listed) == len(set(listed)) == 3


def test_bad_adapter_arguments() -> None:
    with pytest.raises(InputError, match="underlyings"):
        CcxtFeed("okx", [])
    with pytest.raises(InputError, match="exchange_id"):
        CcxtFeed("kraken", ["BTC"])
    with pytest.raises(InputError, match="backoff"):
        CcxtFeed("okx", ["BTC"], backoff_initial=0)


# -- real data and the real library (skipped where absent) -----------------------------------


def test_deribit_mapping_on_real_captured_tickers() -> None:
    """The real 2021 capture's ticker payloads, wrapped the way ccxt's deribit wraps them."""
    frames = list(read_cryptofeed_capture(shared_file("raw/cryptofeed-DERIBIT.ws.1.0")))
    n = 0
    for _, _, text in frames:
        msg = json.loads(text)
        channel = msg.get("params", {}).get("channel", "")
        if not channel.startswith("ticker."):
            continue
        data = msg["params"]["data"]
        name = data["instrument_name"]
        market = {"id": name, "type": "option", "base": name.split("-")[0], "inverse": True}
        market.update(strike=float(name.split("-")[2]), expiry=None, optionType=None)
        assert instrument_from_market("deribit", market) is not None
        ticker = {"symbol": name, "timestamp": data["timestamp"], "info": data}
        q = quote_from_ticker("deribit", ticker, market, RECV_NS)
        n += 1
        assert q.ts_ms == data["timestamp"]
        assert q.mark_iv == pytest.approx(data["mark_iv"] / 100)
        assert q.forward == data["underlying_price"]
        assert q.delta == data["greeks"]["delta"]
        for side in ("bid", "ask"):
            price = data[f"best_{side}_price"]
            if price > 0:
                assert getattr(q, side) == price
                assert getattr(q, f"{side}_iv") == pytest.approx(data[f"{side}_iv"] / 100)
            else:
                assert math.isnan(getattr(q, side))
    assert n > 10


def test_hand_written_dicts_match_ccxts_own_parsers() -> None:
    ccxt = pytest.importorskip("ccxt")
    okx = ccxt.okx()
    m = okx.parse_market(OKX_MARKET["info"])
    for key in ("id", "symbol", "base", "settle", "strike", "optionType", "expiry"):
        assert m[key] == OKX_MARKET[key], key
    assert (m["contractSize"], m["inverse"], m["precision"]["price"]) == (0.01, True, 0.0005)
    okx.set_markets([m])
    t = okx.parse_ticker(OKX_TICKER["info"])
    assert (t["symbol"], t["bid"], t["askVolume"]) == (OKX_MARKET["symbol"], 0.0495, 355.0)
    g = okx.parse_greeks(OKX_GREEKS["info"], m)
    assert g["markImpliedVolatility"] == 0.5563 and g["timestamp"] == 1733011200456
    binance = ccxt.binance()
    info = {**BINANCE_MARKET["info"], "filters": [{"filterType": "PRICE_FILTER", "tickSize": "5"}]}
    m = binance.parse_market(info)
    assert (m["id"], m["symbol"], m["strike"], m["expiry"]) == (
        "BTC-241227-100000-C",
        BINANCE_MARKET["symbol"],
        100000,
        EXPIRY_MS,
    )
    bybit = ccxt.bybit()
    bybit.set_markets([BYBIT_MARKET])
    t = bybit.parse_ticker(BYBIT_TICKER["info"])
    assert t["bid"] is None and t["bidVolume"] == 2.5  # why the mapping reads info first
    deribit = ccxt.deribit()
    deribit.set_markets([DERIBIT_MARKET])
    t = deribit.parse_ticker(DERIBIT_TICKER["info"], DERIBIT_MARKET)
    assert (t["bid"], t["ask"], t["markPrice"]) == (0.0495, 0.0505, 0.04987)


async def test_default_factory_builds_a_ccxt_pro_exchange_without_network() -> None:
    pytest.importorskip("ccxt")
    exchange: Any = ccxt_exchange_factory("bybit", ["BTC", "ETH"], {"timeout": 5000})()
    try:
        assert exchange.id == "bybit"
        assert exchange.options["fetchMarkets"]["types"] == ["option"]
        assert exchange.options["fetchMarkets"]["options"] == ["BTC", "ETH"]
        assert exchange.timeout == 5000
        assert exchange.has["watchTickers"]
    finally:
        await exchange.close()
    with pytest.raises(InputError, match="exchange_id"):
        ccxt_exchange_factory("no-such-exchange", ["BTC"])()
