"""Tardis ``options_chain`` reader: the real hourly cuts (counts against an independent csv
count, spot-checked rows) and a synthetic file in the full Tardis column layout."""

from __future__ import annotations

import csv
import gzip
import math
import random
from pathlib import Path

import pytest

from streamer.errors import InputError
from streamer.events import Event, InstrumentListed, Quote
from streamer.feeds.recordings.tardis import TardisStats, read_tardis_options_chain, sorted_by_time
from tests.conftest import shared_file

MONTHS = ("2024-05", "2025-01", "2025-09")


def smiles(month: str) -> Path:
    return shared_file(f"smiles/tardis-hourly-{month}.csv")


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def quotes_of(events: list[tuple[int, Event]]) -> list[Quote]:
    return [e for _, e in events if isinstance(e, Quote)]


@pytest.mark.parametrize("month", MONTHS)
def test_real_hourly_file_counts_match_an_independent_count(month: str) -> None:
    path = smiles(month)
    rows = csv_rows(path)
    stats = TardisStats()
    events = list(read_tardis_options_chain(path, stats=stats))
    quotes = quotes_of(events)
    listings = [e for _, e in events if isinstance(e, InstrumentListed)]
    contracts = {(r["asset"], r["expiry_us"], r["strike"], r["opt_type"]) for r in rows}
    assert len(quotes) == len(rows) == stats.quotes == stats.rows
    assert len(listings) == len(contracts) == stats.instruments
    assert not stats.skipped
    assert "symbol" in stats.missing_columns and "bid_price" in stats.missing_columns
    # every listing comes before the first quote of its instrument, exactly once
    seen: set[str] = set()
    for _, e in events:
        if isinstance(e, InstrumentListed):
            assert e.instrument.name not in seen
            seen.add(e.instrument.name)
        else:
            assert isinstance(e, Quote)
            assert e.instrument in seen
    # one quote per row, in file order: compare a random sample field by field
    rng = random.Random(month)
    instruments = {e.instrument.name: e.instrument for e in listings}
    for i in rng.sample(range(len(rows)), 300):
        r, q = rows[i], quotes[i]
        inst = instruments[q.instrument]
        assert q.venue == "deribit"
        assert inst.underlying == r["asset"].upper()
        assert inst.expiry_ms == int(r["expiry_us"]) // 1000
        assert inst.strike == float(r["strike"])
        assert inst.is_call == (r["opt_type"] == "call")
        assert q.ts_ms == int(r["ts_us"]) // 1000
        assert q.recv_ns == int(r["ts_us"]) * 1000
        assert q.mark_iv == pytest.approx(float(r["mark_iv"]) / 100, rel=1e-12)
        for col, got in (("bid_iv", q.bid_iv), ("ask_iv", q.ask_iv)):
            if r[col] == "":
                assert math.isnan(got)
            else:
                assert got == pytest.approx(float(r[col]) / 100, rel=1e-12)
        assert q.forward == float(r["underlying_price"])
        assert q.delta == float(r["delta"])
        assert q.open_interest == float(r["open_interest"])
        assert q.mark_price == float(r["mark_price"])
        # no prices or sizes in the hourly cut: NaN, not invented
        assert math.isnan(q.bid) and math.isnan(q.ask) and math.isnan(q.bid_size)
        assert math.isnan(q.gamma)


def test_real_rows_spot_checked_by_hand() -> None:
    events = list(read_tardis_options_chain(smiles("2025-01")))
    quotes = quotes_of(events)
    # line 2: 1735693199241000,btc,1740729600000000,115000,call,62.34,62.03,62.78,0.0374,
    #         96091.96,0.27545,145.1          (expiry 1740729600 = 2025-02-28 08:00 UTC)
    listed = events[0][1]
    assert isinstance(listed, InstrumentListed)
    assert listed.instrument.name == "BTC-28FEB25-115000-C"
    assert listed.instrument.expiry == "28FEB25"
    assert listed.instrument.inverse
    q = quotes[0]
    assert (q.instrument, q.ts_ms, q.recv_ns) == (
        "BTC-28FEB25-115000-C",
        1_735_693_199_241,
        1_735_693_199_241_000_000,
    )
    assert (q.mark_iv, q.bid_iv, q.ask_iv) == pytest.approx((0.6234, 0.6203, 0.6278))
    assert (q.mark_price, q.forward, q.delta, q.open_interest) == (0.0374, 96091.96, 0.27545, 145.1)
    # line 5078: 1735703995333000,eth,1735718400000000,3800,put,108.97,,999.0,0.1351,3347.6601,
    #            -1.0,0.0   (empty bid IV; Deribit's 999 ask-IV cap kept as sent)
    q = quotes[5076]
    assert q.instrument == "ETH-1JAN25-3800-P"
    assert math.isnan(q.bid_iv)
    assert q.ask_iv == pytest.approx(9.99)
    assert q.mark_iv == pytest.approx(1.0897)
    assert (q.delta, q.open_interest) == (-1.0, 0.0)


