"""Pricing core against independent references: QuantLib, mpmath, parity, vollib, Deribit."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable

import mpmath
import numpy as np
import pytest
import QuantLib as ql
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamer.instruments import parse_option, year_fraction
from streamer.pricing import (
    black_greeks,
    black_price,
    coin_to_usd,
    deribit_greeks,
    implied_vol,
    implied_vol_coin,
    premium_adjusted_delta,
    usd_to_coin,
)
from streamer.pricing.black import otm_call, vega_s
from tests.conftest import shared_file

GRID = [
    (F, K, T, sigma, is_call)
    for F in (100.0, 45_000.0)
    for K_over_F in (0.3, 0.8, 0.97, 1.0, 1.05, 1.6, 3.0)
    for T in (1.0 / 365, 0.1, 1.0, 3.0)
    for sigma in (0.05, 0.6, 1.8)
    for is_call in (True, False)
    for K in (F * K_over_F,)
]


def _ql_calc(F: float, K: float, T: float, sigma: float, is_call: bool) -> ql.BlackCalculator:
    kind = ql.Option.Call if is_call else ql.Option.Put
    return ql.BlackCalculator(ql.PlainVanillaPayoff(kind, K), F, sigma * math.sqrt(T), 1.0)


def _close(ours: float, ref: float, rel: float, abs_floor: float) -> bool:
    return abs(ours - ref) <= rel * abs(ref) + abs_floor


def test_price_and_greeks_match_quantlib() -> None:
    F, K, T, S, C = (np.array(col) for col in zip(*GRID, strict=True))
    price = np.asarray(black_price(F, K, T, S, C))
    g = black_greeks(F, K, T, S, C)
    for i, (f, k, t, s, c) in enumerate(GRID):
        calc = _ql_calc(f, k, t, s, c)
        floor = 1e-13 * f  # absolute floor for values that are ~0 (far wings, short T)
        assert _close(price[i], calc.value(), 1e-10, floor), (GRID[i], price[i], calc.value())
        assert _close(g.delta[i], calc.deltaForward(), 1e-10, 1e-15)  # type: ignore[index]
        assert _close(g.gamma[i], calc.gammaForward(), 1e-10, 1e-15 / f)  # type: ignore[index]
        assert _close(g.vega[i], calc.vega(t), 1e-10, floor)  # type: ignore[index]
        assert _close(g.theta[i], calc.theta(f, t), 1e-10, floor)  # type: ignore[index]
        assert _close(g.vanna[i], calc.vanna(f, t), 1e-10, 1e-14)  # type: ignore[index]
        # QuantLib's volga(T) is d2V/dsigma2 divided by sqrt(T) (its vega is per sigma, its
        # second derivative per stdDev); undo that scaling to compare with d2V/dsigma2.
        assert _close(g.volga[i], calc.volga(t) * math.sqrt(t), 1e-10, floor)  # type: ignore[index]


def test_vanna_volga_are_second_derivatives() -> None:
    """Independent of QuantLib's conventions: Richardson-extrapolated finite differences."""
    F, K, T, s = 50_000.0, 56_000.0, 0.25, 0.7

    def d_sigma(f: Callable[[float], float], h: float) -> float:
        return (f(s + h) - f(s - h)) / (2 * h)

    def vega(x: float) -> float:
        return float(black_greeks(F, K, T, x, True).vega)

    def delta(x: float) -> float:
        return float(black_greeks(F, K, T, x, True).delta)

    for fn, ref in ((vega, "volga"), (delta, "vanna")):
        d1, d2 = d_sigma(fn, 1e-3), d_sigma(fn, 5e-4)
        richardson = (4 * d2 - d1) / 3
        ours = float(getattr(black_greeks(F, K, T, s, True), ref))
        assert ours == pytest.approx(richardson, rel=1e-8), ref


def test_put_call_parity() -> None:
    F, K, T, S, _ = (np.array(col) for col in zip(*GRID, strict=True))
    call = np.asarray(black_price(F, K, T, S, True))
    put = np.asarray(black_price(F, K, T, S, False))
    assert np.all(np.abs((call - put) - (F - K)) <= 4e-12 * np.maximum(F, K))
    gc, gp = black_greeks(F, K, T, S, True), black_greeks(F, K, T, S, False)
    np.testing.assert_allclose(np.asarray(gc.delta) - np.asarray(gp.delta), 1.0, atol=1e-15)
    np.testing.assert_allclose(gc.gamma, gp.gamma, rtol=1e-15)


