"""DeribitParser: the real 2021 capture and get_instruments responses, every channel kind,
book change_id gaps, and garbage that must be counted, never raised.

Expected numbers come from the raw text (plain substring/regex counts), not from the parser.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import orjson
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.book.book import Books
from streamer.book.fastpath import FastPath
from streamer.events import (
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
from streamer.feeds.deribit.parser import DeribitParser
from streamer.instruments import expiry_ms_of
from tests.conftest import shared_file

CAPTURE = "raw/cryptofeed-DERIBIT.ws.1.0"
INSTRUMENTS = "raw/cryptofeed-DERIBIT.0"
_RECEIVED = re.compile(r"^(\d+)\.(\d+): (\{.*)$")


def received(path: Path) -> list[tuple[int, str]]:
    """``(recv_ns, frame)`` of every received frame (``<sec>.<frac>: <frame>`` lines)."""
    out = []
    for line in path.read_text().splitlines():
        m = _RECEIVED.match(line)
        if m:
            out.append((int(m.group(1)) * 10**9 + int(m.group(2).ljust(9, "0")[:9]), m.group(3)))
    return out


def by_type(events: list[Event]) -> Counter[str]:
    return Counter(type(e).__name__ for e in events)


def number(text: str, key: str) -> float:
    """A number field straight from the raw text (first occurrence)."""
    m = re.search(rf'"{key}":(-?[0-9.eE+-]+)', text)
    assert m is not None, key
    return float(m.group(1))


def ticker(name: str = "BTC-27DEC24-100000-C", **fields: object) -> str:
    data: dict[str, object] = {
        "timestamp": 1735000000000,
        "instrument_name": name,
        "best_bid_price": 0.05,
        "best_bid_amount": 3.0,
        "best_ask_price": 0.055,
        "best_ask_amount": 4.0,
        "bid_iv": 60.0,
        "ask_iv": 64.0,
        "mark_iv": 62.0,
        "mark_price": 0.052,
        "underlying_price": 97000.0,
        "underlying_index": "BTC-27DEC24",
        "index_price": 96500.0,
        "open_interest": 12.0,
        "greeks": {"delta": 0.4, "gamma": 1e-5, "vega": 50.0, "theta": -30.0, "rho": 5.0},
    }
    data.update(fields)
    for k in [k for k, v in fields.items() if v is ...]:  # ... = leave the key out
        del data[k]
    return orjson.dumps(
        {
            "jsonrpc": "2.0",
            "method": "subscription",
            "params": {"channel": f"ticker.{name}.100ms", "data": data},
        }
    ).decode()


def note(channel: str, data: object) -> str:
    return orjson.dumps(
        {"jsonrpc": "2.0", "method": "subscription", "params": {"channel": channel, "data": data}}
    ).decode()


# -- the real capture -------------------------------------------------------------------------


def test_real_capture_parses_every_frame() -> None:
    frames = received(shared_file(CAPTURE))
    p = DeribitParser()
    events = [e for ns, f in frames for e in p.parse(f, ns)]
    assert p.drops == Counter() and p.skipped == Counter()
    assert p.frames == len(frames)
    # expected counts by plain text search
    n_ticker = sum('"channel":"ticker.' in f for _, f in frames)
    n_book = sum('"channel":"book.' in f for _, f in frames)
    n_trades = sum('"channel":"trades.' in f for _, f in frames)
    n_result = sum('"result":' in f for _, f in frames)
    assert n_ticker == 89 and n_book == 46 and n_result == 1  # what the capture holds
    assert by_type(events) == Counter(
        Quote=n_ticker,
        BookTop=n_book,
        RpcResponse=n_result,
        **({"Trade": n_trades} if n_trades else {}),
    )
    # the subscribe reply carries the accepted channels
    rpc = next(e for e in events if isinstance(e, RpcResponse))
    assert rpc.id == 0 and isinstance(rpc.result, list) and len(rpc.result) == 30
    # receive times come from the line prefixes
    assert getattr(events[0], "recv_ns", None) == frames[0][0] == 1626993723804318000


def test_real_ticker_fields_match_the_raw_text() -> None:
    frames = received(shared_file(CAPTURE))
    text = next(f for _, f in frames if '"channel":"ticker.ETH-30JUL21-2800-C' in f)
    (q,) = DeribitParser().parse(text, 7)
    assert isinstance(q, Quote)
    assert q.venue == "deribit" and q.instrument == "ETH-30JUL21-2800-C" and q.recv_ns == 7
    assert q.ts_ms == int(number(text, "timestamp"))
    for attr, key in [
        ("bid", "best_bid_price"),
        ("bid_size", "best_bid_amount"),
        ("ask", "best_ask_price"),
        ("ask_size", "best_ask_amount"),
        ("mark_price", "mark_price"),
        ("forward", "underlying_price"),
        ("index_price", "index_price"),
        ("open_interest", "open_interest"),
        ("delta", "delta"),
        ("gamma", "gamma"),
        ("vega", "vega"),
        ("theta", "theta"),
        ("rho", "rho"),
    ]:
        assert getattr(q, attr) == number(text, key), attr
    for attr, key in [("mark_iv", "mark_iv"), ("bid_iv", "bid_iv"), ("ask_iv", "ask_iv")]:
        assert getattr(q, attr) == pytest.approx(number(text, key) / 100, rel=1e-15), attr
    assert q.mark_iv == pytest.approx(1.2074) and q.forward_index == "ETH-30JUL21"


def test_real_empty_ticker_sides_are_nan() -> None:
    frames = received(shared_file(CAPTURE))
    text = next(
        f for _, f in frames if '"best_bid_price":0.0,' in f and '"best_ask_price":0.0,' in f
    )
    (q,) = DeribitParser().parse(text, 0)
    assert isinstance(q, Quote)
    for v in (q.bid, q.bid_size, q.ask, q.ask_size, q.bid_iv, q.ask_iv):
        assert math.isnan(v)
    assert q.mark_iv == pytest.approx(number(text, "mark_iv") / 100)


def test_real_book_tops_agree_with_tickers_of_the_same_instant() -> None:
    """Deribit's own ticker best bid/ask is the order book's top: wherever a book message and a
    ticker share a timestamp, the reconstructed top must equal the ticker's."""
    frames = received(shared_file(CAPTURE))
    p = DeribitParser()
    events = [e for ns, f in frames for e in p.parse(f, ns)]
    quotes = {(e.instrument, e.ts_ms): e for e in events if isinstance(e, Quote)}
    tops = [e for e in events if isinstance(e, BookTop)]
    compared = 0
    for b in tops:
        q = quotes.get((b.instrument, b.ts_ms))
        if q is None:
            continue
        compared += 1
        for u, v in (
            (b.bid, q.bid),
            (b.ask, q.ask),
            (b.bid_size, q.bid_size),
            (b.ask_size, q.ask_size),
        ):
            assert (math.isnan(u) and math.isnan(v)) or u == v, (b, q)
    assert compared >= 30
    # and the first snapshot's top straight from the text
    snap = next(f for _, f in frames if '"book.ETH-30JUL21-2800-C' in f and '"snapshot"' in f)
    b0 = next(b for b in tops if b.instrument == "ETH-30JUL21-2800-C")
    bids = re.search(r'"bids":\[\["new",([0-9.]+),([0-9.]+)\]', snap)
    asks = re.search(r'"asks":\[\["new",([0-9.]+),([0-9.]+)\]', snap)
    assert bids and asks
    assert (b0.bid, b0.bid_size) == (float(bids.group(1)), float(bids.group(2)))
    assert (b0.ask, b0.ask_size) == (float(asks.group(1)), float(asks.group(2)))


