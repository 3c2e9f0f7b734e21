"""The greeks topics cover every live instrument, and say how current they are.

Through the pure pipeline (frames -> book -> fits -> messages): instruments whose quotes went
stale or never came, expiries the calibrator does not fit (too short, too thin), settled
expiries (their retained topics cleared), feed loss (greeks re-stamped ``stale`` with the
surface), linear options (no coin price), and a degraded surface at the current T.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jsonschema
import numpy as np

from streamer.book.book import Book
from streamer.calib.calibrator import Calibrator
from streamer.calib.options import CalibConfig
from streamer.config import TriggerConfig
from streamer.daemon.pipeline import Message, Pipeline
from streamer.events import FeedStatus, InstrumentListed, Quote
from streamer.feeds.deribit.parser import instrument_from_name
from streamer.instruments import MS_PER_YEAR, parse_option
from streamer.models.svi import SVI
from streamer.publish.payloads import load_schema
from tests.synth import deribit_chain, make_chain, svi_surface, ticker_frame

NOW_MS = 1_893_484_800_000 + 13 * 3_600_000  # 2030-01-01 21:00 UTC: the daily has 11 h left
TRIGGER = TriggerConfig(min_changed_quotes=1, max_interval_s=1.0, min_interval_s=0.0, warmup_s=0.0)


def chain_frames(ts_ms: int, days: tuple[int, ...] = (1, 7, 30, 91)) -> tuple[list[Any], list[str]]:
    _, fn = svi_surface(days=days)
    snap = make_chain(fn, days=days, ts_ms=ts_ms, rng=np.random.default_rng(1))
    instruments, tickers = deribit_chain(snap)
    return instruments, [ticker_frame(t) for t in tickers]


def run(pipe: Pipeline, frames: list[str], ts_ms: int) -> list[Message]:
    out: list[Message] = []
    for f in frames:
        pipe.on_frame(f, ts_ms * 1_000_000)
    due = {id(b): b for b in pipe.pending() + pipe.due(ts_ms / 1000.0)}
    for book in due.values():
        out += pipe.fit_book(book, ts_ms / 1000.0)
    return out


def greeks_of(msgs: list[Message]) -> dict[str, dict[str, Any]]:
    return {m.topic.rsplit("/", 1)[1]: m.payload for m in msgs if "/greeks/" in m.topic}


def test_every_listed_instrument_gets_greeks_fitted_or_not() -> None:
    """A 1-day expiry (below the calibrator's min_T_days, set to half a day here: not
    fitted), an expiry with one quoted option only (too thin to fit), an option listed but
    never quoted, and one whose quote went stale: every one of them is in the greeks, with a
    model IV."""
    instruments, frames = chain_frames(NOW_MS)
    calib = {"svi": CalibConfig.for_model(SVI, {"filters": {"min_T_days": 0.5}})}
    pipe = Pipeline(models=["svi"], trigger=TRIGGER, stale_after_s=60.0, calib=calib)
    # a listed expiry with a single quote, and an extra strike that is never quoted
    lonely = "BTC-14JAN30-60000-C"
    never = "BTC-31JAN30-123456-C"
    for name in (lonely, never):
        opt = parse_option(name)
        assert opt is not None
        pipe.on_event(InstrumentListed(instrument_from_name("deribit", opt), 0))
    quote = Quote(
        "deribit", lonely, NOW_MS, 0, 0.01, 1.0, 0.012, 1.0, 0.011, 0.6, 0.58, 0.62, 60_000.0
    )
    pipe.on_event(quote)
    # one option quoted long ago: stale (older than stale_after_s) but still listed
    stale_name = json.loads(frames[5])["params"]["data"]["instrument_name"]
    old = [f.replace(f'"timestamp": {NOW_MS}', f'"timestamp": {NOW_MS - 600_000}') for f in frames]
    pipe.on_frame(old[5], 0)
    msgs = run(pipe, frames[:5] + frames[6:], NOW_MS)
    surface = next(m.payload for m in msgs if m.topic.endswith("/surface"))
    greeks = greeks_of(msgs)
    schema = load_schema("greeks")
    listed = {i["instrument_name"] for i in instruments} | {lonely, never}
    published = {r["instrument"]: (e, r) for e, g in greeks.items() for r in g["instruments"]}
    assert set(published) == listed
    fitted = {e["expiry"] for e in surface["expiries"]}
    assert "2JAN30" not in fitted and "14JAN30" not in fitted  # the daily and the thin one
    for expiry, g in greeks.items():
        jsonschema.validate(g, schema)
        assert g["fitted"] == (expiry in fitted)
        assert g["status"] == "ok" and g["seq"] == surface["seq"]
        assert all(r["iv"] is not None and 0.05 < r["iv"] < 5 for r in g["instruments"])
    # market IVs only where the quote is fresh
    assert published[stale_name][1]["bid_iv"] is None and published[never][1]["mark_iv"] is None
    assert published[lonely][1]["bid_iv"] == 0.58 and published[lonely][1]["mark_iv"] == 0.6


def test_a_settled_expiry_is_cleared_and_feed_loss_restamps_the_greeks() -> None:
    _, frames = chain_frames(NOW_MS)
    pipe = Pipeline(models=["svi"], trigger=TRIGGER)
    first = greeks_of(run(pipe, frames, NOW_MS))
    assert "2JAN30" in first
    # the next morning, past the daily's 08:00 UTC settlement
    later = NOW_MS + 86_400_000
    again = [f.replace(f'"timestamp": {NOW_MS}', f'"timestamp": {later}') for f in frames]
    msgs = run(pipe, again, later)
    cleared = [m for m in msgs if m.clear]
    assert [m.topic.rsplit("/", 1)[1] for m in cleared] == ["2JAN30"]
    assert all(m.payload == {} for m in cleared)
    assert "2JAN30" not in {e for e, _ in greeks_of([m for m in msgs if not m.clear]).items()}
    # the feed goes away: the surface and every greeks topic re-stamped stale, one seq
    pipe.on_event(FeedStatus("deribit", "disconnected", 0))
    stale = pipe.stale_messages()
    surf = [m for m in stale if m.topic.endswith("/surface")]
    assert len(surf) == 1 and surf[0].payload["status"] == "stale"
    g = greeks_of(stale)
    assert set(g) == {e for e in greeks_of(msgs) if e != "2JAN30"}
    assert all(p["status"] == "stale" and p["seq"] == surf[0].payload["seq"] for p in g.values())


def test_linear_options_have_no_coin_price() -> None:
    """XRP_USDC options are USD-settled: no coin price, no premium-adjusted delta."""
    _, fn = svi_surface(days=(7, 30))
    snap = make_chain(fn, days=(7, 30), ts_ms=NOW_MS)
    _, tickers = deribit_chain(snap)
    frames = []
    for t in tickers:  # the same chain as a USD-settled one: prices in USD, not coin
        usd = dict(t, instrument_name=str(t["instrument_name"]).replace("BTC-", "XRP_USDC-"))
        for side in ("best_bid_price", "best_ask_price", "mark_price"):
            usd[side] = float(t[side]) * float(t["underlying_price"])  # type: ignore[arg-type]
        frames.append(ticker_frame(usd))
    pipe = Pipeline(models=["svi"], trigger=TRIGGER)
    greeks = greeks_of(run(pipe, frames, NOW_MS))
    assert greeks
    for g in greeks.values():
        for r in g["instruments"]:
            assert r["price_coin"] is None and r["delta_premium_adj"] is None
            assert r["price_usd"] is not None and r["delta"] is not None


def test_a_degraded_fit_is_restamped_at_the_current_maturity_and_forward() -> None:
    """When a fit fails, the last good one is republished as degraded: at the new T (from
    the expiry and the snapshot's time) and the current forward, not the old ones."""
    _, fn = svi_surface()
    first = make_chain(fn, ts_ms=NOW_MS)
    cal = Calibrator(SVI())
    good = cal.fit(first)
    assert good.success
    later = NOW_MS + 3_600_000
    empty = make_chain(fn, ts_ms=later, forward=61_000.0, half_spread_iv=2.0)  # spreads too wide
    bad = cal.fit(empty)
    assert not bad.success and bad.status == "degraded"
    for old, new in zip(good.slices, bad.slices, strict=True):
        assert new.expiry == old.expiry
        assert math.isclose(new.T, (new.expiry_ms - later) / MS_PER_YEAR, rel_tol=1e-12)
        assert new.T < old.T


def test_book_listing_keeps_every_live_instrument() -> None:
    book = Book("deribit", "BTC", stale_after_s=60.0)
    names = ["BTC-31JAN30-60000-C", "BTC-31JAN30-60000-P", "BTC-28FEB30-70000-C"]
    for n in names:
        opt = parse_option(n)
        assert opt is not None
        book.add_option(opt, NOW_MS)
    fresh = Quote("deribit", names[0], NOW_MS, 0, 0.05, 1, 0.06, 1, 0.055, 0.6, 0.59, 0.61, 6e4)
    old = Quote(
        "deribit", names[2], NOW_MS - 3_600_000, 0, 0.05, 1, 0.06, 1, 0.05, 0.6, 0.5, 0.7, 6.1e4
    )
    book.apply(fresh)
    book.apply(old)
    snap = book.snapshot(NOW_MS)
    listing = snap.listing
    assert listing is not None and snap.n_quotes == 1
    assert listing.instrument == tuple(names)  # by expiry, strike, calls first
    assert listing.expiries == ("31JAN30", "28FEB30")
    assert listing.bid_iv[0] == 0.59 and np.isnan(listing.bid_iv[1:]).all()
    # no fresh quote in February: its forward is the last one seen
    assert listing.forwards.tolist() == [6e4, 6.1e4]


def test_fits_while_the_feed_is_down_are_published_stale() -> None:
    """After the feed said ``disconnected``, a fit (of the quotes the book still holds) is
    published ``stale``, its greeks too; once the feed is back, ``ok`` again."""
    _, frames = chain_frames(NOW_MS)
    pipe = Pipeline(models=["svi"], trigger=TRIGGER)
    pipe.on_event(FeedStatus("deribit", "connected", 0))
    first = run(pipe, frames, NOW_MS)
    assert {m.payload["status"] for m in first if not m.clear} == {"ok"}
    pipe.on_event(FeedStatus("deribit", "disconnected", 0))
    moved = [f.replace('"best_bid_amount": 1.0', '"best_bid_amount": 2.0') for f in frames]
    down = run(pipe, moved, NOW_MS + 1000)
    assert down and {m.payload["status"] for m in down if not m.clear} == {"stale"}
    pipe.on_event(FeedStatus("deribit", "connected", 0))
    back = run(pipe, frames, NOW_MS + 2000)
    assert back and {m.payload["status"] for m in back if not m.clear} == {"ok"}
