"""Read Tardis ``options_chain`` CSV(.gz) files as normalized feed events.

Tardis.dev's ``options_chain`` data type (one row per ticker update; docs "Downloadable CSV
files", data type ``options_chain``) has the columns::

    exchange, symbol, timestamp, local_timestamp, type, strike_price, expiration,
    open_interest, last_price, bid_price, bid_amount, bid_iv, ask_price, ask_amount, ask_iv,
    mark_price, mark_iv, underlying_index, underlying_price, delta, gamma, vega, theta, rho

``timestamp`` (exchange time), ``local_timestamp`` (Tardis' receive time) and ``expiration``
are µs since the epoch; IVs are the venue's percent (Deribit ``mark_iv: 62.34``); prices are
in the venue's premium unit (coin for Deribit BTC/ETH). The project's hourly cut of such files
(``shared/data/deribit/smiles/tardis-hourly-*.csv``) keeps fewer, renamed columns::

    ts_us, asset, expiry_us, strike, opt_type, mark_iv, bid_iv, ask_iv, mark_price,
    underlying_price, delta, open_interest

(no symbol, no bid/ask prices or sizes, no local time, lower-case ``asset``); both layouts are
read, any column but the identifying ones may be absent (its fields become NaN). Without a
``symbol`` column the Deribit name is built from the others (``BTC-27DEC24-100000-C``, ``d`` as
decimal point), as ``shared/tools/csv_to_replay.py`` does.

``read_tardis_options_chain(path)`` yields ``(recv_ns, event)``: an ``InstrumentListed`` the
first time a symbol is seen, then a ``Quote`` per row, in file order (Tardis files are ordered
by ``local_timestamp``; the hourly cut is not, see ``sorted_by_time``). ``recv_ns`` is
``local_timestamp`` (``timestamp`` where absent) in ns; ``Quote.ts_ms`` is ``timestamp`` in ms.
Conventions (``streamer.feeds.events``): IVs become fractions; a zero or empty bid/ask price
(or amount) empties that side (price, size and IV NaN); a zero or empty IV is NaN; Deribit's
cap values (``ask_iv`` 999 on far ask quotes) are kept as sent, the book filters them. Rows with
an unusable identifying field or a malformed number are skipped and counted in
``TardisStats.skipped`` by reason (``bad_timestamp``, ``bad_strike_price``, ``bad_ask_iv``, ...).
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import structlog

from streamer.errors import InputError
from streamer.events import Event, Instrument, InstrumentListed, Quote
from streamer.instruments import expiry_code_of, parse_option

log = structlog.get_logger(__name__)

NAN = math.nan

TARDIS_COLUMNS = (
    "exchange",
    "symbol",
    "timestamp",
    "local_timestamp",
    "type",
    "strike_price",
    "expiration",
    "open_interest",
    "last_price",
    "bid_price",
    "bid_amount",
    "bid_iv",
    "ask_price",
    "ask_amount",
    "ask_iv",
    "mark_price",
    "mark_iv",
    "underlying_index",
    "underlying_price",
    "delta",
    "gamma",
    "vega",
    "theta",
    "rho",
)

# hourly-cut name -> Tardis name
ALIASES: dict[str, str] = {
    "ts_us": "timestamp",
    "expiry_us": "expiration",
    "strike": "strike_price",
    "opt_type": "type",
}

# Tardis ``exchange`` ids -> our venue names
VENUES: dict[str, str] = {
    "deribit": "deribit",
    "okex-options": "okx",
    "binance-options": "binance",
    "binance-european-options": "binance",
    "bybit-options": "bybit",
    "huobi-dm-options": "huobi",
}

NUMERIC = (
    "open_interest",
    "bid_price",
    "bid_amount",
    "bid_iv",
    "ask_price",
    "ask_amount",
    "ask_iv",
    "mark_price",
    "mark_iv",
    "underlying_price",
    "delta",
    "gamma",
    "vega",
    "theta",
    "rho",
)
NONNEGATIVE = frozenset(NUMERIC) - {"delta", "theta", "rho", "gamma", "vega"}


@dataclass(slots=True)
class TardisStats:
    """Counts of a read: rows seen, quotes and listings emitted, rows skipped by reason, and
    the optional columns the file lacks."""

    rows: int = 0
    quotes: int = 0
    instruments: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    missing_columns: tuple[str, ...] = ()


class _BadRowError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _open_text(path: str | os.PathLike[str]) -> io.TextIOBase:
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    if gz:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _int_us(text: str | None, reason: str) -> int:
    if text is None or text == "":
        raise _BadRowError(reason)
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise _BadRowError(reason) from None
        if not math.isfinite(value):
            raise _BadRowError(reason) from None
        return int(value)


def _num(row: dict[str, str], col: str) -> float:
    text = row.get(col)
    if text is None or text == "":
        return NAN
    try:
        value = float(text)
    except ValueError:
        raise _BadRowError(f"bad_{col}") from None
    if not math.isfinite(value) or (col in NONNEGATIVE and value < 0):
        raise _BadRowError(f"bad_{col}")
    return value


def _strike_text(strike: float) -> str:
    return str(int(strike)) if strike.is_integer() else repr(strike).replace(".", "d")


def _positive_or_nan(x: float) -> float:
    return x if x > 0 else NAN


class _Reader:
    def __init__(self, columns: Iterable[str], venue: str | None, path: str) -> None:
        cols = set(columns)
        self.path = path
        self.venue = venue
        self.has_symbol = "symbol" in cols
        if "timestamp" not in cols and "local_timestamp" not in cols:
            raise InputError("path", f"{path}: no timestamp/local_timestamp (or ts_us) column")
        if not self.has_symbol:
            need = {"asset", "expiration", "strike_price", "type"} - cols
            if need:
                raise InputError(
                    "path", f"{path}: no symbol column and cannot build one: {sorted(need)} missing"
                )
        self.has_bid_price = "bid_price" in cols
        self.has_ask_price = "ask_price" in cols
        self.missing = tuple(c for c in TARDIS_COLUMNS if c not in cols)
        self.seen: set[str] = set()

    def instrument(self, row: dict[str, str], venue: str) -> Instrument:
        kind = (row.get("type") or "").strip().lower()
        is_call_col: bool | None = {"call": True, "c": True, "put": False, "p": False}.get(kind)
        if kind and is_call_col is None:
            raise _BadRowError("bad_type")
        strike_col = _num(row, "strike_price") if row.get("strike_price") else NAN
        if not (math.isnan(strike_col) or strike_col > 0):
            raise _BadRowError("bad_strike_price")
        exp_us = _int_us(row["expiration"], "bad_expiration") if row.get("expiration") else None
        if self.has_symbol:
            name = (row.get("symbol") or "").strip()
            if not name:
                raise _BadRowError("bad_symbol")
        else:
            asset = (row.get("asset") or "").strip().upper()
            if not asset:
                raise _BadRowError("bad_asset")
            if exp_us is None:
                raise _BadRowError("bad_expiration")
            if not strike_col > 0:
                raise _BadRowError("bad_strike_price")
            if is_call_col is None:
                raise _BadRowError("bad_type")
            code = expiry_code_of(exp_us // 1000)
            name = f"{asset}-{code}-{_strike_text(strike_col)}-{'C' if is_call_col else 'P'}"
        parsed = parse_option(name)
        if parsed is not None:
            if is_call_col is not None and is_call_col != parsed.is_call:
                raise _BadRowError("inconsistent_type")
            if (
                not math.isnan(strike_col)
                and abs(strike_col - parsed.strike) > 1e-9 * parsed.strike
            ):
                raise _BadRowError("inconsistent_strike")
            expiry_ms = exp_us // 1000 if exp_us is not None else parsed.expiry_ms
            underlying, expiry, strike = parsed.underlying, parsed.expiry, parsed.strike
            is_call = parsed.is_call
        else:  # another venue's naming: trust the columns
            if exp_us is None:
                raise _BadRowError("bad_expiration")
            if not strike_col > 0:
                raise _BadRowError("bad_strike_price")
            if is_call_col is None:
                raise _BadRowError("bad_type")
            expiry_ms = exp_us // 1000
            underlying = name.split("-", 1)[0]
            expiry, strike, is_call = expiry_code_of(expiry_ms), strike_col, is_call_col
        inverse = venue in {"deribit", "okx"} and "_" not in underlying
        return Instrument(
            venue=venue,
            name=name,
            underlying=underlying,
            expiry=expiry,
            expiry_ms=expiry_ms,
            strike=strike,
            is_call=is_call,
            inverse=inverse,
        )

    def parse(self, row: dict[str, str]) -> tuple[Instrument, Quote]:
        venue = self.venue or VENUES.get((row.get("exchange") or "deribit").strip(), "")
        if not venue:
            raise _BadRowError("unknown_exchange")
        ts_text = row.get("timestamp") or row.get("local_timestamp")
        ts_us = _int_us(ts_text, "bad_timestamp")
        local = row.get("local_timestamp")
        recv_us = _int_us(local, "bad_local_timestamp") if local else ts_us
        inst = self.instrument(row, venue)
        values = {c: _num(row, c) for c in NUMERIC}
        recv_ns = recv_us * 1000

        bid, bid_size, bid_iv = values["bid_price"], values["bid_amount"], values["bid_iv"]
        if self.has_bid_price and not (bid > 0 and bid_size != 0):
            bid, bid_size, bid_iv = NAN, NAN, NAN
        ask, ask_size, ask_iv = values["ask_price"], values["ask_amount"], values["ask_iv"]
        if self.has_ask_price and not (ask > 0 and ask_size != 0):
            ask, ask_size, ask_iv = NAN, NAN, NAN
        quote = Quote(
            venue=venue,
            instrument=inst.name,
            ts_ms=ts_us // 1000,
            recv_ns=recv_ns,
            bid=bid,
            bid_size=bid_size,
            ask=ask,
            ask_size=ask_size,
            mark_price=values["mark_price"],
            mark_iv=_positive_or_nan(values["mark_iv"]) / 100.0,
            bid_iv=_positive_or_nan(bid_iv) / 100.0,
            ask_iv=_positive_or_nan(ask_iv) / 100.0,
            forward=_positive_or_nan(values["underlying_price"]),
            forward_index=(row.get("underlying_index") or "").strip(),
            delta=values["delta"],
            gamma=values["gamma"],
            vega=values["vega"],
            theta=values["theta"],
            rho=values["rho"],
            open_interest=values["open_interest"],
        )
        return inst, quote


def read_tardis_options_chain(
    path: str | os.PathLike[str],
    *,
    venue: str | None = "deribit",
    underlyings: Iterable[str] | None = None,
    stats: TardisStats | None = None,
) -> Iterator[tuple[int, Event]]:
    """Yield ``(recv_ns, event)`` from one ``options_chain`` CSV or CSV.gz (see module doc).

    Args:
        path: the file; gzip is recognised by its magic bytes.
        venue: the venue of every event; None takes it from the ``exchange`` column
            (``VENUES`` maps Tardis ids, unknown ids are skipped as ``unknown_exchange``).
        underlyings: keep only these (``{"BTC"}``); matched against the instrument's underlying.
        stats: filled in as rows are read.

    Raises:
        InputError: the header lacks the columns that identify a row (a time, and a symbol or
            the asset/expiration/strike/type to build one). Bad rows never raise.
    """
    st = stats if stats is not None else TardisStats()
    keep = None if underlyings is None else {u.upper() for u in underlyings}
    name = os.fspath(path)
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        header = [ALIASES.get(c.strip(), c.strip()) for c in reader.fieldnames or ()]
        reader.fieldnames = header
        rd = _Reader(header, venue, name)
        st.missing_columns = rd.missing
        if rd.missing:
            log.info("tardis_missing_columns", path=name, columns=list(rd.missing))
        for line_no, row in enumerate(reader, start=2):
            st.rows += 1
            if None in row:  # more cells than header names
                st.skipped["extra_cells"] += 1
                continue
            try:
                inst, quote = rd.parse(row)
            except _BadRowError as bad:
                st.skipped[bad.reason] += 1
                if st.skipped[bad.reason] <= 3:
                    log.warning("tardis_bad_row", path=name, line=line_no, reason=bad.reason)
                continue
            if keep is not None and inst.underlying.upper() not in keep:
                st.skipped["other_underlying"] += 1
                continue
            if inst.name not in rd.seen:
                rd.seen.add(inst.name)
                st.instruments += 1
                yield quote.recv_ns, InstrumentListed(inst, quote.recv_ns)
            st.quotes += 1
            yield quote.recv_ns, quote


def sorted_by_time(events: Iterable[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """Events in ``recv_ns`` order (stable), each ``InstrumentListed`` moved to just before its
    instrument's first quote. For files not already in time order (the hourly cut); loads all."""
    listings: dict[str, Instrument] = {}
    quotes: list[tuple[int, Event]] = []
    for t, e in events:
        if isinstance(e, InstrumentListed):
            listings.setdefault(e.instrument.name, e.instrument)
        else:
            quotes.append((t, e))
    quotes.sort(key=lambda te: te[0])
    out: list[tuple[int, Event]] = []
    for t, e in quotes:
        if isinstance(e, Quote) and e.instrument in listings:
            out.append((t, InstrumentListed(listings.pop(e.instrument), t)))
        out.append((t, e))
    return out
