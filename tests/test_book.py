"""Book and Books: the real capture through the parser, a real full chain (2021-02-11 BTC,
public/get_order_book rows) as Quote events, the filters, forwards, the 08:00 UTC expiry roll,
dirty flags, and the parser's fused path against the event path.

Expected values are computed here from the CSV with plain Python (csv, statistics), or from
closed forms (Black-76 put-call parity), never by the book.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
import subprocess
import sys
import tracemalloc
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.book.book import Book, Books
from streamer.book.fastpath import FastPath
from streamer.book.snapshot import ChainSnapshot
from streamer.events import (
    BookTop,
    FeedStatus,
    IndexPrice,
    Instrument,
    InstrumentExpired,
    InstrumentListed,
    MarkPrice,
    Quote,
)
from streamer.feeds.deribit.parser import DeribitParser
from streamer.instruments import MS_PER_YEAR, expiry_ms_of, parse_option
from streamer.pricing import black_price
from tests.conftest import REPO, shared_file

CHAIN = "chains/bottama-btc-2021-02-11.csv"
CAPTURE = "raw/cryptofeed-DERIBIT.ws.1.0"
TOOL = REPO.parent / "shared" / "tools" / "csv_to_replay.py"
NAN = math.nan
_RECEIVED = re.compile(r"^(\d+)\.(\d+): (\{.*)$")


def f(text: str) -> float:
    return float(text) if text else 0.0


def chain_rows() -> list[dict[str, str]]:
    with shared_file(CHAIN).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return sorted(rows, key=lambda r: int(r["timestamp"]))


def latest(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    last: dict[str, dict[str, str]] = {}
    for r in rows:
        last[r["instrument_name"]] = r
    return last


def quote_of(r: dict[str, str]) -> Quote:
    """A CSV row as the parser would give it (zero price or IV = none), built here by hand."""
    bid, ask = f(r["best_bid_price"]), f(r["best_ask_price"])

    def iv(key: str) -> float:
        return f(r[key]) / 100 if f(r[key]) else NAN

    return Quote(
        "deribit",
        r["instrument_name"],
        int(r["timestamp"]),
        0,
        bid=bid if bid else NAN,
        bid_size=f(r["best_bid_amount"]) if bid else NAN,
        ask=ask if ask else NAN,
        ask_size=f(r["best_ask_amount"]) if ask else NAN,
        mark_price=f(r["mark_price"]),
        mark_iv=iv("mark_iv"),
        bid_iv=iv("bid_iv"),
        ask_iv=iv("ask_iv"),
        forward=f(r["underlying_price"]),
        delta=f(r["greeks.delta"]),
    )


def chain_book(**kw: float) -> tuple[Book, list[dict[str, str]]]:
    rows = chain_rows()
    book = Book("deribit", "BTC", **kw)  # type: ignore[arg-type]
    for r in rows:
        book.apply(quote_of(r))
    return book, rows


def expected_drops(
    last: dict[str, dict[str, str]], now_ms: int, stale_s: float, max_spread: float
) -> tuple[Counter[str], int]:
    """The book's filters, re-done row by row (reasons in the documented order)."""
    drops: Counter[str] = Counter()
    one_sided = 0
    for r in last.values():
        bid, ask = f(r["best_bid_price"]), f(r["best_ask_price"])
        biv, aiv = f(r["bid_iv"]), f(r["ask_iv"])
        F, K = f(r["underlying_price"]), parse_option(r["instrument_name"]).strike  # type: ignore[union-attr]
        call = r["instrument_name"].endswith("-C")
        if int(r["timestamp"]) < now_ms - stale_s * 1000:
            drops["stale"] += 1
        elif bid == 0 and ask == 0:
            drops["empty"] += 1
        elif bid and ask and bid > ask:
            drops["crossed"] += 1
        elif biv and aiv and (aiv - biv) / 100 > max_spread:
            drops["wide_spread"] += 1
        else:
            intrinsic = max(F - K if call else K - F, 0.0) / F
            level = (bid + ask) / 2 if bid and ask else (ask if ask else None)
            if level is not None and level < intrinsic * (1 - 1e-9):
                drops["below_intrinsic"] += 1
            elif bool(bid) != bool(ask):
                one_sided += 1
    return drops, one_sided


# -- the real 2021-02-11 chain ------------------------------------------------------------------


def test_chain_snapshot_forwards_and_filters() -> None:
    book, rows = chain_book(stale_after_s=1e9, max_spread_iv=0.5)
    last = latest(rows)
    now = max(int(r["timestamp"]) for r in rows)
    snap = book.snapshot(now)
    assert len(book) == len(last) == 488
    # forwards: the median of each expiry's underlying_price
    by_exp: dict[str, list[float]] = {}
    for name, r in last.items():
        by_exp.setdefault(name.split("-")[1], []).append(f(r["underlying_price"]))
    assert snap.expiries == tuple(sorted(by_exp, key=expiry_ms_of))
    for code, fwd in zip(snap.expiries, snap.forwards, strict=True):
        assert fwd == statistics.median(by_exp[code])
    # filters, counted independently
    drops, one_sided = expected_drops(last, now, 1e9, 0.5)
    assert drops["empty"] == 62 and drops["below_intrinsic"] > 0
    assert book.drops == drops and book.one_sided == one_sided
    assert snap.n_quotes == len(last) - sum(drops.values())
    # every kept quote is the instrument's latest CSV row
    for i, name in enumerate(snap.instrument):
        r = last[name]
        assert snap.quote_ts_ms[i] == int(r["timestamp"])
        assert snap.forward[i] == f(r["underlying_price"])
        assert snap.venue_delta[i] == f(r["greeks.delta"])
        bid = f(r["best_bid_price"])
        assert (snap.bid[i] == bid) if bid else math.isnan(snap.bid[i])
        assert snap.T[i] == (expiry_ms_of(name.split("-")[1]) - now) / MS_PER_YEAR
        assert snap.expiries[snap.expiry_idx[i]] == name.split("-")[1]
    # sorted by expiry, strike, calls first; IVs are fractions
    key = [
        (snap.expiry_ms[e], k, not c)
        for e, k, c in zip(snap.expiry_idx, snap.strike, snap.is_call, strict=True)
    ]
    assert key == sorted(key)
    assert np.nanmax(snap.mark_iv) < 10 and snap.inverse and snap.ts_ms == now