def test_book_change_id_gap_drops_the_book_until_its_next_snapshot() -> None:
    frames = received(shared_file(CAPTURE))
    changes = [(i, f) for i, (_, f) in enumerate(frames) if '"type":"change"' in f]
    i_gap, text = changes[3]
    name = re.search(r'"instrument_name":"([^"]+)"', text).group(1)  # type: ignore[union-attr]
    prev = int(number(text, "prev_change_id"))
    doctored = text.replace(f'"prev_change_id":{prev}', f'"prev_change_id":{prev - 1}')
    assert doctored != text
    later_same = [i for i, f in changes if i > i_gap and f'"instrument_name":"{name}"' in f]
    assert later_same, "the capture has further changes of that instrument"

    p = DeribitParser()
    out: list[Event] = []
    for i, (ns, f) in enumerate(frames):
        out += p.parse(doctored if i == i_gap else f, ns)
    gaps = [e for e in out if isinstance(e, FeedStatus)]
    assert len(gaps) == 1 and gaps[0].state == "gap" and gaps[0].instrument == name
    assert str(prev - 1) in gaps[0].detail
    tops_after = [
        e for e in out[out.index(gaps[0]) :] if isinstance(e, BookTop) and e.instrument == name
    ]
    assert tops_after == []  # nothing until a snapshot
    assert p.skipped["book_no_snapshot"] == len(later_same)
    assert p.drops == Counter()
    # a fresh snapshot (what the resubscription brings) restores it
    snap = next(f for _, f in frames if f'"book.{name}' in f and '"snapshot"' in f)
    (top,) = p.parse(snap, 0)
    assert isinstance(top, BookTop) and top.instrument == name

    # a lost change frame is a gap too
    p2 = DeribitParser()
    out2 = [e for i, (ns, f) in enumerate(frames) if i != i_gap for e in p2.parse(f, ns)]
    assert [e.instrument for e in out2 if isinstance(e, FeedStatus)] == [name]