def test_underlying_filter_and_time_sort() -> None:
    path = smiles("2025-09")
    rows = csv_rows(path)
    stats = TardisStats()
    btc = list(read_tardis_options_chain(path, underlyings=["btc"], stats=stats))
    assert len(quotes_of(btc)) == sum(r["asset"] == "btc" for r in rows)
    assert stats.skipped["other_underlying"] == sum(r["asset"] == "eth" for r in rows)
    assert all(q.instrument.startswith("BTC-") for q in quotes_of(btc))
    ordered = sorted_by_time(btc)
    times = [t for t, _ in ordered]
    assert times == sorted(times)
    assert times != [t for t, _ in btc]  # the cut is not in time order to begin with
    assert sorted(map(id, quotes_of(ordered))) == sorted(map(id, quotes_of(btc)))
    listed: set[str] = set()
    for t, e in ordered:
        if isinstance(e, InstrumentListed):
            listed.add(e.instrument.name)
            assert e.recv_ns == t
        else:
            assert isinstance(e, Quote)
            assert e.instrument in listed


# -- the full Tardis layout, synthetic --------------------------------------------------------

HEADER = (
    "exchange,symbol,timestamp,local_timestamp,type,strike_price,expiration,open_interest,"
    "last_price,bid_price,bid_amount,bid_iv,ask_price,ask_amount,ask_iv,mark_price,mark_iv,"
    "underlying_index,underlying_price,delta,gamma,vega,theta,rho"
)
EXP_US = "1735286400000000"  # 2024-12-27 08:00 UTC
GOOD = (
    "deribit,BTC-27DEC24-100000-C,1733011200000000,1733011200123456,call,100000,"
    f"{EXP_US},120.5,0.05,0.0495,12.5,55.1,0.0505,3.1,56.2,0.05,55.6,BTC-27DEC24,"
    "97000.5,0.43,0.00002,95.1,-80.2,20.3"
)


def _synthetic(tmp_path: Path, lines: list[str], gz: bool = True) -> Path:
    text = "\n".join([HEADER, *lines]) + "\n"
    path = tmp_path / ("chain.csv.gz" if gz else "chain.csv")
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _row(**changes: str) -> str:
    cells = dict(zip(HEADER.split(","), GOOD.split(","), strict=True))
    cells.update(changes)
    return ",".join(cells.values())