def test_stale_filter() -> None:
    book, rows = chain_book(stale_after_s=60.0, max_spread_iv=0.5)
    last = latest(rows)
    now = max(int(r["timestamp"]) for r in rows)
    book.snapshot(now)
    drops, one_sided = expected_drops(last, now, 60.0, 0.5)
    n_stale = sum(int(r["timestamp"]) < now - 60_000 for r in last.values())
    assert n_stale > 50 and drops["stale"] == n_stale
    assert book.drops == drops and book.one_sided == one_sided
    # later, everything is stale
    snap = book.snapshot(now + 3_600_000)
    assert snap.n_quotes == 0 and book.drops == Counter(stale=len(last))


def test_crossed_zero_and_wide_quotes_leave_the_snapshot() -> None:
    book, rows = chain_book(stale_after_s=1e9, max_spread_iv=0.5)
    now = max(int(r["timestamp"]) for r in rows)
    book.snapshot(now)
    base = Counter(book.drops)
    name = next(
        r["instrument_name"]
        for r in latest(rows).values()
        if f(r["best_bid_price"]) and f(r["best_ask_price"])
    )
    q = quote_of(latest(rows)[name])
    book.apply(Quote(q.venue, name, now, 0, bid=0.3, ask=0.2, forward=q.forward))  # crossed
    snap = book.snapshot(now)
    assert name not in snap.instrument and book.drops["crossed"] == base["crossed"] + 1
    book.apply(
        Quote(q.venue, name, now, 0, bid=0.0, ask=0.2, forward=q.forward)
    )  # an unmapped zero
    snap = book.snapshot(now)
    assert name not in snap.instrument and book.drops["zero"] == 1
    book.apply(
        Quote(
            q.venue, name, now, 0, bid=q.bid, ask=q.ask, bid_iv=0.5, ask_iv=1.2, forward=q.forward
        )
    )
    snap = book.snapshot(now)
    assert name not in snap.instrument and book.drops["wide_spread"] == base["wide_spread"] + 1
    book.apply(q)
    assert name in book.snapshot(now).instrument


def test_expiry_roll_at_0800_utc() -> None:
    book, rows = chain_book(stale_after_s=1e9)
    first = min(expiry_ms_of(r["instrument_name"].split("-")[1]) for r in rows)
    assert first == expiry_ms_of("12FEB21")  # 2021-02-12 08:00 UTC
    n_first = sum(1 for n in latest(rows) if "-12FEB21-" in n)
    before = book.snapshot(first - 1)
    assert before.expiries[0] == "12FEB21" and len(book) == 488
    assert before.T[before.expiry_idx == 0].min() == pytest.approx(1 / MS_PER_YEAR)
    after = book.snapshot(first)
    assert "12FEB21" not in after.expiries and after.expiries[0] == "13FEB21"
    assert len(book) == 488 - n_first and not any("-12FEB21-" in n for n in after.instrument)
    # a late quote of an expired option is refused, not re-created
    late = next(r for r in rows if "-12FEB21-" in r["instrument_name"])
    assert not book.apply(quote_of(late))
    assert book.rejected["expired"] == 1 and len(book) == 488 - n_first