# -- get_instruments ----------------------------------------------------------------------------


def test_get_instruments_lists_every_option() -> None:
    lines = shared_file(INSTRUMENTS).read_text().splitlines()
    bodies = [ln.split(": ", 1)[1] for ln in lines if ln.startswith("https://")]
    assert len(bodies) == 4
    p = DeribitParser()
    events = [e for body in bodies for e in p.parse(body, 5)]
    listed = [e.instrument for e in events if isinstance(e, InstrumentListed)]
    n_options = sum(b.count('"kind":"option"') for b in bodies)
    n_futures = sum(b.count('"kind":"future"') for b in bodies)
    assert n_options == 980 and len(listed) == n_options
    assert len({i.name for i in listed}) == n_options
    assert p.skipped == Counter(future=n_futures) and p.drops == Counter()
    assert by_type(events)["RpcResponse"] == 4
    assert all(isinstance(e, RpcResponse) for e in events if not isinstance(e, InstrumentListed))
    # spot check against the raw text
    inst = next(i for i in listed if i.name == "BTC-24SEP21-40000-P")
    raw = re.search(r'\{[^{}]*"instrument_name":"BTC-24SEP21-40000-P"[^{}]*\}', bodies[0])
    assert raw is not None
    item = orjson.loads(raw.group(0))
    assert inst.tick_size == item["tick_size"] == 0.0005
    assert inst.contract_size == item["contract_size"]
    assert inst.expiry_ms == item["expiration_timestamp"] == expiry_ms_of("24SEP21")
    assert (inst.strike, inst.is_call, inst.underlying, inst.expiry) == (
        40000.0,
        False,
        "BTC",
        "24SEP21",
    )
    assert all(i.inverse for i in listed)  # BTC, ETH, SOL options settle in coin here
    sol = [i for i in listed if i.underlying == "SOL"]
    assert len(sol) == bodies[2].count('"kind":"option"') and sol[0].tick_size == 0.001
    # every listed expiry agrees with what its name says
    assert all(i.expiry_ms == expiry_ms_of(i.expiry) for i in listed)


def test_linear_usdc_options_are_not_inverse() -> None:
    items = [
        {
            "kind": "option",
            "instrument_name": "XRP_USDC-24JAN25-0d625-C",
            "option_type": "call",
            "strike": 0.625,
            "expiration_timestamp": expiry_ms_of("24JAN25"),
            "tick_size": 0.0001,
            "contract_size": 1000,
            "settlement_currency": "USDC",
            "quote_currency": "USDC",
        },
        {
            "kind": "option",
            "instrument_name": "BTC_USDC-24JAN25-100000-P",
            "option_type": "put",
            "strike": 100000,
            "expiration_timestamp": expiry_ms_of("24JAN25"),
            "tick_size": 5,
            "contract_size": 0.01,
        },
        {"kind": "future_combo", "instrument_name": "BTC-FS-24JAN25_PERP"},
    ]
    p = DeribitParser()
    events = p.parse(orjson.dumps({"jsonrpc": "2.0", "id": 9, "result": items}), 1)
    listed = [e.instrument for e in events if isinstance(e, InstrumentListed)]
    assert [(i.name, i.inverse, i.strike, i.contract_size) for i in listed] == [
        ("XRP_USDC-24JAN25-0d625-C", False, 0.625, 1000.0),
        ("BTC_USDC-24JAN25-100000-P", False, 100000.0, 0.01),
    ]
    assert isinstance(events[-1], RpcResponse) and events[-1].id == 9
    assert p.skipped == Counter(future_combo=1)