def test_full_tardis_layout_gzip(tmp_path: Path) -> None:
    lines = [
        GOOD,
        _row(bid_price="", bid_amount="", bid_iv=""),  # no bid
        _row(ask_price="0", ask_amount="0", ask_iv="0"),  # Deribit's zero = no ask
        _row(bid_amount="0"),  # a price with nothing behind it: no bid either
        _row(timestamp="abc", local_timestamp=""),
        _row(strike_price="-5"),
        _row(mark_iv="nan"),
        _row(ask_iv="-3"),
        _row(type="call", symbol="BTC-27DEC24-100000-P"),
        _row(symbol="BTC-27DEC24-90000-C", strike_price="90000", local_timestamp=""),
        _row(type="straddle"),
        _row(symbol=""),
        GOOD + ",extra",
    ]
    stats = TardisStats()
    events = list(read_tardis_options_chain(_synthetic(tmp_path, lines), stats=stats))
    assert stats.rows == len(lines)
    assert dict(stats.skipped) == {
        "bad_timestamp": 1,
        "bad_strike_price": 1,
        "bad_mark_iv": 1,
        "bad_ask_iv": 1,
        "inconsistent_type": 1,
        "bad_type": 1,
        "bad_symbol": 1,
        "extra_cells": 1,
    }
    assert stats.missing_columns == ()
    kinds = [type(e).__name__ for _, e in events]
    assert kinds == ["InstrumentListed", *["Quote"] * 4, "InstrumentListed", "Quote"]
    listed = events[0][1]
    assert isinstance(listed, InstrumentListed)
    inst = listed.instrument
    assert (inst.name, inst.underlying, inst.expiry, inst.strike, inst.is_call) == (
        "BTC-27DEC24-100000-C",
        "BTC",
        "27DEC24",
        100000.0,
        True,
    )
    assert inst.expiry_ms == 1_735_286_400_000
    q0, q1, q2, q3 = quotes_of(events)[:4]
    assert q0.recv_ns == 1_733_011_200_123_456_000  # local_timestamp
    assert q0.ts_ms == 1_733_011_200_000  # timestamp
    assert (q0.bid, q0.bid_size, q0.ask, q0.ask_size) == (0.0495, 12.5, 0.0505, 3.1)
    assert (q0.bid_iv, q0.ask_iv, q0.mark_iv) == pytest.approx((0.551, 0.562, 0.556))
    assert (q0.forward, q0.forward_index) == (97000.5, "BTC-27DEC24")
    assert (q0.delta, q0.gamma, q0.vega, q0.theta, q0.rho) == (0.43, 0.00002, 95.1, -80.2, 20.3)
    assert q0.open_interest == 120.5
    assert math.isnan(q1.bid) and math.isnan(q1.bid_size) and math.isnan(q1.bid_iv)
    assert q1.ask == 0.0505
    assert math.isnan(q2.ask) and math.isnan(q2.ask_size) and math.isnan(q2.ask_iv)
    assert math.isnan(q3.bid) and math.isnan(q3.bid_iv) and q3.ask == 0.0505
    q_last = quotes_of(events)[-1]
    assert q_last.instrument == "BTC-27DEC24-90000-C"
    assert q_last.recv_ns == 1_733_011_200_000_000_000  # no local time: exchange time


def test_exchange_column_and_other_venue_names(tmp_path: Path) -> None:
    okx = _row(
        exchange="okex-options",
        symbol="BTC-USD-241227-100000-C",
        bid_price="0.0495",
    )
    lines = [okx, _row(exchange="mystery-venue")]
    stats = TardisStats()
    events = list(read_tardis_options_chain(_synthetic(tmp_path, lines), venue=None, stats=stats))
    assert stats.skipped == {"unknown_exchange": 1}
    listed = events[0][1]
    assert isinstance(listed, InstrumentListed)
    inst = listed.instrument
    assert (inst.venue, inst.name, inst.underlying, inst.expiry, inst.strike) == (
        "okx",
        "BTC-USD-241227-100000-C",
        "BTC",
        "27DEC24",
        100000.0,
    )
    assert inst.expiry_ms == 1_735_286_400_000


def test_header_without_identifying_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("symbol,mark_iv\nBTC-27DEC24-100000-C,50\n")
    with pytest.raises(InputError, match="timestamp"):
        list(read_tardis_options_chain(path))
    path.write_text("ts_us,asset,strike,mark_iv\n1,btc,5,50\n")
    with pytest.raises(InputError, match="expiration"):
        list(read_tardis_options_chain(path))


def test_minimal_columns_give_nan_fields(tmp_path: Path) -> None:
    path = tmp_path / "min.csv"
    path.write_text("symbol,timestamp\nETH-7FEB25-3000-P,1735693199241000\n")
    stats = TardisStats()
    events = list(read_tardis_options_chain(path, stats=stats))
    assert len(events) == 2
    q = events[1][1]
    assert isinstance(q, Quote)
    assert q.instrument == "ETH-7FEB25-3000-P"
    assert all(math.isnan(x) for x in (q.bid, q.ask, q.mark_iv, q.forward, q.delta))
    assert "mark_iv" in stats.missing_columns
