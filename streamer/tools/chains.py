"""Whole-chain CSV files -> ``ChainSnapshot`` lists (for benchmarks, reports and tests).

Reads the three real Deribit chain formats (DESIGN section 6) straight into snapshots, without
the feed path: ``get_order_book`` dumps (``chains/bottama-*.csv``, two passes 5 min apart),
full-chain snapshots (``snapshots/deribit_options_snapshot_*.csv``, mark IV as a fraction) and
hourly Tardis ``options_chain`` cuts (``smiles/tardis-hourly-*.csv``, IVs in percent, no
prices: the snapshot's prices are NaN and its bid/ask IVs carry the quotes). The replay path
(frames -> parser -> book) produces the same snapshots from recordings of these files.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from streamer.book.snapshot import ChainSnapshot
from streamer.errors import InputError
from streamer.instruments import MS_PER_YEAR, parse_option


@dataclass(frozen=True, slots=True)
class Row:
    """One option quote as the loaders normalise it (prices in coin, IVs fractions, NaN = none)."""

    instrument: str
    expiry: str
    expiry_ms: int
    strike: float
    is_call: bool
    ts_ms: int
    forward: float
    bid: float
    ask: float
    bid_iv: float
    ask_iv: float
    mark_iv: float
    mark_price: float
    delta: float


def _f(text: str | None, scale: float = 1.0) -> float:
    try:
        v = float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan
    return v * scale if math.isfinite(v) else math.nan


def _side(v: float) -> float:
    return v if v > 0.0 else math.nan


def snapshot_from_rows(
    rows: list[Row], *, venue: str = "deribit", underlying: str, ts_ms: int | None = None
) -> ChainSnapshot:
    """Arrange rows (one per instrument) into a snapshot at ``ts_ms`` (default: newest row)."""
    now = ts_ms if ts_ms is not None else max(r.ts_ms for r in rows)
    live = sorted((r for r in rows if r.expiry_ms > now), key=lambda r: (r.expiry_ms, r.strike))
    expiries = sorted({(r.expiry_ms, r.expiry) for r in live})
    index = {e: i for i, (_, e) in enumerate(expiries)}
    fwd: dict[str, list[float]] = defaultdict(list)
    for r in live:
        if math.isfinite(r.forward):
            fwd[r.expiry].append(r.forward)
    forwards = np.array([float(np.median(fwd[e])) if fwd[e] else math.nan for _, e in expiries])

    def arr(name: str) -> np.ndarray:
        return np.array([getattr(r, name) for r in live], dtype=np.float64)

    return ChainSnapshot(
        venue=venue,
        underlying=underlying,
        ts_ms=now,
        inverse=True,
        instrument=tuple(r.instrument for r in live),
        expiry_idx=np.array([index[r.expiry] for r in live], dtype=np.int64),
        T=np.array([(r.expiry_ms - now) / MS_PER_YEAR for r in live]),
        forward=arr("forward"),
        strike=arr("strike"),
        is_call=np.array([r.is_call for r in live], dtype=np.bool_),
        bid=arr("bid"),
        ask=arr("ask"),
        bid_size=np.ones(len(live)),
        ask_size=np.ones(len(live)),
        bid_iv=arr("bid_iv"),
        ask_iv=arr("ask_iv"),
        mark_iv=arr("mark_iv"),
        mark_price=arr("mark_price"),
        venue_delta=arr("delta"),
        quote_ts_ms=np.array([r.ts_ms for r in live], dtype=np.int64),
        expiries=tuple(e for _, e in expiries),
        expiry_ms=np.array([m for m, _ in expiries], dtype=np.int64),
        forwards=forwards,
        dirty=np.ones(len(expiries), dtype=np.bool_),
    )


def _named_row(name: str, ts_ms: int, **kw: float) -> Row | None:
    opt = parse_option(name)
    if opt is None:
        return None
    return Row(name, opt.expiry, opt.expiry_ms, opt.strike, opt.is_call, ts_ms, **kw)


def load_bottama(path: Path, underlying: str) -> list[ChainSnapshot]:
    """``get_order_book`` dump: one snapshot per pass (an instrument's n-th row is pass n)."""
    passes: list[list[Row]] = []
    seen: dict[str, int] = defaultdict(int)
    with path.open(newline="") as fh:
        for rec in csv.DictReader(fh):
            name = rec["instrument_name"]
            if not name.startswith(underlying + "-"):
                continue
            row = _named_row(
                name,
                int(rec["timestamp"]),
                forward=_f(rec["underlying_price"]),
                bid=_side(_f(rec["best_bid_price"])),
                ask=_side(_f(rec["best_ask_price"])),
                bid_iv=_side(_f(rec["bid_iv"], 0.01)),
                ask_iv=_side(_f(rec["ask_iv"], 0.01)),
                mark_iv=_f(rec["mark_iv"], 0.01),
                mark_price=_f(rec["mark_price"]),
                delta=_f(rec["greeks.delta"]),
            )
            if row is None:
                continue
            n = seen[name]
            seen[name] += 1
            while len(passes) <= n:
                passes.append([])
            passes[n].append(row)
    return [snapshot_from_rows(p, underlying=underlying) for p in passes if p]


def load_snapshot_csv(path: Path, underlying: str) -> list[ChainSnapshot]:
    """A full-chain snapshot file (one chain)."""
    rows: list[Row] = []
    with path.open(newline="") as fh:
        for rec in csv.DictReader(fh):
            if rec.get("currency", underlying) != underlying:
                continue
            ts = int(datetime.fromisoformat(rec["timestamp"]).timestamp() * 1000)
            row = _named_row(
                rec["instrument_name"],
                ts,
                forward=_f(rec["futures_price"]),
                bid=_side(_f(rec["bid_price"])),
                ask=_side(_f(rec["ask_price"])),
                bid_iv=math.nan,
                ask_iv=math.nan,
                mark_iv=_f(rec["implied_volatility"]),
                mark_price=_f(rec["mark_price"]),
                delta=_f(rec["delta"]),
            )
            if row is not None:
                rows.append(row)
    return [snapshot_from_rows(rows, underlying=underlying)] if rows else []


def load_tardis_hourly(path: Path, underlying: str) -> list[ChainSnapshot]:
    """Tardis ``options_chain`` (the hourly cut or the full layout), read by the replay's own
    reader (``streamer.feeds.tardis``): one snapshot per hour, the last quote per instrument."""
    from streamer.events import Instrument, InstrumentListed, Quote
    from streamer.feeds.recordings.tardis import read_tardis_options_chain

    listed: dict[str, Instrument] = {}
    hours: dict[int, dict[str, Row]] = defaultdict(dict)
    for _, ev in read_tardis_options_chain(path, underlyings=[underlying]):
        if isinstance(ev, InstrumentListed):
            listed[ev.instrument.name] = ev.instrument
        elif isinstance(ev, Quote) and ev.instrument in listed:
            inst = listed[ev.instrument]
            hours[ev.ts_ms // 3_600_000][inst.name] = Row(
                inst.name, inst.expiry, inst.expiry_ms, inst.strike, inst.is_call, ev.ts_ms,
                forward=ev.forward,
                bid=_side(ev.bid),
                ask=_side(ev.ask),
                bid_iv=_side(ev.bid_iv),
                ask_iv=_side(ev.ask_iv),
                mark_iv=ev.mark_iv,
                mark_price=ev.mark_price,
                delta=ev.delta,
            )  # fmt: skip
    return [
        snapshot_from_rows(list(hours[h].values()), underlying=underlying) for h in sorted(hours)
    ]


def load_chains(path: str | Path, underlying: str = "BTC") -> list[ChainSnapshot]:
    """Recognise a chain CSV by its header and load its snapshots."""
    p = Path(path)
    with p.open(newline="") as fh:
        header = fh.readline()
    if "best_bid_price" in header:
        return load_bottama(p, underlying)
    if "futures_price" in header:
        return load_snapshot_csv(p, underlying)
    if "expiry_us" in header:
        return load_tardis_hourly(p, underlying)
    raise InputError("path", f"{p}: not a known chain CSV (header {header[:60]!r})")