def test_a_bad_instrument_entry_does_not_lose_the_others() -> None:
    good = {
        "kind": "option",
        "instrument_name": "ETH-27DEC24-4000-C",
        "option_type": "call",
        "strike": 4000.0,
        "expiration_timestamp": expiry_ms_of("27DEC24"),
        "tick_size": 0.0005,
        "contract_size": 1.0,
    }
    bad = [dict(good, strike="4000"), dict(good, option_type="put"), {"kind": "option"}, 5]
    p = DeribitParser()
    events = p.parse(orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": [good, *bad]}), 0)
    assert by_type(events) == Counter(InstrumentListed=1, RpcResponse=1)
    assert sum(p.drops.values()) == 4


# -- the other channels -------------------------------------------------------------------------


def test_other_channels() -> None:
    p = DeribitParser()
    name = "BTC-7FEB25-100000-P"
    ev = p.parse(
        note(
            "markprice.options.btc_usd",
            [
                {"timestamp": 1, "mark_price": 0.0333, "iv": 0.9, "instrument_name": name},
                {
                    "timestamp": 1,
                    "mark_price": 0.01,
                    "iv": 0.0,
                    "instrument_name": "BTC-CS-7FEB25-1_2",
                },
            ],
        ),
        3,
    )
    assert ev == [MarkPrice("deribit", name, 1, 3, 0.0333, 0.9)]  # this channel's iv is a fraction
    assert p.skipped == Counter(combo=1)
    assert p.parse(
        note(
            "deribit_price_index.btc_usd",
            {"timestamp": 2, "price": 97000.5, "index_name": "btc_usd"},
        ),
        4,
    ) == [IndexPrice("deribit", "btc_usd", 2, 4, 97000.5)]
    created = p.parse(
        note(
            "instrument.state.option.BTC",
            {"timestamp": 5, "state": "created", "instrument_name": name},
        ),
        6,
    )
    assert len(created) == 1 and isinstance(created[0], InstrumentListed)
    inst = created[0].instrument
    assert (
        inst.underlying,
        inst.expiry,
        inst.expiry_ms,
        inst.strike,
        inst.is_call,
        inst.inverse,
    ) == (
        "BTC",
        "7FEB25",
        expiry_ms_of("7FEB25"),
        100000.0,
        False,
        True,
    )
    for state in ("settled", "deactivated", "closed"):
        assert p.parse(
            note(
                "instrument.state.option.BTC",
                {"timestamp": 8, "state": state, "instrument_name": name},
            ),
            9,
        ) == [InstrumentExpired("deribit", name, 8, 9)]
    assert (
        p.parse(
            note(
                "instrument.state.any.any",
                {"timestamp": 8, "state": "created", "instrument_name": "BTC-PERPETUAL"},
            ),
            9,
        )
        == []
    )
    (trade,) = p.parse(
        note(
            f"trades.{name}.100ms",
            [
                {
                    "trade_seq": 1,
                    "trade_id": "ETH-1",
                    "timestamp": 10,
                    "tick_direction": 0,
                    "price": 0.05,
                    "mark_price": 0.049,
                    "iv": 71.6,
                    "instrument_name": name,
                    "index_price": 97000.0,
                    "direction": "sell",
                    "amount": 2.5,
                }
            ],
        ),
        11,
    )
    assert isinstance(trade, Trade)
    assert (trade.instrument, trade.ts_ms, trade.recv_ns, trade.price, trade.amount) == (
        name,
        10,
        11,
        0.05,
        2.5,
    )
    assert trade.is_buy is False and trade.trade_id == "ETH-1" and trade.iv == pytest.approx(0.716)
    top = p.parse(
        note(
            f"quote.{name}",
            {
                "timestamp": 12,
                "instrument_name": name,
                "best_bid_price": 0.0,
                "best_bid_amount": 0.0,
                "best_ask_price": 0.06,
                "best_ask_amount": 1.5,
            },
        ),
        13,
    )
    assert (
        len(top) == 1
        and isinstance(top[0], BookTop)
        and math.isnan(top[0].bid)
        and top[0].ask == 0.06
    )
    grouped = p.parse(
        note(
            f"book.{name}.none.10.100ms",
            {
                "timestamp": 14,
                "instrument_name": name,
                "change_id": 5,
                "bids": [[0.04, 1.0], [0.045, 2.0]],
                "asks": [[0.05, 3.0]],
            },
        ),
        15,
    )
    assert grouped == [BookTop("deribit", name, 14, 15, 0.045, 2.0, 0.05, 3.0)]
    assert p.drops == Counter()


def test_heartbeats_and_rpc_replies() -> None:
    p = DeribitParser()
    assert p.parse(
        '{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"test_request"}}', 1
    ) == [Heartbeat("deribit", 1, True)]
    assert p.parse(b'{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"heartbeat"}}', 2) == [
        Heartbeat("deribit", 2, False)
    ]
    err = p.parse(
        '{"jsonrpc":"2.0","id":42,"error":{"code":10028,"message":"too_many_requests"}}', 3
    )
    assert err == [RpcResponse("deribit", 42, 3, None, 10028, "too_many_requests")]
    big = p.parse(
        '{"jsonrpc":"2.0","error":{"code":-32600,"message":"request entity too large"}}', 4
    )
    assert big == [RpcResponse("deribit", None, 4, None, -32600, "request entity too large")]
    ok = p.parse('{"jsonrpc":"2.0","id":7,"result":"ok","usIn":1,"usOut":2,"usDiff":1}', 5)
    assert ok == [RpcResponse("deribit", 7, 5, "ok")]
    assert p.drops == Counter()


def test_futures_and_combos_are_skipped_quietly() -> None:
    p = DeribitParser()
    for name in ("BTC-PERPETUAL", "BTC-27DEC24", "XRP_USDC-PERPETUAL"):
        assert p.parse(ticker(name), 0) == []
    for name in ("BTC-CS-27DEC24-100000_110000", "ETH-STRD-27DEC24-4000"):
        assert p.parse(ticker(name), 0) == []
    assert p.skipped == Counter(future=3, combo=2) and p.drops == Counter()


def test_ticker_conventions() -> None:
    (q,) = DeribitParser().parse(ticker(best_bid_price=0.0, bid_iv=0.0, ask_iv=0, mark_iv=None), 0)
    assert isinstance(q, Quote)
    assert math.isnan(q.bid) and math.isnan(q.bid_size) and math.isnan(q.bid_iv)
    assert math.isnan(q.ask_iv) and math.isnan(q.mark_iv)
    assert (q.ask, q.ask_size, q.forward, q.delta, q.rho) == (0.055, 4.0, 97000.0, 0.4, 5.0)
    # a bid with a zero IV (e.g. below intrinsic): the price stays, the IV is NaN
    (q2,) = DeribitParser().parse(ticker(bid_iv=0.0), 0)
    assert isinstance(q2, Quote) and q2.bid == 0.05 and math.isnan(q2.bid_iv)
    (q3,) = DeribitParser().parse(ticker(greeks=None, underlying_index=None), 0)
    assert isinstance(q3, Quote) and math.isnan(q3.delta) and q3.forward_index == ""


# -- garbage --------------------------------------------------------------------------------------

GARBAGE: list[tuple[str | bytes, str]] = [
    ("not json at all", "bad_json"),
    (b"\xff\xfe\x00garbage", "bad_json"),
    ('{"a": NaN}', "bad_json"),
    ("", "bad_json"),
    ("[1, 2, 3]", "not_object"),
    ('"just a string"', "not_object"),
    ("null", "not_object"),
    ('{"jsonrpc":"2.0","method":"subscription"}', "missing_field"),
    ('{"jsonrpc":"2.0","method":"subscription","params":[1]}', "bad_type"),
    (
        '{"jsonrpc":"2.0","method":"subscription","params":{"channel":"ticker.X.100ms"}}',
        "missing_field",
    ),
    ('{"jsonrpc":"2.0","method":"subscription","params":{"channel":5,"data":{}}}', "bad_type"),
    (
        '{"jsonrpc":"2.0","method":"subscription","params":{"channel":"weird.x","data":{}}}',
        "unknown_channel",
    ),
    ('{"jsonrpc":"2.0","method":"nonsense","params":{}}', "unknown_method"),
    ('{"jsonrpc":"2.0"}', "unknown_method"),
    ('{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"pong"}}', "bad_heartbeat"),
    ('{"jsonrpc":"2.0","method":"heartbeat"}', "missing_field"),
    ('{"jsonrpc":"2.0","id":"x","result":1}', "bad_type"),
    ('{"jsonrpc":"2.0","id":1,"error":"boom"}', "bad_type"),
    (ticker(best_bid_price="NaN"), "bad_type"),
    (ticker(best_ask_price=[1]), "bad_type"),
    (ticker(mark_iv="62"), "bad_type"),
    (ticker(greeks=[1, 2]), "bad_type"),
    (ticker(timestamp="1735000000000"), "bad_type"),
    (ticker(timestamp=1.5), "bad_type"),
    (ticker(best_bid_price=""), "bad_type"),
    (note("ticker.X.100ms", {"timestamp": 1}), "missing_field"),
    (note("ticker.BTC-27DEC24-1-C.100ms", [1]), "bad_type"),
    (ticker("BTC-31FEB25-1000-C"), "bad_instrument"),
    (ticker("hello"), "bad_instrument"),
    (note("ticker.x.100ms", {"instrument_name": 7}), "bad_type"),
    (
        note(
            "book.BTC-27DEC24-1-C.raw",
            {
                "type": "snapshot",
                "timestamp": 1,
                "instrument_name": "BTC-27DEC24-1-C",
                "change_id": 1,
                "bids": [["add", 1, 1]],
                "asks": [],
            },
        ),
        "bad_book_level",
    ),
    (
        note(
            "book.BTC-27DEC24-1-C.raw",
            {
                "type": "snapshot",
                "timestamp": 1,
                "instrument_name": "BTC-27DEC24-1-C",
                "change_id": "1",
                "bids": [],
                "asks": [],
            },
        ),
        "bad_type",
    ),
    (
        note(
            "book.BTC-27DEC24-1-C.raw",
            {
                "type": "snapshot",
                "timestamp": 1,
                "instrument_name": "BTC-27DEC24-1-C",
                "change_id": 1,
                "bids": [["new", "NaN", 1]],
                "asks": [],
            },
        ),
        "bad_type",
    ),
    (note("trades.BTC-27DEC24-1-C.raw", {"not": "a list"}), "bad_type"),
    (
        note(
            "trades.BTC-27DEC24-1-C.raw",
            [
                {
                    "instrument_name": "BTC-27DEC24-1-C",
                    "timestamp": 1,
                    "price": 1,
                    "amount": 1,
                    "direction": "up",
                }
            ],
        ),
        "bad_value",
    ),
    (
        note(
            "deribit_price_index.btc_usd", {"timestamp": 1, "price": None, "index_name": "btc_usd"}
        ),
        "bad_type",
    ),
    (ticker(timestamp=...), "missing_field"),
    (
        note(
            "instrument.state.option.BTC",
            {"timestamp": 1, "state": 3, "instrument_name": "BTC-27DEC24-1-C"},
        ),
        "bad_type",
    ),
]


@pytest.mark.parametrize("fused", [False, True])
def test_garbage_is_counted_by_reason_never_raised(fused: bool) -> None:
    p = DeribitParser()
    fast = FastPath(p, Books())
    if fused:  # the instrument already has a row, so tickers reach the fused path
        fast.apply(ticker(), 0)
    for frame, _ in GARBAGE:
        out = fast.apply(frame, 0) if fused else p.parse(frame, 0)
        assert not out, frame
    assert p.drops == Counter(reason for _, reason in GARBAGE)
    assert p.frames == len(GARBAGE) + fused


def test_fused_path_ignores_fields_the_book_does_not_keep() -> None:
    """The documented difference: a bad field the book never stores (index price, gamma, ...)
    drops the frame on the event path, while the fused path writes the (good) stored fields."""
    bad = ticker(index_price="x", greeks={"delta": 0.3, "gamma": "?"}, best_bid_price=0.051)
    p = DeribitParser()
    assert p.parse(bad, 0) == [] and p.drops == Counter(bad_type=1)
    p2, books = DeribitParser(), Books()
    fast = FastPath(p2, books)
    fast.apply(ticker(), 0)
    assert not fast.apply(bad, 0) and p2.drops == Counter()
    row = books.get("deribit", "BTC").quote_row("BTC-27DEC24-100000-C")  # type: ignore[union-attr]
    assert row is not None and row["bid"] == 0.051 and row["delta"] == 0.3


def test_drop_logging_is_rate_limited() -> None:
    p = DeribitParser(log_first=3)
    with structlog.testing.capture_logs() as logs:
        for _ in range(1000):
            p.parse("nope", 0)
    assert p.drops == Counter(bad_json=1000)
    dropped = [e for e in logs if e["event"] == "deribit_frame_dropped"]
    # the first 3, then at powers of two: 4, 8, ..., 512
    assert [e["count"] for e in dropped] == [1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512]
    assert dropped[0]["reason"] == "bad_json"


# -- properties -----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
TICKER_KEYS = [
    "timestamp",
    "best_bid_price",
    "best_bid_amount",
    "best_ask_price",
    "best_ask_amount",
    "mark_price",
    "mark_iv",
    "bid_iv",
    "ask_iv",
    "underlying_price",
    "greeks",
]
# values a ticker field may take: good numbers, zero, null, and wrong types
FIELD = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.integers(-5, 10**13),
    st.just(0),
    st.just(0.0),
    st.none(),
    st.booleans(),
    st.sampled_from(["", "1", "NaN"]),
    st.lists(st.integers(-10, 10), max_size=2),
    st.just(...),
    # greeks: only delta is stored by the book (see the test above for the others)
    st.dictionaries(
        st.just("delta"), st.floats(-1, 1) | st.none() | st.text(max_size=2), max_size=1
    ),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    p = DeribitParser(log_first=0)
    p.parse(data, 0)
    FastPath(p, Books()).apply(data, 0)
    assert p.frames == 2


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    JSON,
    st.sampled_from(
        [
            "ticker.BTC-27DEC24-1-C.100ms",
            "book.BTC-27DEC24-1-C.raw",
            "book.BTC-27DEC24-1-C.none.10.100ms",
            "trades.x.raw",
            "quote.BTC-27DEC24-1-C",
            "markprice.options.btc_usd",
            "deribit_price_index.btc_usd",
            "instrument.state.option.BTC",
            "nope",
        ]
    ),
)
def test_random_json_never_raises(value: object, channel: str) -> None:
    p = DeribitParser(log_first=0)
    fast = FastPath(p, Books())
    for frame in (
        orjson.dumps(value),
        note(channel, value),
        orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": value}),
        orjson.dumps({"jsonrpc": "2.0", "method": "heartbeat", "params": value}),
    ):
        p.parse(frame, 0)
        fast.apply(frame, 0)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.sampled_from(TICKER_KEYS), FIELD, max_size=len(TICKER_KEYS)))