def test_normalised_black_matches_mpmath() -> None:
    """The out-of-the-money normalised Black function against 50-digit arithmetic.

    The error is judged where it matters, in implied-vol terms: relative price error divided
    by the price's elasticity to ``s`` (``s b'/b``), which is what it does to the vol.
    """
    mpmath.mp.dps = 50
    rng = np.random.default_rng(3)
    worst = 0.0
    for _ in range(3000):
        s = 10 ** rng.uniform(-3, 0.7)
        x = -s * rng.uniform(0, 8) if rng.random() < 0.6 else -(10 ** rng.uniform(-8, 0.7))
        xm, sm = mpmath.mpf(x), mpmath.mpf(s)
        h, t = xm / sm, sm / 2
        ref = mpmath.e ** (xm / 2) * mpmath.ncdf(h + t) - mpmath.e ** (-xm / 2) * mpmath.ncdf(h - t)
        if ref < 1e-300:
            continue
        ours = otm_call(x, s)
        elasticity = s * vega_s(x, s) / float(ref)
        worst = max(worst, abs(ours - float(ref)) / float(ref) / max(elasticity, 1.0))
    assert worst < 1e-13


def _roundtrip_grid(is_call: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.linspace(-3, 3, 61)
    s = np.geomspace(1e-3, 3, 61)
    X, S = np.meshgrid(x, s)
    F = np.full(X.size, 100.0)
    K = F * np.exp(-X.ravel())
    sigma = S.ravel()  # T = 1 so sigma = s
    price = np.asarray(black_price(F, K, 1.0, sigma, is_call))
    iv = np.asarray(implied_vol(price, F, K, 1.0, is_call))
    # Where does the price carry the vol to 1e-12? Where a 1e-12 relative change of sigma
    # moves it by more than 4 ulps, and it is a normal (not denormal) float.
    vega = np.array([vega_s(-abs(a), b) for a, b in zip(X.ravel(), sigma, strict=True)])
    vega *= np.sqrt(F * K)
    informative = (vega * sigma * 1e-12 > 4 * np.spacing(price)) & (price > np.finfo(float).tiny)
    return iv, sigma, informative


@pytest.mark.parametrize("is_call", [True, False])
def test_implied_vol_roundtrip_grid(is_call: bool) -> None:
    iv, sigma, informative = _roundtrip_grid(is_call)
    assert (
        informative.sum() > 0.35 * informative.size
    )  # tiny s far out underflows; deep ITM loses it
    err = np.abs(iv - sigma) / sigma
    assert np.all(np.isfinite(iv[informative]))
    assert np.max(err[informative]) <= 1e-12
    # deep in the money and tiny s are included; where the price has lost the vol the result
    # is NaN (price == intrinsic) or still a vol that reprices it
    lost = ~informative & np.isfinite(iv)
    assert np.all(iv[lost] > 0)


def test_implied_vol_no_solution_is_nan() -> None:
    F, K, T = 100.0, 90.0, 0.5
    intrinsic_call = F - K
    cases = [
        (intrinsic_call, True),  # at intrinsic
        (intrinsic_call - 1e-9, True),  # below intrinsic
        (F, True),  # at the upper bound
        (F * 1.01, True),
        (K, False),  # put upper bound is K
        (-1.0, False),
        (0.0, False),  # OTM put worth nothing
        (math.nan, True),
    ]
    for price, c in cases:
        assert math.isnan(float(implied_vol(price, F, K, T, c))), (price, c)
    assert math.isnan(float(implied_vol(5.0, F, K, 0.0, True)))
    assert math.isnan(float(implied_vol(5.0, F, K, -1.0, True)))
    assert math.isnan(float(implied_vol(5.0, -F, K, 1.0, True)))
    out = np.asarray(implied_vol([12.0, 0.0, 11.0], F, K, T, ["C", "C", "C"]))
    assert out.shape == (3,)
    assert math.isnan(out[1]) and out[0] > 0 and out[2] > 0


def test_scalars_and_arrays() -> None:
    assert isinstance(black_price(100.0, 100.0, 1.0, 0.5, True), float)
    arr = np.asarray(black_price(np.full((2, 3), 100.0), 100.0, 1.0, 0.5, "P"))
    assert arr.shape == (2, 3)
    assert black_price(100.0, 90.0, 0.0, 0.5, True) == pytest.approx(10.0)


def test_implied_vol_agrees_with_vollib() -> None:
    from vollib.black.implied_volatility import implied_volatility

    rng = np.random.default_rng(5)
    for _ in range(300):
        F, T, s = 50_000.0, rng.uniform(0.003, 2.0), rng.uniform(0.2, 2.0)
        K = F * math.exp(rng.uniform(-2, 2) * s * math.sqrt(T))
        c = bool(rng.random() < 0.5)
        price = float(black_price(F, K, T, s, c))
        ref = implied_volatility(price, F, K, 0.0, T, "c" if c else "p")
        assert float(implied_vol(price, F, K, T, c)) == pytest.approx(ref, rel=1e-11)


@settings(max_examples=300, deadline=None)
@given(
    F=st.floats(1.0, 1e6),
    k=st.floats(-2.5, 2.5),
    T=st.floats(1e-3, 5.0),
    s1=st.floats(0.01, 3.0),
    s2=st.floats(0.01, 3.0),
    c=st.booleans(),
)
def test_price_properties(F: float, k: float, T: float, s1: float, s2: float, c: bool) -> None:
    K = F * math.exp(k)
    lo, hi = sorted((s1, s2))
    p_lo, p_hi = float(black_price(F, K, T, lo, c)), float(black_price(F, K, T, hi, c))
    intrinsic = max(F - K, 0.0) if c else max(K - F, 0.0)
    bound = F if c else K
    tol = 1e-12 * max(F, K)
    assert intrinsic - tol <= p_lo <= p_hi + tol  # monotone in sigma
    assert p_hi <= bound + tol  # below the upper bound
    assert float(black_greeks(F, K, T, lo, c).vega) >= 0.0


@settings(max_examples=300, deadline=None)
@given(k=st.floats(-1.5, 1.5), T=st.floats(2e-3, 3.0), sigma=st.floats(0.05, 2.5), c=st.booleans())
@example(k=-0.76171875, T=0.07405464713521026, sigma=0.07405464713521026, c=False)  # 1e-311
@example(k=0.4140625, T=0.048828125, sigma=0.05078125, c=True)  # 5e-297: exp(-682) carries 682 eps
@example(k=-0.41796875, T=0.05, sigma=0.05, c=False)  # 5e-305: sigma 1.7e-15 off reprices 2e-12
def test_implied_vol_inverts_price(k: float, T: float, sigma: float, c: bool) -> None:
    F = 60_000.0
    K = F * math.exp(k)
    price = float(black_price(F, K, T, sigma, c))
    iv = float(implied_vol(price, F, K, T, c))
    vega = float(black_greeks(F, K, T, sigma, c).vega)
    # the price pins sigma to 1e-12, and carries every digit (not a subnormal such as 1e-311,
    # whose spacing says nothing about the precision of the exp() that made it)
    full = price > np.finfo(np.float64).tiny / np.finfo(np.float64).eps
    if full and vega * sigma * 1e-12 > 4 * np.spacing(price):
        assert abs(iv - sigma) <= 1e-12 * sigma
    elif not math.isnan(iv):  # no information (e.g. price == intrinsic): any vol that reprices
        # to the price's own precision: a deep out-of-the-money price is exp(-x) with x ~
        # -ln(price), and the rounding of x (x eps) moves it by that share, far more than
        # its spacing (5e-297: x = 682, 3e-14 relative where 4 spacings are 9e-16)
        tol = max(
            4 * np.spacing(price), 4 * np.finfo(np.float64).eps * abs(math.log(price)) * price
        )
        # ... or sigma itself to the 1e-12 asked above: deep in the wing a relative move of
        # sigma moves the price by 2x times as much (5e-305, x = 700: sigma 1.7e-15 off
        # reprices 2.4e-12 off, beyond the tolerance above)
        near = abs(iv - sigma) <= 1e-12 * sigma
        assert near or abs(float(black_price(F, K, T, iv, c)) - price) <= tol


def test_coin_helpers() -> None:
    F, K, T, s = 40_000.0, 45_000.0, 0.2, 0.8
    usd = float(black_price(F, K, T, s, True))
    coin = float(usd_to_coin(usd, F))
    assert coin == pytest.approx(usd / F)
    assert float(coin_to_usd(coin, F)) == pytest.approx(usd)
    assert float(implied_vol_coin(coin, F, K, T, True)) == pytest.approx(s, rel=1e-12)
    dg = deribit_greeks(F, K, T, s, True)
    g = black_greeks(F, K, T, s, True)
    assert float(dg.vega) == pytest.approx(float(g.vega) / 100)
    assert float(dg.theta) == pytest.approx(float(g.theta) / 365)
    assert float(dg.delta_premium_adj) == pytest.approx(
        float(premium_adjusted_delta(g.delta, coin))
    )


def _bottama_rows() -> list[dict[str, str]]:
    path = shared_file("chains/bottama-btc-2021-02-11.csv")
    with path.open(newline="") as fh:
        return [
            r for r in csv.DictReader(fh) if r["mark_iv"] and parse_option(r["instrument_name"])
        ]


def test_rebuilds_deribit_marks_and_greeks() -> None:
    """Deribit's own mark prices and Greeks from mark_iv (DESIGN section 2).

    Deribit rounds Greeks to 5 decimals and mark_iv to 2 (in percent), so differences of
    that order are expected; medians must be far below them.
    """
    rows = _bottama_rows()
    F = np.array([float(r["underlying_price"]) for r in rows])
    opts = [n for n in (parse_option(r["instrument_name"]) for r in rows) if n is not None]
    K = np.array([n.strike for n in opts])
    T = np.array(
        [year_fraction(n.expiry_ms, int(r["timestamp"])) for n, r in zip(opts, rows, strict=True)]
    )
    C = np.array([n.is_call for n in opts])
    sigma = np.array([float(r["mark_iv"]) / 100 for r in rows])
    g = deribit_greeks(F, K, T, sigma, C)

    def diff(ours: object, col: str) -> np.ndarray:
        theirs = np.array([float(r[col]) for r in rows])
        return np.asarray(np.abs(np.asarray(ours) - theirs))

    price = diff(g.price_coin, "mark_price")
    delta = diff(g.delta, "greeks.delta")
    gamma = diff(g.gamma, "greeks.gamma")
    vega = diff(g.vega, "greeks.vega")
    theta = diff(g.theta, "greeks.theta")
    assert len(rows) > 900
    assert np.median(price) < 2e-5  # BTC; DESIGN saw 7e-6
    assert np.quantile(price, 0.9) < 2e-4
    assert np.median(delta) < 1e-5 and delta.max() < 5e-4
    assert gamma.max() <= 5.01e-6  # gamma is shown to 5 decimals
    assert np.median(vega) < 1e-3 and np.quantile(vega, 0.99) < 0.02
    assert np.median(theta) < 0.01 and np.quantile(theta, 0.95) < 0.5
    # and the inverse: mark prices give back mark_iv (to its 2-decimal rounding) near the money
    iv = np.asarray(implied_vol_coin([float(r["mark_price"]) for r in rows], F, K, T, C))
    near = np.abs(np.log(F / K)) < 0.3 * sigma * np.sqrt(T) + 0.05
    assert np.nanmedian(np.abs(iv[near] - sigma[near])) < 5e-4


def test_one_element_arrays_beside_scalars_do_not_warn() -> None:
    """A single strike (a 1-element array) with a scalar forward or T: numpy's broadcast views
    of it are read-only to numba, which used to warn (an error under ``-W error``)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        price = black_price(100.0, np.array([110.0]), 0.1, np.array([0.5]), "C")
        greeks = black_greeks(np.array([100.0]), 110.0, 0.1, 0.5, True)
    assert np.shape(price) == (1,) and np.isfinite(price).all() and np.isfinite(greeks.delta).all()
