"""The ``spline`` smile model: recovery of a known smile, no butterfly arbitrage (checked on
call prices from our own Black formula), linear wings within Lee's bound, real-chain band
share, warm-start stability, the calibrator and the replay end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm

from streamer.book.snapshot import ChainSnapshot
from streamer.calib.calibrator import CalibConfig, Calibrator, FitResult
from streamer.calib.data import FilterConfig
from streamer.models import REGISTRY
from streamer.models.base import FloatArray
from streamer.pricing import implied_vol
from streamer.tools.chains import load_chains
from tests.conftest import shared_file
from tests.synth import deribit_chain, make_chain, svi_surface, ticker_frame

REAL = "snapshots/deribit_options_snapshot_20260105T041127Z.csv"
MIN_T = 2.0 / (24 * 365)
FUTURE_MS = 1_893_484_800_000


def config(**kw: object) -> CalibConfig:
    """The spline's own defaults (``calib_defaults``), spelled out: the config wiring of
    ``calib_defaults`` is not what these tests are about."""
    d = dict(REGISTRY["spline"].calib_defaults)
    filters = d.pop("filters")
    assert isinstance(filters, dict)
    d.update(kw)
    return CalibConfig(filters=FilterConfig(**filters), **d)  # type: ignore[arg-type]


def black_call(k: FloatArray, w: FloatArray) -> FloatArray:
    """Undiscounted Black call per unit forward at log-strike ``k``, total variance ``w``."""
    sd = np.sqrt(w)
    d1 = -k / sd + 0.5 * sd
    return np.asarray(norm.cdf(d1) - np.exp(k) * norm.cdf(d1 - sd))


def model_w(x: FloatArray, k: FloatArray, T: float) -> FloatArray:
    model = REGISTRY["spline"]()
    iv = model.implied_vol(x, k, np.full(k.shape, T), np.zeros(k.shape, dtype=np.int64))
    return np.asarray(iv * iv * T)


def outer_knots(x: FloatArray) -> tuple[float, float]:
    """``k_l = s sinh(y_l)``, ``k_r = s sinh(y_r)`` (the model's documented knot map)."""
    s, yl, yr = (float(v) for v in x[-3:])
    return s * math.sinh(yl), s * math.sinh(yr)


def assert_no_butterfly(x: FloatArray, T: float, label: str) -> None:
    """Calls from the published IVs: decreasing and convex in strike, on a dense strike grid
    reaching far beyond the outer knots."""
    kl, kr = outer_knots(x)
    k = np.linspace(kl - 1.0, kr + 1.0, 6001)
    K = np.exp(k)
    c = black_call(k, model_w(x, k, T))
    dc = np.diff(c) / np.diff(K)
    assert np.all(dc <= 1e-12), label
    slope = np.diff(c) / np.diff(K)
    curv = np.diff(slope) / (0.5 * (K[2:] - K[:-2]))
    assert curv.min() >= -1e-8 * max(1.0, float(np.abs(curv).max())), label
    assert np.all(c >= np.maximum(1.0 - K, 0.0) - 1e-12), label  # above intrinsic


def published_iv(r: FitResult, snap: ChainSnapshot) -> FloatArray:
    """The model IV of every instrument of ``snap`` from its expiry's fitted slice (NaN
    where the expiry was not fitted)."""
    model = REGISTRY["spline"]()
    out = np.full(snap.n_quotes, np.nan)
    by_expiry = {s.expiry: (s, x) for s, x in zip(r.slices, r.x, strict=True)}
    for j, e in enumerate(snap.expiries):
        if e not in by_expiry:
            continue
        s, x = by_expiry[e]
        m = snap.expiry_idx == j
        k = np.log(snap.strike[m] / s.forward)
        out[m] = model.implied_vol(x, k, np.full(k.shape, s.T), np.zeros(k.shape, dtype=np.int64))
    return out


def venue_ivs(snap: ChainSnapshot) -> tuple[FloatArray, FloatArray]:
    """Deribit's bid and ask IVs; where a file has only prices (the snapshots), the IVs of
    those prices (coin premiums times the quote's forward)."""
    unit = snap.forward if snap.inverse else np.ones(snap.n_quotes)
    out = []
    for venue, px in ((snap.bid_iv, snap.bid), (snap.ask_iv, snap.ask)):
        implied = np.asarray(
            implied_vol(px * unit, snap.forward, snap.strike, snap.T, snap.is_call), dtype=float
        )
        out.append(np.where(np.isfinite(venue), venue, implied))
    return out[0], out[1]


def scored(snap: ChainSnapshot, bid: FloatArray, ask: FloatArray) -> np.ndarray:
    """The issue's measure: two-sided, OTM against the expiry's forward, T >= 2h."""
    F = snap.forwards[snap.expiry_idx]
    otm = np.where(snap.is_call, snap.strike >= F, snap.strike <= F)
    with np.errstate(invalid="ignore"):
        two = (bid > 0) & (ask > bid)
    return np.asarray(two & otm & (snap.T >= MIN_T))


def test_recovers_a_known_smile() -> None:
    """Quotes around an SVI surface (independent closed form): the fitted IVs lie within a
    fraction of the half-spread of the true ones, on the quotes and between them."""
    params, fn = svi_surface()
    snap = make_chain(fn, half_spread_iv=0.01, n_strikes=25)
    r = Calibrator(REGISTRY["spline"](), config()).fit(snap)
    assert r.success and r.status == "ok", r.message
    assert len(r.slices) == len(params)
    for s, x in zip(r.slices, r.x, strict=True):
        j = snap.expiries.index(s.expiry)
        sd = 0.8 * math.sqrt(s.T)
        k = np.linspace(-2.0 * sd, 2.0 * sd, 201)
        want = fn(k, np.full(k.shape, s.T), j)
        got = np.sqrt(model_w(x, k, s.T) / s.T)
        assert np.max(np.abs(got - want)) < 0.003, s.expiry  # 0.3 vol points, half-spread 1
        assert np.median(np.abs(got - want)) < 0.001, s.expiry
        assert_no_butterfly(x, s.T, s.expiry)


def test_wings_are_linear_within_lees_bound() -> None:
    _, fn = svi_surface(skew=-0.6)
    r = Calibrator(REGISTRY["spline"](), config()).fit(make_chain(fn))
    assert r.success
    for s, x in zip(r.slices, r.x, strict=True):
        kl, kr = outer_knots(x)
        for side, k in (
            ("left", kl - np.array([0.1, 0.6, 2.0, 5.0])),
            ("right", kr + np.array([0.1, 0.6, 2.0, 5.0])),
        ):
            w = model_w(x, k, s.T)
            slopes = np.diff(w) / np.diff(k)
            assert np.allclose(slopes, slopes[0], rtol=1e-9, atol=1e-12), (s.expiry, side)
            assert 0.0 <= abs(slopes[0]) < 2.0, (s.expiry, side)
            assert (slopes[0] <= 0.0) if side == "left" else (slopes[0] >= 0.0)


def test_real_chain_in_band_and_arbitrage_free() -> None:
    """A real Deribit chain: at least 95% of the two-sided OTM instruments (T >= 2h) inside
    Deribit's own bid-ask IVs; every fitted slice free of butterfly arbitrage (prices) and
    of calendar arbitrage where neighbouring slices both quote."""
    snap = load_chains(shared_file(REAL), "BTC")[0]
    r = Calibrator(REGISTRY["spline"](), config()).fit(snap)
    assert r.success, r.message
    iv = published_iv(r, snap)
    bid, ask = venue_ivs(snap)
    m = scored(snap, bid, ask)
    assert m.sum() > 50
    inside = (bid[m] <= iv[m]) & (iv[m] <= ask[m])
    assert float(np.mean(inside)) >= 0.95
    assert r.prepared is not None
    data = r.prepared.data
    prev: tuple[FloatArray, float, FloatArray] | None = None
    for s, x in zip(r.slices, r.x, strict=True):
        assert_no_butterfly(x, s.T, s.expiry)
        j = data.slice_expiry.index(s.expiry)
        kq = data.k[data.slice_idx == j]
        if prev is not None:
            x0, T0, k0 = prev
            kk = np.linspace(max(kq.min(), k0.min()), min(kq.max(), k0.max()), 2001)
            assert np.max(model_w(x0, kk, T0) - model_w(x, kk, s.T)) <= 1e-6, s.expiry
        prev = (x, s.T, kq)


def _requote(snap: ChainSnapshot, rng: np.random.Generator, noise: float) -> ChainSnapshot:
    half = 0.5 * (snap.ask - snap.bid)
    shift = noise * half * rng.uniform(-1.0, 1.0, size=snap.n_quotes)
    return dataclasses.replace(snap, bid=snap.bid + shift, ask=snap.ask + shift)


def test_warm_refits_move_parameters_far_less_than_cold_fits() -> None:
    """Re-quotes of one chain with tiny noise: the warm, penalised fit's parameter moves
    (in the model's penalty scales) stay below 1/5 of independent cold fits'."""
    _, fn = svi_surface()
    rng = np.random.default_rng(3)
    base = make_chain(fn, noise_iv=0.003, half_spread_iv=0.01, rng=rng)
    snaps = [_requote(base, rng, 0.1) for _ in range(6)]
    model = REGISTRY["spline"]()
    warm_cal = Calibrator(model, config())
    first = warm_cal.fit(base)
    assert first.success
    T = np.array([s.T for s in first.slices])
    scale = np.concatenate([model.scale(1, T[j : j + 1]) for j in range(len(T))])

    def move(r: FitResult) -> float:
        return float(
            np.sqrt(np.mean(((np.concatenate(r.x) - np.concatenate(first.x)) / scale) ** 2))
        )

    warm = [warm_cal.fit(s) for s in snaps]
    cold = [Calibrator(model, config()).fit(s) for s in snaps]
    assert all(r.success and r.warm for r in warm) and all(r.success for r in cold)
    assert not any(r.regime_shift for r in warm)
    assert np.mean([move(r) for r in warm]) <= np.mean([move(r) for r in cold]) / 5.0
    assert np.mean([r.in_band for r in warm]) >= np.mean([r.in_band for r in cold]) - 0.02


def test_publishes_through_the_replay(tmp_path: Path) -> None:
    """``streamer replay --model spline`` of a recorded Deribit chain: a fitted surface and
    greeks with IVs for the instruments."""
    _, fn = svi_surface()
    snap = make_chain(fn, noise_iv=0.002, rng=np.random.default_rng(2), ts_ms=FUTURE_MS)
    rec = tmp_path / "rec.jsonl"
    with rec.open("w") as fh:
        for t in deribit_chain(snap)[1]:
            line = {"ts_ns": FUTURE_MS * 1_000_000, "venue": "deribit", "frame": ticker_frame(t)}
            fh.write(json.dumps(line) + "\n")
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamer",
            "replay",
            str(rec),
            "--model",
            "spline",
            "--out",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    msgs = [json.loads(line) for line in out.read_text().splitlines()]
    surfaces = [m["payload"] for m in msgs if m["topic"].endswith("/spline/surface")]
    assert any(s["status"] == "ok" and s["expiries"] for s in surfaces)
    greeks = [m["payload"] for m in msgs if "/spline/greeks/" in m["topic"]]
    ivs = [g["iv"] for p in greeks for g in p["instruments"] if g.get("iv") is not None]
    assert len(ivs) >= snap.n_quotes // 2
    assert all(0.2 < v < 2.0 for v in ivs)