def test_fused_ticker_path_decides_like_the_event_path(fields: dict[str, object]) -> None:
    """Any ticker payload: the fused write (``FastPath``) and parse + Books.on_event leave the same
    row and count the same drops (for the fields the book keeps)."""
    name = "BTC-27DEC24-100000-C"
    frame = ticker(name, **fields)
    rows = []
    drops = []
    for fused in (True, False):
        p = DeribitParser(log_first=0)
        books = Books()
        fast = FastPath(p, books)
        fast.apply(ticker(name), 0)  # the instrument has a row already
        if fused:
            fast.apply(frame, 0)
        else:
            for ev in p.parse(frame, 0):
                books.on_event(ev)
        book = books.get("deribit", "BTC")
        assert book is not None
        rows.append(repr(book.quote_row(name)))
        drops.append(p.drops)
    assert drops[0] == drops[1]
    assert rows[0] == rows[1]


def test_fused_path_follows_the_data_not_the_channel_name() -> None:
    """A ticker whose channel names one option and whose data another: both paths go by the
    data's instrument_name (the fused path's channel cache must not shortcut it)."""
    a, b = "BTC-27DEC24-100000-C", "BTC-27DEC24-90000-C"
    odd = note(f"ticker.{a}.100ms", orjson.loads(ticker(b, best_bid_price=0.07))["params"]["data"])
    rows = []
    for fused in (True, False):
        p, books = DeribitParser(), Books()
        fast = FastPath(p, books)
        for frame in (ticker(a), ticker(b), odd):
            if fused:
                fast.apply(frame, 0)
            else:
                for ev in p.parse(frame, 0):
                    books.on_event(ev)
        book = books.get("deribit", "BTC")
        assert book is not None
        rows.append((repr(book.quote_row(a)), repr(book.quote_row(b))))
        assert book.quote_row(b)["bid"] == 0.07  # type: ignore[index]
    assert rows[0] == rows[1]