def test_dirty_flags() -> None:
    book, rows = chain_book(stale_after_s=1e9)
    now = max(int(r["timestamp"]) for r in rows)
    first = book.snapshot(now)
    assert first.dirty.all()  # first hand-out
    assert not book.snapshot(now).dirty.any()  # nothing changed
    last = latest(rows)
    two = [n for i, n in enumerate(first.instrument) if first.bid[i] > 0 and first.ask[i] > 0]
    name = two[len(two) // 2]
    code = name.split("-")[1]
    q = quote_of(last[name])
    # the same values at a later time: fresher, not changed
    book.apply(
        Quote(
            q.venue,
            name,
            now,
            0,
            q.bid,
            q.bid_size,
            q.ask,
            q.ask_size,
            q.mark_price,
            q.mark_iv,
            q.bid_iv,
            q.ask_iv,
            q.forward,
            delta=q.delta,
        )
    )
    assert not book.snapshot(now).dirty.any()
    book.apply(
        Quote(
            q.venue,
            name,
            now,
            0,
            q.bid,
            q.bid_size + 1,
            q.ask,
            q.ask_size,
            q.mark_price,
            q.mark_iv,
            q.bid_iv,
            q.ask_iv,
            q.forward,
            delta=q.delta,
        )
    )
    snap = book.snapshot(now)
    assert [snap.expiries[i] for i in np.flatnonzero(snap.dirty)] == [code]
    gone = next(n for n in snap.instrument if code not in n)
    assert book.apply(InstrumentExpired("deribit", gone, now))
    snap = book.snapshot(now)
    assert [snap.expiries[i] for i in np.flatnonzero(snap.dirty)] == [gone.split("-")[1]]
    assert gone not in snap.instrument
    # time passes: quotes going stale change their slices
    book.stale_after_s = 60.0
    snap = book.snapshot(now)
    stale_exp = {n.split("-")[1] for n, r in last.items() if int(r["timestamp"]) < now - 60_000}
    assert {snap.expiries[i] for i in np.flatnonzero(snap.dirty)} <= stale_exp
    assert snap.dirty.any()


def test_parity_forward_when_no_quote_has_one() -> None:
    """No forward on the wire: from the nearest-the-money call/put mids, F = K / (1 - (C - P))
    (coin-margined); the quotes here are Black-76 prices of a known forward."""
    F, T, sigma = 51_234.5, 0.05, 0.7
    expiry = "26FEB21"
    now = expiry_ms_of(expiry) - int(T * MS_PER_YEAR)
    book = Book("deribit", "BTC")
    for K in (40_000, 50_000, 52_000, 60_000):
        for call in (True, False):
            price = (
                float(black_price(F, K, (expiry_ms_of(expiry) - now) / MS_PER_YEAR, sigma, call))
                / F
            )
            name = f"BTC-{expiry}-{K}-{'C' if call else 'P'}"
            book.apply(
                Quote(
                    "deribit",
                    name,
                    now,
                    0,
                    bid=price * 0.999,
                    bid_size=1.0,
                    ask=price * 1.001,
                    ask_size=1.0,
                )
            )
    snap = book.snapshot(now)
    assert snap.forwards[0] == pytest.approx(F, rel=1e-9)  # the mids are the prices
    assert np.all(snap.forward == snap.forwards[0])
    # linear (USDC) options: C - P = F - K
    lin = Book("deribit", "BTC_USDC", inverse=False)
    for call in (True, False):
        price = float(black_price(F, 50_000, T, sigma, call))
        lin.apply(
            Quote(
                "deribit",
                f"BTC_USDC-{expiry}-50000-{'C' if call else 'P'}",
                now,
                0,
                bid=price,
                ask=price,
            )
        )
    assert lin.snapshot(now).forwards[0] == pytest.approx(F, rel=1e-12)


def test_below_intrinsic_coin_and_linear() -> None:
    now = expiry_ms_of("26FEB21") - 86_400_000
    book = Book("deribit", "BTC")
    # a 40000 call with F = 50000 is worth at least 0.2 BTC
    book.apply(
        Quote("deribit", "BTC-26FEB21-40000-C", now, 0, bid=0.18, ask=0.21, forward=50_000.0)
    )
    book.apply(
        Quote("deribit", "BTC-26FEB21-45000-C", now, 0, bid=0.101, ask=0.11, forward=50_000.0)
    )
    book.apply(
        Quote("deribit", "BTC-26FEB21-60000-P", now, 0, ask=0.19, forward=50_000.0)
    )  # ask only
    snap = book.snapshot(now)
    assert snap.instrument == ("BTC-26FEB21-45000-C",) and book.drops == Counter(below_intrinsic=2)
    lin = Book("deribit", "BTC_USDC", inverse=False)
    lin.apply(
        Quote(
            "deribit",
            "BTC_USDC-26FEB21-40000-C",
            now,
            0,
            bid=9_900.0,
            ask=10_500.0,
            forward=50_000.0,
        )
    )
    lin.apply(
        Quote(
            "deribit",
            "BTC_USDC-26FEB21-45000-C",
            now,
            0,
            bid=4_900.0,
            ask=5_000.0,
            forward=50_000.0,
        )
    )
    assert lin.snapshot(now).instrument == ("BTC_USDC-26FEB21-40000-C",)
    assert lin.drops == Counter(below_intrinsic=1)


# -- events, growth, routing ----------------------------------------------------------------------


def test_book_events_and_growth() -> None:
    now = expiry_ms_of("27DEC24") - 10 * 86_400_000
    book = Book("deribit", "BTC", capacity=1)
    names = [f"BTC-27DEC24-{k}-{cp}" for k in range(50_000, 150_000, 2_000) for cp in "CP"]
    for n in names:
        k = float(n.split("-")[2])  # at the money: no intrinsic value to fall below
        assert book.apply(
            Quote("deribit", n, now, 0, bid=0.01, ask=0.02, bid_size=1, ask_size=1, forward=k)
        )
    assert len(book) == 100 and book.slot(names[0]) == 0 and book.slot(names[-1]) == 99
    top = BookTop("deribit", names[0], now + 1, 0, 0.01, 1.0, 0.02, 1.0)
    assert not book.apply(top)  # same top, only fresher
    assert book.quote_row(names[0])["ts_ms"] == now + 1  # type: ignore[index]
    assert book.apply(BookTop("deribit", names[0], now + 2, 0, 0.011, 1.0, 0.02, 1.0))
    assert book.apply(MarkPrice("deribit", names[0], now, 0, 0.015, 0.55))
    assert not book.apply(MarkPrice("deribit", names[0], now, 0, 0.015, 0.55))
    assert book.quote_row(names[0])["mark_iv"] == 0.55  # type: ignore[index]
    assert book.apply(FeedStatus("deribit", "gap", 0, "", names[0]))
    assert math.isnan(book.quote_row(names[0])["bid"])  # type: ignore[index]
    assert not book.apply(FeedStatus("deribit", "disconnected", 0))
    assert (
        not book.apply(IndexPrice("deribit", "btc_usd", now, 0, 99_000.0))
        and book.index_price == 99_000.0
    )
    # listing refused: other underlying, already expired
    eth = parse_option("ETH-27DEC24-4000-C")
    assert eth is not None
    assert not book.apply(
        InstrumentListed(
            Instrument("deribit", eth.name, "ETH", eth.expiry, eth.expiry_ms, 4000.0, True)
        )
    )
    assert book.rejected["other_underlying"] == 1
    assert not book.apply(Quote("deribit", "BTC-PERPETUAL", now, 0))
    assert book.rejected["not_option"] == 1
    # a removed slot is reused
    assert book.apply(InstrumentExpired("deribit", names[5], now))
    assert book.apply(
        Quote("deribit", "BTC-27DEC24-200000-C", now, 0, bid=0.001, ask=0.002, forward=100_000.0)
    )
    assert book.slot("BTC-27DEC24-200000-C") == 5 and len(book) == 100
    snap = book.snapshot(now)
    assert snap.n_quotes == 99 and book.drops == Counter(empty=1)  # the gapped one


def test_quote_update_allocates_nothing() -> None:
    now = expiry_ms_of("27DEC24") - 86_400_000
    book = Book("deribit", "BTC", capacity=8)
    for k in range(8):
        book.apply(Quote("deribit", f"BTC-27DEC24-{100_000 + k}-C", now, 0, bid=0.01, ask=0.02))
    buf = book.buffer
    args = [
        (k, now + i, 0.01 + i * 1e-6, 1.0, 0.02, 1.0, 0.015, 0.5, 0.49, 0.51, 1e5, 0.5)
        for i, k in enumerate(list(range(8)) * 500)
    ]
    write = book.write_ticker
    tracemalloc.start()
    for a in args:
        write(*a)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert current < 1_000 and book.buffer is buf
    assert book.pending_changes() == 8  # every row moved since (no snapshot yet)
    book.snapshot(now + 4000)
    assert book.pending_changes() == 0
    write(*args[0][:2], 0.5, *args[0][3:])
    assert book.pending_changes() == 1


def test_books_route_by_underlying() -> None:
    lines = shared_file("raw/cryptofeed-DERIBIT.0").read_text().splitlines()
    books = Books()
    fast = FastPath(DeribitParser(), books)
    for ln in lines:
        if ln.startswith("https://"):
            for ev in fast.apply(ln.split(": ", 1)[1], 1626993723_000_000_000):
                assert not isinstance(ev, Quote)
    assert {(b.venue, b.underlying, len(b)) for b in books} == {
        ("deribit", "BTC", 390),
        ("deribit", "ETH", 418),
        ("deribit", "SOL", 172),
    }
    btc = books.get("deribit", "BTC")
    assert btc is not None and btc.inverse
    inst = next(i for i in btc.instruments() if i.name == "BTC-24SEP21-40000-P")
    assert inst.tick_size == 0.0005
    assert (
        books.on_event(IndexPrice("deribit", "btc_usd", 1, 0, 32_000.0)) is None
        and btc.index_price == 32_000.0
    )
    assert (
        books.on_event(Quote("deribit", "BTC-24SEP21-40000-P", 1626993723000, 0, bid=0.1, ask=0.2))
        is btc
    )
    assert (
        books.on_event(Quote("deribit", "ETH-PERPETUAL", 1, 0)) is None
        and books.rejected["not_option"] == 1
    )
    assert books.on_event(InstrumentExpired("deribit", "BTC-24SEP21-40000-P", 2)) is btc
    assert "BTC-24SEP21-40000-P" not in btc and "BTC-24SEP21-40000-P" not in books.routes("deribit")
    xrp = "XRP_USDC-24JAN25-0d625-C"
    usdc = books.on_event(Quote("deribit", xrp, 1626993723000, 0, bid=0.01, ask=0.02))
    assert usdc is not None and usdc.underlying == "XRP_USDC" and not usdc.inverse
    # a first sight with an implausible time (1 ms after 1970) lists nothing
    assert books.on_event(Quote("deribit", "XRP_USDC-24JAN25-1d0-C", 1, 0, bid=0.01)) is None
    assert usdc.rejected["bad_timestamp"] == 1 and len(usdc) == 1


# -- the parser into the books ---------------------------------------------------------------------


def received(path: Path) -> list[tuple[int, str]]:
    out = []
    for line in path.read_text().splitlines():
        m = _RECEIVED.match(line)
        if m:
            out.append((int(m.group(1)) * 10**9 + int(m.group(2).ljust(9, "0")[:9]), m.group(3)))
    return out


def assert_same(a: ChainSnapshot, b: ChainSnapshot, *, dirty: bool = True) -> None:
    assert a.instrument == b.instrument and a.expiries == b.expiries and a.ts_ms == b.ts_ms
    assert a.venue == b.venue and a.underlying == b.underlying and a.inverse == b.inverse
    fields = [
        "expiry_idx",
        "T",
        "forward",
        "strike",
        "is_call",
        "bid",
        "ask",
        "bid_size",
        "ask_size",
        "bid_iv",
        "ask_iv",
        "mark_iv",
        "mark_price",
        "venue_delta",
        "quote_ts_ms",
        "expiry_ms",
        "forwards",
    ]
    for field in fields + (["dirty"] if dirty else []):
        assert np.array_equal(getattr(a, field), getattr(b, field), equal_nan=True), field


def both_paths(frames: list[tuple[int, str]], **kw: float) -> tuple[Books, Books]:
    fused, event = Books(**kw), Books(**kw)  # type: ignore[arg-type]
    p1, p2 = DeribitParser(), DeribitParser()
    fast = FastPath(p1, fused)
    for ns, frame in frames:
        fast.apply(frame, ns)
        for ev in p2.parse(frame, ns):
            event.on_event(ev)
    assert p1.drops == p2.drops == Counter()
    return fused, event


def test_real_capture_into_books() -> None:
    frames = received(shared_file(CAPTURE))
    fused, event = both_paths(frames)
    p = DeribitParser()
    last: dict[str, Quote | BookTop] = {}
    for ns, frame in frames:
        for ev in p.parse(frame, ns):
            if isinstance(ev, Quote | BookTop):
                last[ev.instrument] = ev
    for under, n in (("BTC", 7), ("ETH", 3)):
        a, b = fused.get("deribit", under), event.get("deribit", under)
        assert a is not None and b is not None and len(a) == len(b) == n
        now = a.last_ts_ms()
        assert now == max(e.ts_ms for e in last.values() if e.instrument.startswith(under))
        sa, sb = a.snapshot(now), b.snapshot(now)
        assert_same(sa, sb)
        for i, name in enumerate(sa.instrument):  # the last word on each instrument wins
            ev = last[name]
            for got, want in ((sa.bid[i], ev.bid), (sa.ask[i], ev.ask)):
                assert (math.isnan(got) and math.isnan(want)) or got == want, name
    eth = fused.get("deribit", "ETH")
    assert eth is not None and eth.drops["empty"] == 1  # ETH-27AUG21-4000-P: no bid, no ask


@pytest.mark.skipif(not TOOL.exists(), reason=f"{TOOL} not available")
def test_fused_and_event_paths_give_identical_snapshots(tmp_path: Path) -> None:
    out = tmp_path / "chain.jsonl"
    subprocess.run(
        [
            sys.executable,
            str(TOOL),
            str(shared_file(CHAIN)),
            str(shared_file("chains/bottama-eth-2021-02-11.csv")),
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    frames = [(r["ts_ns"], r["frame"]) for r in recs]
    assert len(frames) == 976 + 996
    fused, event = both_paths(frames, stale_after_s=60.0)
    for under in ("BTC", "ETH"):
        a, b = fused.get("deribit", under), event.get("deribit", under)
        assert a is not None and b is not None
        now = a.last_ts_ms()
        for t in (now, now + 30_000, expiry_ms_of("12FEB21")):
            assert_same(a.snapshot(t), b.snapshot(t))
            assert a.drops == b.drops and a.one_sided == b.one_sided
        assert a.pending_changes() == b.pending_changes() == 0
    # and the tool's frames say what the CSV says
    again, _ = both_paths(frames, stale_after_s=1e9)
    btc = again.get("deribit", "BTC")
    assert btc is not None
    book, rows = chain_book(stale_after_s=1e9)
    now = max(int(r["timestamp"]) for r in rows)
    assert_same(btc.snapshot(now), book.snapshot(now))


def test_group_medians_equal_numpy_median_per_group() -> None:
    from streamer.book.snapkernel import group_medians

    rng = np.random.default_rng(3)
    ids = rng.integers(0, 9, 400)
    values = rng.normal(60_000.0, 50.0, 400)
    mask = rng.random(400) < 0.7
    out = group_medians(ids.astype(np.int64), values, mask, 11)
    for e in range(11):
        got = values[(ids == e) & mask]
        if got.size:
            assert out[e] == np.median(got)
        else:
            assert np.isnan(out[e])
    none = np.zeros(0, dtype=np.int64)
    assert np.isnan(group_medians(none, np.zeros(0), np.zeros(0, dtype=np.bool_), 3)).all()


def _numpy_filters(
    q: np.ndarray, prev_ts: np.ndarray, exp_ms: np.ndarray, exp_id: np.ndarray,
    strike: np.ndarray, is_call: np.ndarray, now_ms: int, skew_ms: float, stale_ms: float,
    max_spread: float, inverse: bool,
) -> tuple[list[str | None], int, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The snapshot's filters as the numpy expressions they were before they were compiled
    (an independent reference): the reason per row (None: kept), the new bad timestamps,
    the per-row forward, has_bid, has_ask; expiries without a good forward get none (the
    snapshot's parity fallback is not part of the kernels)."""
    from streamer.book import book as bk

    ts, bid, ask = q[:, bk.TS], q[:, bk.BID], q[:, bk.ASK]
    fwd = q[:, bk.FORWARD]
    why: list[str | None] = [None] * len(q)
    out = np.zeros(len(q), dtype=np.bool_)

    def drop(reason: str, mask: np.ndarray) -> None:
        for i in np.flatnonzero(mask & ~out).tolist():
            why[i] = reason
        out[mask] = True

    drop("no_quote", np.isnan(ts))
    bad = ~((ts >= bk.MIN_TS_MS) & (ts <= bk.MAX_TS_MS) & (ts <= now_ms + skew_ms)) & ~out
    drop("bad_timestamp", bad)
    new_bad = int((bad & (ts != prev_ts)).sum())
    drop("expiring", exp_ms[exp_id] <= now_ms)
    drop("stale", ts < now_ms - stale_ms)
    fresh = ~out
    drop("zero", (bid <= 0.0) | (ask <= 0.0))
    has_bid = ~np.isnan(bid) | (q[:, bk.BID_IV] > 0.0)
    has_ask = ~np.isnan(ask) | (q[:, bk.ASK_IV] > 0.0)
    drop("empty", ~has_bid & ~has_ask)
    drop("crossed", bid > ask)
    drop("wide_spread", q[:, bk.ASK_IV] - q[:, bk.BID_IV] > max_spread)
    with np.errstate(over="ignore", invalid="ignore"):
        sane = (fwd > strike / bk.FORWARD_RATIO_MAX) & (fwd < strike * bk.FORWARD_RATIO_MAX)
    good = fresh & sane
    by_id = np.full(len(exp_ms), np.nan)
    for e in range(len(exp_ms)):
        if (good & (exp_id == e)).any():
            by_id[e] = np.median(fwd[good & (exp_id == e)])
    slice_f = by_id[exp_id]
    drop("no_forward", np.isnan(slice_f))
    F = np.where(good, fwd, slice_f)
    with np.errstate(invalid="ignore", divide="ignore"):
        intrinsic = np.maximum(np.where(is_call, F - strike, strike - F), 0.0)
        if inverse:
            intrinsic = intrinsic / F
        level = np.where(has_bid, 0.5 * (bid + ask), ask)
        drop("below_intrinsic", level < intrinsic * (1.0 - bk.INTRINSIC_RTOL))
    return why, new_bad, F, has_bid, has_ask


def _compiled_filters(
    q: np.ndarray, prev_ts: np.ndarray, exp_ms: np.ndarray, exp_id: np.ndarray,
    strike: np.ndarray, is_call: np.ndarray, now_ms: int, skew_ms: float, stale_ms: float,
    max_spread: float, inverse: bool,
) -> tuple[list[str | None], int, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    from streamer.book import book as bk
    from streamer.book import snapkernel as sk

    m = len(q)
    reason = np.empty(m, dtype=np.int64)
    hb, ha, good = (np.empty(m, dtype=np.bool_) for _ in range(3))
    new_bad = sk.filter_rows(
        q, prev_ts, exp_ms, exp_id, strike, bk._KERNEL_COLS, float(bk.MIN_TS_MS),
        float(bk.MAX_TS_MS), now_ms + skew_ms, now_ms, now_ms - stale_ms, max_spread,
        bk.FORWARD_RATIO_MAX, reason, hb, ha, good,
    )  # fmt: skip
    by_id = sk.group_medians(exp_id, q[:, bk.FORWARD].copy(), good, len(exp_ms))
    F = np.empty(m)
    sk.finish_rows(
        q, exp_id, strike, is_call, by_id, good, hb, bk._KERNEL_COLS, inverse,
        bk.INTRINSIC_RTOL, reason, F,
    )  # fmt: skip
    why = [None if r < 0 else bk.DROP_REASONS[r] for r in reason.tolist()]
    return why, new_bad, F, hb, ha


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), inverse=st.booleans())
def test_compiled_filters_equal_their_numpy_expressions(seed: int, inverse: bool) -> None:
    """``snapkernel`` row by row against the numpy expressions it replaced, on rows with
    every kind of bad field (NaN, zero, negative, crossed, wide, far-off times and
    forwards, expired and stale quotes) in random proportions."""
    from streamer.book import book as bk

    rng = np.random.default_rng(seed)
    m, n_exp = int(rng.integers(1, 60)), int(rng.integers(1, 6))
    now = 1_767_600_000_000
    exp_ms = now + rng.integers(-3, 40, n_exp).astype(np.int64) * 86_400_000
    exp_id = rng.integers(0, n_exp, m).astype(np.int64)
    strike = rng.choice([50_000.0, 80_000.0, 90_000.0, 100_000.0, 3_000.0], m)
    is_call = rng.random(m) < 0.5
    q = np.full((m, bk.NCOL), np.nan)

    def messy(base: np.ndarray) -> np.ndarray:
        pick = rng.random(m)
        out = np.where(pick < 0.1, np.nan, base)
        out = np.where((pick >= 0.1) & (pick < 0.15), 0.0, out)
        return np.where((pick >= 0.15) & (pick < 0.18), -base, out)

    q[:, bk.TS] = messy(now - rng.choice([0.0, 5e3, 7e4, 1e6, -9e4, 3e9], m))
    q[:, bk.TS] = np.where(rng.random(m) < 0.05, now / 1000.0, q[:, bk.TS])  # seconds
    mid = rng.uniform(0.0001, 0.3, m)
    q[:, bk.BID] = messy(mid * rng.uniform(0.8, 1.0, m))
    q[:, bk.ASK] = messy(mid * rng.uniform(1.0, 1.2, m))
    q[:, bk.BID_IV] = messy(rng.uniform(0.3, 0.9, m))
    q[:, bk.ASK_IV] = q[:, bk.BID_IV] + messy(rng.uniform(0.0, 0.8, m))
    q[:, bk.FORWARD] = messy(rng.choice([90_000.0, 90_010.0, 1e308, 3_050.0, 0.001], m))
    prev_ts = np.where(rng.random(m) < 0.5, q[:, bk.TS], np.nan)
    args = (q, prev_ts, exp_ms, exp_id, strike, is_call, now, 60_000.0, 60_000.0, 0.5, inverse)
    want, got = _numpy_filters(*args), _compiled_filters(*args)
    assert got[0] == want[0] and got[1] == want[1]
    for g, w in zip(got[2:], want[2:], strict=True):
        assert np.array_equal(g, w, equal_nan=True)


def test_the_warm_up_loads_every_kernel_a_snapshot_calls() -> None:
    """After ``snapkernel.warm_up`` a book's snapshot compiles nothing more (its forwards
    are a strided column: a kernel of another layout would compile on the first live
    snapshot), in a fresh interpreter."""
    code = (
        "import itertools\n"
        "from streamer.book import snapkernel as sk\n"
        "from streamer.book.book import Books\n"
        "from streamer.feeds.deribit.parser import DeribitParser\n"
        "from streamer.daemon.replay import items_of\n"
        "sk.warm_up()\n"
        "fs = (sk.filter_rows, sk.group_medians, sk.finish_rows, sk.rows_changed)\n"
        "before = [len(f.signatures) for f in fs]\n"
        "p, b = DeribitParser(), Books()\n"
        f"rec = {str(REPO / 'replay_data' / 'calm.jsonl.zst')!r}\n"
        "for ts, item in itertools.islice(items_of([rec]), 3000):\n"
        "    for ev in p.parse(item, ts):\n"
        "        b.on_event(ev)\n"
        "for book in b:\n"
        "    book.snapshot()\n"
        "print(before, [len(f.signatures) for f in fs])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["[1,", "1,", "1,", "1]", "[1,", "1,", "1,", "1]"], run.stdout


def test_compiled_filters_equal_their_numpy_expressions_on_real_books() -> None:
    """The same on the rows of real books (the bundled recordings, every few thousand
    frames), where most quotes pass."""
    from streamer.book import book as bk
    from streamer.daemon.replay import items_of

    parser, books = DeribitParser(), Books()
    rows = 0
    for i, (ts_ns, item) in enumerate(items_of([str(REPO / "replay_data" / "calm.jsonl.zst")])):
        for ev in parser.parse(item, ts_ns) if isinstance(item, str | bytes) else [item]:
            books.on_event(ev)
        if i % 5_000 != 4_999:
            continue
        for book in books:
            live = np.flatnonzero(book._exp[: book._n] >= 0)
            now, _ = book.clock()
            args = (
                book._q[live], book._prev[live, bk.TS], np.array(book._exp_ms, dtype=np.int64),
                book._exp[live], book._strike[live], book._is_call[live], now, 60_000.0,
                book.stale_after_s * 1000.0, book.max_spread_iv, book.inverse,
            )  # fmt: skip
            want, got = _numpy_filters(*args), _compiled_filters(*args)
            assert got[0] == want[0] and got[1] == want[1]
            for g, w in zip(got[2:], want[2:], strict=True):
                assert np.array_equal(g, w, equal_nan=True)
            rows += len(live)
            book.snapshot()
        if i > 40_000:
            break
    assert rows > 5_000


# -- bad timestamps (issue 12, bug 1) -------------------------------------------------------------


def _quote(name: str, ts: int) -> Quote:
    """A two-sided quote at the money (its forward is its strike: no intrinsic value)."""
    opt = parse_option(name)
    assert opt is not None
    return Quote(
        "deribit", name, ts, 0, bid=0.01, ask=0.02, bid_size=1.0, ask_size=1.0, forward=opt.strike
    )


def test_one_ticker_in_microseconds_does_not_empty_the_book() -> None:
    """The issue's reproduction: two quotes, one with ``ts * 1000`` (a venue mapping slip),
    then fresh quotes: the book keeps serving both, and the bad one is counted."""
    now = expiry_ms_of("27DEC24") - 10 * 86_400_000
    a, b = "BTC-27DEC24-100000-C", "BTC-27DEC24-100000-P"
    book = Book("deribit", "BTC")
    assert book.apply(_quote(a, now)) and book.apply(_quote(b, now))
    book.apply(_quote(a, now * 1000))  # microseconds where milliseconds belong
    snap = book.snapshot()
    assert snap.instrument == (b,) and snap.ts_ms == now and book.drops["bad_timestamp"] == 1
    book.apply(_quote(a, now + 1_000))  # the same quotes, fresher: nothing to refit
    book.apply(_quote(b, now + 1_000))
    snap = book.snapshot()
    assert snap.instrument == (a, b) and snap.ts_ms == now + 1_000
    assert book.rejected == Counter(bad_timestamp=1) and not book.drops["bad_timestamp"]
    # a first sight in microseconds lists nothing
    assert not book.apply(_quote("BTC-27DEC24-104000-C", now * 1000))
    assert book.rejected == Counter(bad_timestamp=2) and len(book) == 2


def test_bad_timestamp_on_the_fused_path_neither_moves_the_clock_nor_expires() -> None:
    """A row written without ``apply`` (the fused ticker path) with a timestamp far ahead of
    the others: it leaves the snapshot (``bad_timestamp``) and the clock stays with the rest."""
    now = expiry_ms_of("27DEC24") - 2 * 3_600_000  # two hours before a settlement
    names = [f"BTC-27DEC24-{k}-C" for k in range(90_000, 110_000, 2_000)]
    book = Book("deribit", "BTC")
    for i, n in enumerate(names):
        book.apply(_quote(n, now + i))
    slot = book.slot(names[3])
    assert slot is not None
    for bad in (now + 86_400_000, now * 1000, now // 1000):  # a day ahead, in us, in s
        book.write_ticker(slot, bad, 0.01, 1.0, 0.02, 1.0, 0.015, NAN, NAN, NAN, 96e3, 0.5)
        snap = book.snapshot()
        assert snap.ts_ms == now + len(names) - 1, bad
        assert len(book) == len(names) and book.drops["bad_timestamp"] == 1
        assert names[3] not in snap.instrument and snap.n_quotes == len(names) - 1
    book.snapshot()  # the same bad row again: excluded again, counted once
    assert book.drops["bad_timestamp"] == 1 and book.rejected == Counter(bad_timestamp=3)
    book.write_ticker(slot, now + 5, 0.01, 1.0, 0.02, 1.0, 0.015, NAN, NAN, NAN, 96e3, 0.5)
    assert names[3] in book.snapshot().instrument and not book.drops["bad_timestamp"]


def test_expiry_settles_only_when_the_quotes_say_so() -> None:
    """A few quotes past a settlement (wrong clocks) do not settle it; once half the book's
    quotes say so, the expiry goes, and for good. Until then its quotes are only dropped."""
    first = expiry_ms_of("27DEC24")
    near = [f"BTC-27DEC24-{k}-C" for k in range(90_000, 110_000, 2_000)]
    far = [f"BTC-31JAN25-{k}-C" for k in range(90_000, 120_000, 2_000)]
    book = Book("deribit", "BTC")
    t0 = first - 30_000
    for n in near + far:
        book.apply(_quote(n, t0))
    # three quotes 10 s past the settlement (inside max_skew of the rest): "now" moves, the
    # settlement clock does not; the expiry's quotes are "expiring", nothing is removed
    for n in far[:3]:
        book.apply(_quote(n, first + 10_000))
    snap = book.snapshot()
    assert snap.ts_ms == first + 10_000 and book.settled_ms == t0
    assert len(book) == len(near) + len(far) and "27DEC24" not in snap.expiries
    assert book.drops["expiring"] == len(near) and snap.n_quotes == len(far)
    assert (snap.T > 0).all()
    # the rest of the far expiry's quotes arrive past the settlement: now it settles
    for n in far[3:]:
        book.apply(_quote(n, first + 20_000))
    snap = book.snapshot()
    assert book.settled_ms == first + 10_000 and len(book) == len(far)  # the median quote
    assert snap.expiries == ("31JAN25",) and book.drops["expiring"] == 0
    # settled names never come back: not by a listing, not by a (late) quote
    opt = parse_option(near[0])
    assert opt is not None
    assert book.add_option(opt) is None and not book.apply(_quote(near[0], t0 + 1))
    assert book.rejected["expired"] == 2 and book.relisted == 0
    assert not book._expired  # settled names are not remembered (bounded)


def test_a_wrongly_removed_instrument_can_be_relisted() -> None:
    now = expiry_ms_of("27DEC24") - 86_400_000
    a, b = "BTC-27DEC24-100000-C", "BTC-27DEC24-102000-C"
    book = Book("deribit", "BTC")
    book.apply(_quote(a, now))
    book.apply(_quote(b, now))
    assert book.apply(InstrumentExpired("deribit", a, now + 1_000))  # a wrong delisting
    assert a not in book
    assert not book.apply(_quote(a, now + 500))  # a late quote: still refused
    assert book.rejected["expired"] == 1
    assert book.apply(_quote(a, now + 2_000))  # traded after its removal: back
    assert a in book and book.relisted == 1
    assert book.apply(InstrumentExpired("deribit", b, now + 1_000))
    opt = parse_option(b)
    assert opt is not None
    listed = Instrument("deribit", b, "BTC", opt.expiry, opt.expiry_ms, opt.strike, True)
    book.apply(InstrumentListed(listed))  # the venue lists it again
    assert b in book and book.relisted == 2
    book.apply(_quote(b, now + 3_000))
    assert book.snapshot().instrument == (a, b)


def test_the_clock_follows_the_whole_book_forward_after_a_gap() -> None:
    """A feed gap: every quote jumps forward by an hour. Without a receive clock the first of
    the new quotes are held back (they could be wrong) until half the book has moved; with
    one (the newest frame's receive time, what the pipeline passes), they count at once."""
    now = expiry_ms_of("27DEC24") - 86_400_000
    names = [f"BTC-27DEC24-{k}-{cp}" for k in range(80_000, 120_000, 1_000) for cp in "CP"]
    later = now + 3_600_000
    book, fresh = Book("deribit", "BTC"), Book("deribit", "BTC")
    for b in (book, fresh):
        for n in names:
            b.apply(_quote(n, now))
        for n in names[:3]:
            b.apply(_quote(n, later))
    assert book.snapshot().ts_ms == now and book.drops["bad_timestamp"] == 3
    snap = fresh.snapshot(recv_ms=later + 20)
    assert snap.ts_ms == later and snap.n_quotes == 3 and fresh.drops["stale"] == len(names) - 3
    for n in names[3:39]:
        book.apply(_quote(n, later))
    assert book.snapshot().ts_ms == now and book.drops["bad_timestamp"] == 39
    book.apply(_quote(names[39], later))  # 40 of 80: the (upper) median moves
    snap = book.snapshot()
    assert snap.ts_ms == later and snap.n_quotes == 40
    assert book.drops["stale"] == len(names) - 40 and not book.drops["bad_timestamp"]


@pytest.mark.skipif(not TOOL.exists(), reason=f"{TOOL} not available")
def test_three_tickers_in_microseconds_in_a_real_hourly_chain(tmp_path: Path) -> None:
    """The issue's real-chain case: the first two hourly BTC cuts of 2025-09-01 (13 expiries)
    through the fused path, snapshots taken every 50 frames as a refit trigger would, three
    tickers of the first hour sent again with their timestamp in microseconds. The book at
    the end of the second hour is the clean run's, and only the bad tickers were refused.
    (Before the fix: 628 quotes refused as ``expired``, 5 of 13 expiries left.)"""
    out = tmp_path / "hourly.jsonl"
    csv_path = shared_file("smiles/tardis-hourly-2025-09.csv")
    cmd = [sys.executable, str(TOOL), str(csv_path), "-o", str(out), "--underlying", "BTC"]
    subprocess.run(cmd, check=True, capture_output=True)
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    t0 = recs[0]["ts_ns"]
    frames = [(r["ts_ns"], r["frame"]) for r in recs if r["ts_ns"] < t0 + 2 * 3_600 * 10**9]
    bad = []
    for i in (100, 200, 300):  # inside the first hour's cut (about 760 frames)
        msg = orjson.loads(frames[i][1])
        msg["params"]["data"]["timestamp"] *= 1000
        bad.append((i, (frames[i][0], orjson.dumps(msg).decode())))
    dirty = list(frames)
    for i, frame in reversed(bad):
        dirty.insert(i + 1, frame)

    def run(items: list[tuple[int, str]]) -> tuple[Book, ChainSnapshot, int]:
        books = Books(stale_after_s=3_600.0)
        fast = FastPath(DeribitParser(), books)
        dropped = 0
        for k, (ns, frame) in enumerate(items):
            fast.apply(frame, ns)
            if k % 50 == 49:
                b = books.get("deribit", "BTC")
                assert b is not None
                b.snapshot(recv_ms=ns // 1_000_000)
                dropped += b.drops["bad_timestamp"]
        b = books.get("deribit", "BTC")
        assert b is not None
        return b, b.snapshot(recv_ms=items[-1][0] // 1_000_000), dropped

    clean, want, clean_dropped = run(frames)
    book, got, dropped = run(dirty)
    assert len(want.expiries) == 13 and clean_dropped == 0
    assert_same(got, want, dirty=False)
    assert len(book) == len(clean) and book.relisted == 0
    # the bad rows were seen, left out (each counted once), and overwritten by the next cut
    assert dropped >= 1 and book.rejected == Counter(bad_timestamp=3)


def test_a_quote_changes_the_book_only_when_its_sides_or_ivs_move() -> None:
    """What triggers refits: a re-sent ticker with the same sides and IVs (only its time,
    mark and forward new, as Deribit sends every 100 ms) changes nothing; a new bid, ask,
    size or bid/ask IV does; an empty side stays empty (NaN equals NaN)."""
    now = expiry_ms_of("27DEC24") - 10 * 86_400_000
    book = Book("deribit", "BTC")
    name = "BTC-27DEC24-100000-C"
    base = Quote(
        "deribit", name, now, 0, bid=0.01, bid_size=1.0, ask=math.nan, ask_size=math.nan,
        mark_price=0.015, mark_iv=0.6, bid_iv=0.55, ask_iv=math.nan, forward=100_000.0,
    )  # fmt: skip
    assert book.apply(base)  # first sight
    assert not book.apply(replace(base, ts_ms=now + 100, mark_price=0.016, forward=100_050.0))
    assert book.quote_row(name)["ts_ms"] == now + 100  # type: ignore[index]  # still fresher
    moves = (
        replace(base, bid=0.011),
        replace(base, bid_size=2.0),
        replace(base, ask=0.02),
        replace(base, bid_iv=0.56),
    )
    for moved in moves:
        assert book.apply(moved), moved
        assert not book.apply(moved), moved
        assert book.apply(base)
