"""Calibration faults, for every registered model: quotes that make no sense (noise, absurd
IVs, an inverted term structure, zero spreads), an all one-sided book, an expiry with two
quotes, T -> 0 at expiry, a forward of 0 or 1e308, NaN everywhere.

What must hold, through the ``Calibrator`` and through the pipeline's published payloads:

* never a NaN or an infinity: not in a ``FitResult``, not in the JSON a bot receives (which
  validates against the shipped schemas);
* never static arbitrage in what is published: checked here from the payload alone, with
  Black-76 written out in this file: call prices convex and decreasing in strike on every
  published expiry, total variance non-decreasing in maturity at fixed log-moneyness;
* a fit that is not accepted keeps the last good one, republished ``degraded`` with the
  reason (``FitResult.message``, the payload's ``reason``); the next good chain is ``ok``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest
from scipy.special import ndtr

from streamer.book.snapshot import ChainSnapshot
from streamer.calib.calibrator import Calibrator, FitResult
from streamer.client.surface import Surface
from streamer.daemon.pipeline import Message, Pipeline, make_model
from streamer.events import Quote
from streamer.models import REGISTRY
from streamer.publish.base import encode
from streamer.publish.payloads import load_schema
from tests.synth import deribit_chain, make_chain, svi_surface

MODELS = sorted(REGISTRY)
NAN = math.nan


def good_chain(seed: int = 1) -> ChainSnapshot:
    _, fn = svi_surface()
    return make_chain(fn, noise_iv=0.002, rng=np.random.default_rng(seed))


def take(snap: ChainSnapshot, idx: np.ndarray) -> ChainSnapshot:
    """The quotes ``idx`` of a snapshot (per-expiry arrays kept)."""
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(snap):
        v = getattr(snap, f.name)
        if isinstance(v, np.ndarray) and len(v) == snap.n_quotes:
            kw[f.name] = v[idx]
    kw["instrument"] = tuple(snap.instrument[i] for i in idx)
    return dataclasses.replace(snap, **kw)


def ivs_only(snap: ChainSnapshot, bid_iv: np.ndarray, ask_iv: np.ndarray) -> ChainSnapshot:
    """The venue's IVs and no prices (as the hourly Tardis cuts carry them)."""
    nan = np.full(snap.n_quotes, NAN)
    return dataclasses.replace(snap, bid=nan, ask=nan, bid_iv=bid_iv, ask_iv=ask_iv)