def test_reset_forgets_book_levels() -> None:
    name = "BTC-27DEC24-100000-C"
    snap = {
        "type": "snapshot",
        "timestamp": 1,
        "instrument_name": name,
        "change_id": 10,
        "bids": [["new", 0.05, 1.0]],
        "asks": [],
    }
    change = {
        "type": "change",
        "timestamp": 2,
        "instrument_name": name,
        "change_id": 11,
        "prev_change_id": 10,
        "bids": [["change", 0.05, 2.0]],
        "asks": [["new", 0.06, 3.0]],
    }
    p = DeribitParser()
    p.parse(note(f"book.{name}.100ms", snap), 0)
    (top,) = p.parse(note(f"book.{name}.100ms", change), 0)
    assert top == BookTop("deribit", name, 2, 0, 0.05, 2.0, 0.06, 3.0)
    p.reset()
    assert p.parse(note(f"book.{name}.100ms", change), 0) == []  # no snapshot since the reset
    assert p.skipped["book_no_snapshot"] == 1
    (top2,) = p.parse(note(f"book.{name}.100ms", snap), 0)
    assert isinstance(top2, BookTop) and top2.bid_size == 1.0 and math.isnan(top2.ask)
    delete = dict(change, change_id=12, prev_change_id=10, bids=[["delete", 0.05, 0.0]], asks=[])
    (top3,) = p.parse(note(f"book.{name}.100ms", delete), 0)
    assert isinstance(top3, BookTop) and math.isnan(top3.bid) and math.isnan(top3.bid_size)


