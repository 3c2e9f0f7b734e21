"""Issue 13's measure (``streamer.tools.bench.measure``), the scipy baseline and ceilings
(``streamer.tools.bench.baseline``) and the stability ratio of ``streamer bench quality``, on
hand-built chains whose right answers are known by construction."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from streamer.daemon.pipeline import Message
from streamer.instruments import MS_PER_YEAR
from streamer.models import REGISTRY
from streamer.tools.bench import baseline, quality
from streamer.tools.bench.measure import MIN_T_MS, Retained, Tally, lookup, scored
from streamer.tools.chains import Row, snapshot_from_rows

NOW = 1_750_000_000_000
DAY = 86_400_000
F = 100_000.0


def _row(name: str, expiry_ms: int, strike: float, call: bool, **kw: float) -> Row:
    base: dict[str, Any] = {
        "forward": F,
        "bid": math.nan,
        "ask": math.nan,
        "bid_iv": 0.50,
        "ask_iv": 0.52,
        "mark_iv": 0.51,
        "mark_price": math.nan,
        "delta": math.nan,
    }
    base.update(kw)
    return Row(name, name.split("-")[1], expiry_ms, strike, call, NOW, **base)


def _chain() -> Any:
    e1 = NOW + 7 * DAY
    short = NOW + MIN_T_MS - 60_000  # one minute under 2 hours
    rows = [
        _row("BTC-E1-110000-C", e1, 110_000.0, True),  # OTM call: scored
        _row("BTC-E1-90000-P", e1, 90_000.0, False),  # OTM put: scored
        _row("BTC-E1-90000-C", e1, 90_000.0, True),  # ITM call: excluded
        _row("BTC-E1-110000-P", e1, 110_000.0, False),  # ITM put: excluded
        _row("BTC-E1-120000-C", e1, 120_000.0, True, bid_iv=math.nan),  # one-sided
        _row("BTC-E1-130000-C", e1, 130_000.0, True, bid_iv=0.6, ask_iv=0.6),  # ask = bid
        _row("BTC-E1-80000-P", e1, 80_000.0, False, bid_iv=0.0, ask_iv=0.7),  # bid 0
        _row("BTC-E2-110000-C", short, 110_000.0, True),  # T < 2 h
        _row("BTC-E1-140000-C", e1, 140_000.0, True),  # OTM call: scored
    ]
    return snapshot_from_rows(rows, underlying="BTC", ts_ms=NOW)


def test_scored_instruments_follow_the_measure() -> None:
    snap = _chain()
    s = scored(snap)
    names = sorted(snap.instrument[i] for i in s.index)
    assert names == ["BTC-E1-110000-C", "BTC-E1-140000-C", "BTC-E1-90000-P"]
    np.testing.assert_allclose(s.mid_iv, 0.51)
    np.testing.assert_allclose(s.k, np.log(snap.strike[s.index] / F))


def test_missing_and_null_ivs_are_misses_out_of_band_too() -> None:
    snap = _chain()
    s = scored(snap)
    published = {
        "BTC-E1-110000-C": 0.515,  # in band
        "BTC-E1-90000-P": math.nan,  # a null iv
        # BTC-E1-140000-C missing
        "BTC-E1-90000-C": 0.51,  # ITM: not scored whatever it says
    }
    t = Tally()
    inside = t.add(s, lookup(snap, published)[s.index])
    assert (t.scored, t.inside, t.missing) == (3, 1, 2)
    assert inside.sum() == 1
    assert t.share == pytest.approx(1 / 3)
    t2 = Tally()
    t2.add(s, np.array([0.50, 0.52, 0.5201]))  # edges count in; beyond the ask does not
    assert (t2.inside, t2.missing) == (2, 0)
    assert t2.pct(50) == pytest.approx(1.0)  # |iv - mark| = 1 vol point each


def test_snapshot_without_venue_ivs_implies_them_from_prices() -> None:
    from streamer.pricing import black_price

    e1 = NOW + 30 * DAY
    T = 30 * DAY / MS_PER_YEAR
    K = 120_000.0
    bid = float(black_price(F, K, T, 0.55, True)) / F
    ask = float(black_price(F, K, T, 0.57, True)) / F
    row = _row("BTC-E1-120000-C", e1, K, True, bid=bid, ask=ask, bid_iv=math.nan, ask_iv=math.nan)
    s = scored(snapshot_from_rows([row], underlying="BTC", ts_ms=NOW))
    assert s.n == 1
    np.testing.assert_allclose([s.bid_iv[0], s.ask_iv[0]], [0.55, 0.57], atol=1e-7)


def test_retained_keeps_the_last_message_per_expiry_and_drops_cleared() -> None:
    def msg(expiry: str, iv: float | None, clear: bool = False) -> Message:
        rows = [] if clear else [{"instrument": f"BTC-{expiry}-1-C", "strike": 1.0, "iv": iv}]
        return Message(f"s/deribit/BTC/svi/greeks/{expiry}", {"instruments": rows}, clear)

    r = Retained()
    r.update([msg("A", 0.5), msg("B", 0.6), Message("s/deribit/BTC/svi/surface", {})])
    r.update([msg("A", None)])
    ivs = r.ivs()
    assert math.isnan(ivs["BTC-A-1-C"]) and ivs["BTC-B-1-C"] == 0.6
    r.update([msg("B", None, clear=True)])
    assert "BTC-B-1-C" not in r.ivs()


def _svi_iv(k: np.ndarray, T: float) -> np.ndarray:
    a, b, rho, m, sig = 0.02 * T / 0.1, 0.1, -0.4, 0.05, 0.15
    w = a + b * (rho * (k - m) + np.sqrt((k - m) ** 2 + sig**2))
    return np.asarray(np.sqrt(w / T))


def _svi_chain(half: float = 0.004) -> Any:
    """Two expiries of OTM calls and puts on a known raw SVI smile, band +-half around it."""
    rows = []
    for days in (20, 90):
        exp = NOW + days * DAY
        T = days * DAY / MS_PER_YEAR
        for K in np.linspace(60_000.0, 160_000.0, 21):
            iv = float(_svi_iv(np.array([math.log(K / F)]), T)[0])
            call = K > F
            rows.append(
                _row(
                    f"BTC-D{days}-{int(K)}-{'C' if call else 'P'}",
                    exp,
                    float(K),
                    call,
                    bid_iv=iv - half,
                    ask_iv=iv + half,
                    mark_iv=iv,
                )
            )
    return snapshot_from_rows(rows, underlying="BTC", ts_ms=NOW)


def test_scipy_baseline_recovers_a_synthetic_svi_smile() -> None:
    snap = _svi_chain()
    s = scored(snap)
    fns = baseline.svi_baseline(s)
    assert len(fns) == 2
    k_all = np.log(snap.strike / snap.forwards[snap.expiry_idx])
    iv = baseline.evaluate(fns, k_all, snap.expiry_idx)
    # the quotes' mid is the smile itself: the fit must reproduce it to well inside the band
    truth = np.array([_svi_iv(k_all[i : i + 1], float(snap.T[i]))[0] for i in range(len(k_all))])
    np.testing.assert_allclose(iv, truth, atol=2e-4)
    t = Tally()
    t.add(s, iv[s.index])
    assert t.share == 1.0


@pytest.mark.parametrize("name", ["svi", "sabr"])
def test_ceiling_fits_a_model_smile_inside_its_band(name: str) -> None:
    """Quotes made by the model itself: its ceiling puts all of them in their band."""
    model = REGISTRY[name]()
    x = np.array([0.002, 0.05, -0.3, 0.0, 0.1]) if name == "svi" else np.array([0.55, -0.3, 2.0])
    rows = []
    days = 30
    exp = NOW + days * DAY
    T = days * DAY / MS_PER_YEAR
    for K in np.linspace(70_000.0, 140_000.0, 15):
        k = np.array([math.log(K / F)])
        iv = float(model.implied_vol(x, k, np.array([T]), np.zeros(1, dtype=np.int64))[0])
        call = K > F
        rows.append(
            _row(
                f"BTC-X-{int(K)}-{'C' if call else 'P'}",
                exp,
                float(K),
                call,
                bid_iv=iv - 0.002,
                ask_iv=iv + 0.002,
                mark_iv=iv,
            )
        )
    snap = snapshot_from_rows(rows, underlying="BTC", ts_ms=NOW)
    s = scored(snap)
    fns = baseline.ceiling(model, s)
    k_all = np.log(snap.strike / snap.forwards[snap.expiry_idx])
    t = Tally()
    t.add(s, baseline.evaluate(fns, k_all, snap.expiry_idx)[s.index])
    assert t.share == 1.0


def test_stability_ratio_is_model_moves_over_mid_moves() -> None:
    snap = _chain()
    s = scored(snap)
    track = quality._Track()
    assert math.isnan(track.step(snap, s, s.mid_iv.copy()))  # nothing to compare yet
    moved = snapshot_from_rows(
        [
            _row(
                n,
                int(snap.expiry_ms[snap.expiry_idx[i]]),
                float(snap.strike[i]),
                bool(snap.is_call[i]),
                bid_iv=0.52,
                ask_iv=0.54,
            )
            for i, n in ((i, snap.instrument[i]) for i in s.index)
        ],
        underlying="BTC",
        ts_ms=NOW,
    )
    s2 = scored(moved)
    # mids moved 2 points; a model that moves 1 point has ratio 0.5, one that follows 1.0
    t_half, t_follow = quality._Track(), quality._Track()
    t_half.step(snap, s, s.mid_iv.copy())
    t_follow.step(snap, s, s.mid_iv.copy())
    assert s2.n == s.n
    assert t_half.step(moved, s2, s2.mid_iv - 0.01) == pytest.approx(0.5)
    assert t_follow.step(moved, s2, s2.mid_iv.copy()) == pytest.approx(1.0)