def faults() -> dict[str, tuple[ChainSnapshot, bool]]:
    """name -> (snapshot, must the fit be refused). Refused ones have nothing to fit."""
    g = good_chain(2)
    n, e = g.n_quotes, len(g.forwards)
    rng = np.random.default_rng(3)
    noise = rng.uniform(0.05, 3.0, n)
    first = np.flatnonzero(g.expiry_idx == 0)
    two = np.concatenate([first[len(first) // 2 - 1 : len(first) // 2 + 1], first[-0:]])
    two = np.concatenate([two, np.flatnonzero(g.expiry_idx > 0)])
    return {
        "noise": (ivs_only(g, noise, noise + 0.01), False),
        "absurd_near_iv": (
            ivs_only(
                g,
                np.where(g.expiry_idx == 0, 5.0, g.bid_iv),
                np.where(g.expiry_idx == 0, 5.02, g.ask_iv),
            ),
            False,
        ),
        "inverted_term": (ivs_only(g, 3 / (1 + 10 * g.T), 3 / (1 + 10 * g.T) + 0.01), False),
        "zero_spread": (ivs_only(g, np.full(n, 0.5), np.full(n, 0.5)), False),
        "huge_iv": (ivs_only(g, np.full(n, 1e3), np.full(n, 1e3 + 0.01)), True),
        "one_sided": (dataclasses.replace(g, bid=np.full(n, NAN), bid_iv=np.full(n, NAN)), True),
        "two_quote_expiry": (take(g, np.sort(two)), False),
        "T_to_zero": (dataclasses.replace(g, T=np.where(g.expiry_idx == 0, 1e-12, g.T)), False),
        "forward_0": (dataclasses.replace(g, forward=np.zeros(n), forwards=np.zeros(e)), True),
        "forward_1e308": (
            dataclasses.replace(g, forward=np.full(n, 1e308), forwards=np.full(e, 1e308)),
            True,
        ),
        "nan_everything": (
            dataclasses.replace(
                ivs_only(g, np.full(n, NAN), np.full(n, NAN)), forward=np.full(n, NAN)
            ),
            True,
        ),
    }


FAULTS = list(faults())


# -- independent checks -----------------------------------------------------------------------


def all_finite(r: FitResult) -> bool:
    vals = list(r.params.values())
    for s in r.slices:
        vals += [*s.params.values(), s.atm_iv, s.forward, s.T, s.rmse_iv, s.in_band]
    vals += [v for x in r.x for v in np.asarray(x).ravel().tolist()]
    return all(math.isfinite(v) for v in vals)


def black_call(F: float, K: np.ndarray, T: float, iv: np.ndarray) -> np.ndarray:
    """Undiscounted Black-76 call (r = 0), written out here."""
    sd = iv * math.sqrt(T)
    d1 = np.log(F / K) / sd + 0.5 * sd
    return np.asarray(F * ndtr(d1) - K * ndtr(d1 - sd))


def check_no_static_arbitrage(payload: dict[str, Any]) -> None:
    """From the published payload alone: per expiry, call prices convex and non-increasing
    in strike on |k| <= 0.4 (no butterfly, no vertical spread arbitrage); across expiries,
    total variance non-decreasing in T at fixed log-moneyness (no calendar arbitrage). The
    calendar guarantee of independent per-expiry fits (SVI, SABR) is the quoted range
    (``streamer.calib.repair.calendar_grid``: their wings may cross far outside the quotes):
    checked there on |k| <= 0.05, inside every expiry's quotes; the surface models and the
    exact-calendar eSSVI everywhere on the grid."""
    surface = Surface.from_payload(payload)
    model = REGISTRY[str(payload["model"])]()
    k = np.linspace(-0.4, 0.4, 81)
    cal = np.ones(k.shape, dtype=np.bool_)
    if model.per_expiry and not model.exact_calendar:
        cal = np.abs(k) <= 0.05 + 1e-12
    prev: np.ndarray | None = None
    for j, expiry in enumerate(surface.expiries):
        F, T = float(surface.forward[j]), float(surface.T[j])
        assert math.isfinite(F) and F > 0 and math.isfinite(T) and T > 0
        K = F * np.exp(k)
        iv = np.asarray(surface.iv(K, expiry), dtype=float)
        shown = np.ones(k.shape, dtype=np.bool_)
        if model.any_maturity:
            # models priced by their characteristic function publish no vol where the
            # out-of-the-money price has no digits left (beyond ~6 standard deviations:
            # |k| = 0.3 at T = 2 days): demanded within 5, checked wherever published
            sd = float(surface.iv(F, expiry)[0]) * math.sqrt(T)
            shown = np.isfinite(iv)
            assert np.all(shown[np.abs(k) <= 5.0 * sd]), expiry
        assert np.all(np.isfinite(iv[shown]) & (iv[shown] > 0)), expiry
        c = black_call(F, K[shown], T, iv[shown])
        tol = 1e-9 * F
        assert np.all(np.diff(c) <= tol), f"{expiry}: call price rises with strike"
        # convexity on the uneven strike grid: slopes non-decreasing
        slopes = np.diff(c) / np.diff(K[shown])
        assert np.all(np.diff(slopes) >= -1e-9), f"{expiry}: butterfly arbitrage"
        w = np.where(shown, iv * iv * T, np.nan)
        if prev is not None:
            both = cal & np.isfinite(w) & np.isfinite(prev)
            assert np.all(w[both] >= prev[both] - 1e-9), f"{expiry}: calendar arbitrage"
        prev = w


def check_payload(msg: Message) -> None:
    """JSON without NaN/inf tokens that validates against its schema."""
    raw = encode(msg.payload)
    assert b"NaN" not in raw and b"Infinity" not in raw
    back = orjson.loads(raw)
    kind = msg.topic.rsplit("/", 2)[-2] if "/greeks/" in msg.topic else msg.topic.rsplit("/")[-1]
    jsonschema.validate(back, load_schema(kind))  # type: ignore[arg-type]


# -- through the calibrator -------------------------------------------------------------------


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", MODELS)
def test_calibrator_keeps_the_last_good_fit_and_never_publishes_nan(name: str, fault: str) -> None:
    snap, refused = faults()[fault]
    cal = Calibrator(make_model(name))
    good = cal.fit(good_chain())
    assert good.status == "ok" and all_finite(good)
    r = cal.fit(snap)
    assert all_finite(r), fault
    if refused:
        assert r.status == "degraded" and not r.success
        assert cal.last_good is good  # kept
        assert r.params == good.params and r.message.startswith("no usable quotes")
        assert "(" in r.message  # with the counts of what was dropped, by reason
        assert {s.expiry for s in r.slices} <= {s.expiry for s in good.slices}
    elif r.status == "degraded":
        assert r.message and cal.last_good is good
    else:
        assert cal.last_good is r
    after = cal.fit(good_chain(4))
    assert after.status == "ok" and all_finite(after)


# -- through the pipeline: what bots receive ------------------------------------------------------


def quotes_of(snap: ChainSnapshot, ts_ms: int, **over: Any) -> list[Quote]:
    """A synthetic snapshot as the ticker quotes a feed would deliver (Deribit names)."""
    _, tickers = deribit_chain(snap)
    out = []
    for t in tickers:
        q = Quote(
            "deribit",
            str(t["instrument_name"]),
            ts_ms,
            ts_ms * 1_000_000,
            bid=float(t["best_bid_price"]),  # type: ignore[arg-type]
            bid_size=1.0,
            ask=float(t["best_ask_price"]),  # type: ignore[arg-type]
            ask_size=1.0,
            bid_iv=float(t["bid_iv"]) / 100,  # type: ignore[arg-type]
            ask_iv=float(t["ask_iv"]) / 100,  # type: ignore[arg-type]
            mark_iv=float(t["mark_iv"]) / 100,  # type: ignore[arg-type]
            forward=float(t["underlying_price"]),  # type: ignore[arg-type]
        )
        out.append(dataclasses.replace(q, **over))
    return out


def run(pipe: Pipeline, quotes: list[Quote], now_s: float) -> list[Message]:
    for q in quotes:
        pipe.on_event(q)
    book = pipe.books.get("deribit", "BTC")
    assert book is not None
    msgs = pipe.fit_book(book, now_s)
    for m in msgs:
        if not m.clear:
            check_payload(m)
    return msgs


def surface_of(msgs: list[Message]) -> dict[str, Any]:
    (s,) = [m.payload for m in msgs if m.topic.endswith("/surface")]
    return s


@pytest.mark.parametrize("name", MODELS)
def test_published_payloads_stay_clean_through_every_fault(name: str) -> None:
    """One pipeline, one model: a good chain, then each fault the book lets through (it
    filters some itself), then a good chain again. Every message is clean JSON and valid;
    every published surface is free of static arbitrage; refused fits are republished as
    ``degraded`` with the reason, the parameters of the last good fit, and a rising seq."""
    pipe = Pipeline(models=[name], stale_after_s=3_600.0)
    snap = good_chain()
    t0 = snap.ts_ms + 1_000
    first = surface_of(run(pipe, quotes_of(snap, t0), 1.0))
    assert first["status"] == "ok" and "reason" not in first
    check_no_static_arbitrage(first)
    seq = first["seq"]
    # a one-sided book: no usable quotes, the last good fit again, degraded, with the reason
    nan = float("nan")
    s = surface_of(run(pipe, quotes_of(snap, t0 + 1_000, bid=nan, bid_iv=nan), 2.0))
    assert s["status"] == "degraded" and s["reason"].startswith("no usable quotes")
    assert s["params"] == first["params"] and s["seq"] == seq + 1
    check_no_static_arbitrage(s)
    # every quote's forward field 1e308 (or 0): the book takes the forward from put-call
    # parity instead, so what is published carries sane forwards, never those
    for i, bad in enumerate((1e308, 0.0)):
        s = surface_of(run(pipe, quotes_of(snap, t0 + 2_000 + i, forward=bad), 3.0 + i))
        assert s["status"] == "ok" or s.get("reason"), s["status"]
        forwards = [e["forward"] for e in s["expiries"]]
        assert forwards and all(50_000 < f < 70_000 for f in forwards), forwards
        check_no_static_arbitrage(s)
    # noise in every IV (the venue's, no prices): whatever is fitted stays arbitrage-free
    rng = np.random.default_rng(5)
    noisy = [
        dataclasses.replace(
            q, bid=nan, ask=nan, bid_iv=(b := float(rng.uniform(0.1, 2.5))), ask_iv=b + 0.02
        )
        for q in quotes_of(snap, t0 + 3_000)
    ]
    s = surface_of(run(pipe, noisy, 5.0))
    check_no_static_arbitrage(s)
    # T -> 0: one millisecond before the first expiry settles
    first_expiry = int(min(snap.expiry_ms))
    late = quotes_of(snap, first_expiry - 1)
    msgs = run(pipe, late, 6.0)
    s = surface_of(msgs)
    assert all(e["expiry_ms"] > first_expiry - 1 and e["T"] > 0 for e in s["expiries"])
    for m in msgs:
        if "/greeks/" in m.topic and not m.clear:
            assert m.payload["T"] > 0
            assert all(r["iv"] is not None for r in m.payload["instruments"])
    check_no_static_arbitrage(s)
    # and a good chain again: ok
    s = surface_of(run(pipe, quotes_of(good_chain(6), first_expiry + 1_000), 7.0))
    assert s["status"] == "ok" and "reason" not in s
    assert all(e["expiry_ms"] > first_expiry for e in s["expiries"])  # the first one settled
    check_no_static_arbitrage(s)