def test_duplicated_or_late_book_changes_are_skipped_not_gaps() -> None:
    """A change whose change_id is not above the last one applied (the same frame twice, or
    an old one arriving after a fresh snapshot) changes nothing: skipped, no gap, no
    resubscription; a change that really skips one is still a gap."""
    name = "BTC-27DEC24-100000-C"
    chan = f"book.{name}.100ms"
    snap = {
        "type": "snapshot",
        "timestamp": 1,
        "instrument_name": name,
        "change_id": 10,
        "bids": [["new", 0.05, 1.0]],
        "asks": [["new", 0.06, 1.0]],
    }
    change = dict(snap, type="change", change_id=11, prev_change_id=10, bids=[["new", 0.051, 2.0]])
    p = DeribitParser()
    p.parse(note(chan, snap), 0)
    (top,) = p.parse(note(chan, change), 0)
    assert isinstance(top, BookTop) and top.bid == 0.051
    assert p.parse(note(chan, change), 0) == []  # the duplicate
    late = dict(change, change_id=9, prev_change_id=8, bids=[["new", 0.07, 1.0]])
    assert p.parse(note(chan, late), 0) == []
    assert p.skipped["book_old_change"] == 2 and not p.drops
    nxt = dict(change, change_id=12, prev_change_id=11, bids=[["new", 0.052, 1.0]])
    (top2,) = p.parse(note(chan, nxt), 0)
    assert isinstance(top2, BookTop) and top2.bid == 0.052  # the levels were not touched
    skip = dict(change, change_id=14, prev_change_id=13)
    (gap,) = p.parse(note(chan, skip), 0)
    assert isinstance(gap, FeedStatus) and gap.state == "gap"
