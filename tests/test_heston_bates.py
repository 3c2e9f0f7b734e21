"""Heston and Bates surfaces against independent references.

References: QuantLib's AnalyticHestonEngine and BatesEngine (adaptive Gauss-Lobatto on the
Heston integrals, asked for 1e-14 relative tolerance: at their default 1e-12 their own
absolute error, ~1e-13, is 1e-7 of a 1e-6 option), mpmath's Lewis (2001) integral at 25
digits for far out-of-the-money points, central finite differences for the Jacobian, Black's
formula for the implied-vol round trip, and the known parameters of synthetic surfaces.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import numpy.typing as npt
import pytest
import QuantLib as ql
from scipy.optimize import least_squares

import streamer.models.bates
import streamer.models.heston
from streamer.models.base import REGISTRY, FitData
from streamer.models.bates import Bates
from streamer.models.heston import Heston
from streamer.pricing import black_price

FloatArray = npt.NDArray[np.float64]

HESTON_SETS = [
    (0.25, 2.0, 0.4, 1.0, -0.5),  # typical crypto: 50% vol, negative skew
    (1.5, 5.0, 0.8, 3.0, 0.3),  # stressed: 120% spot vol, huge vol of vol, positive rho
    (0.5, 1.0, 0.5, 1.5, -0.7),
    (0.04, 0.5, 0.09, 2.0, -0.9),  # Feller badly violated: heavy exponential left tail
]
BATES_SETS = [
    (0.25, 2.0, 0.4, 1.0, -0.5, 0.5, -0.1, 0.15),
    (0.3, 1.0, 0.5, 1.5, -0.7, 2.0, -0.3, 0.4),
    (0.8, 5.0, 0.6, 2.0, 0.2, 4.0, 0.2, 1.0),
    (0.2, 3.0, 0.3, 0.8, -0.3, 0.1, -0.8, 0.05),
]
DAYS = (1, 2, 7, 30, 182, 548)
K_GRID = np.linspace(-1.5, 1.0, 21)
EVAL_DATE = ql.Date(15, 1, 2024)


def _ql_prices(x: tuple[float, ...], days: int, k: FloatArray, is_call: list[bool]) -> FloatArray:
    """QuantLib prices with spot = forward = 1 and flat zero rates."""
    settings = ql.Settings.instance()
    previous = settings.evaluationDate
    settings.evaluationDate = EVAL_DATE
    try:
        dc = ql.Actual365Fixed()
        curve = ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, 0.0, dc))
        spot = ql.QuoteHandle(ql.SimpleQuote(1.0))
        engine: ql.PricingEngine
        if len(x) == 5:
            model = ql.HestonModel(ql.HestonProcess(curve, curve, spot, *x))
            engine = ql.AnalyticHestonEngine(model, 1e-14, 10_000_000)
        else:
            model = ql.BatesModel(ql.BatesProcess(curve, curve, spot, *x))
            engine = ql.BatesEngine(model, 1e-14, 10_000_000)
        exercise = ql.EuropeanExercise(EVAL_DATE + days)
        out = []
        for kk, call in zip(k, is_call, strict=True):
            kind = ql.Option.Call if call else ql.Option.Put
            option = ql.VanillaOption(ql.PlainVanillaPayoff(kind, float(np.exp(kk))), exercise)
            option.setPricingEngine(engine)
            out.append(option.NPV())
    finally:
        settings.evaluationDate = previous
    return np.asarray(out)


def _assert_prices_close(ours: FloatArray, ref: FloatArray, what: str) -> None:
    """Relative 1e-8 where the price exceeds 1e-6, absolute 1e-12 below."""
    big = ref > 1e-6
    rel = np.abs(ours - ref)[big] / ref[big]
    small = np.abs(ours - ref)[~big]
    assert np.all(rel <= 1e-8), f"{what}: relative error {rel.max():.2e}"
    assert np.all(small <= 1e-12), f"{what}: absolute error {small.max():.2e}"


def _surface_grid(vol: float = 0.7, n_strikes: int = 58) -> tuple[FloatArray, FloatArray]:
    """A crypto-like quote grid: 12 expiries from 1 day to 1 year, strikes out to about
    3.5 standard deviations at the vol level ``vol`` (696 quotes)."""
    days = np.array([1, 2, 3, 7, 14, 21, 35, 63, 91, 182, 273, 365])
    ks, ts = [], []
    for t in days / 365.0:
        half = min(3.5 * vol * math.sqrt(t), 1.5)
        ks.append(np.linspace(-half, min(half, 1.0), n_strikes))
        ts.append(np.full(n_strikes, t))
    return np.concatenate(ks), np.concatenate(ts)


# --------------------------------------------------------------------------------------------
# prices


@pytest.mark.parametrize("x", HESTON_SETS)
def test_heston_matches_quantlib(x: tuple[float, ...]) -> None:
    model = Heston()
    for days in DAYS:
        T = np.full(K_GRID.shape, days / 365.0)
        calls = K_GRID >= 0.0
        ours = model.price(np.array(x), K_GRID, T, np.zeros(K_GRID.shape, np.int64), calls)
        _assert_prices_close(ours, _ql_prices(x, days, K_GRID, list(calls)), f"{x} {days}d")


@pytest.mark.parametrize("x", BATES_SETS)
def test_bates_matches_quantlib(x: tuple[float, ...]) -> None:
    model = Bates()
    for days in DAYS:
        T = np.full(K_GRID.shape, days / 365.0)
        calls = K_GRID >= 0.0
        ours = model.price(np.array(x), K_GRID, T, np.zeros(K_GRID.shape, np.int64), calls)
        _assert_prices_close(ours, _ql_prices(x, days, K_GRID, list(calls)), f"{x} {days}d")


@pytest.mark.parametrize(("x", "days"), [(HESTON_SETS[0], 7), (BATES_SETS[1], 2)])
def test_in_the_money_and_parity_match_quantlib(x: tuple[float, ...], days: int) -> None:
    """Both option types at every strike (the in-the-money side comes through parity)."""
    model = Heston() if len(x) == 5 else Bates()
    k = np.linspace(-0.6, 0.6, 7)
    T = np.full(k.shape, days / 365.0)
    idx = np.zeros(k.shape, np.int64)
    for call in (True, False):
        flags = np.full(k.shape, call)
        ours = model.price(np.array(x), k, T, idx, flags)
        _assert_prices_close(ours, _ql_prices(x, days, k, list(flags)), f"call={call}")
    parity = model.price(np.array(x), k, T, idx, np.full(k.shape, True)) - model.price(
        np.array(x), k, T, idx, np.full(k.shape, False)
    )
    np.testing.assert_allclose(parity, 1.0 - np.exp(k), rtol=0, atol=1e-15)


def _lewis_otm(k: float, T: float, x: tuple[float, ...]) -> float:
    """Lewis (2001): C = 1 - e^{k/2}/pi int_0^inf Re[e^{-iuk} phi(u - i/2)] / (u^2 + 1/4) du,
    with the little-trap characteristic function (Albrecher et al. 2007), in 25 digits."""
    mp = mpmath.mp
    mp.dps = 25
    v0, kappa, theta, xi, rho = (mpmath.mpf(v) for v in x[:5])
    kk, tt = mpmath.mpf(k), mpmath.mpf(T)

    def ln_phi(u: mpmath.mpc) -> mpmath.mpc:
        iu = 1j * u
        beta = kappa - xi * rho * iu
        d = mpmath.sqrt(beta**2 + xi**2 * (u**2 + iu))
        g = (beta - d) / (beta + d)
        e = mpmath.exp(-d * tt)
        c = kappa * theta / xi**2 * ((beta - d) * tt - 2 * mpmath.log((1 - g * e) / (1 - g)))
        out = c + (beta - d) / xi**2 * (1 - e) / (1 - g * e) * v0
        if len(x) == 8:
            lam, mu, sj = (mpmath.mpf(v) for v in x[5:])
            m = mpmath.exp(mu + sj**2 / 2) - 1
            out += lam * tt * (mpmath.exp(iu * mu + iu**2 * sj**2 / 2) - 1 - iu * m)
        return out

    def integrand(u: mpmath.mpf) -> mpmath.mpf:
        return mpmath.re(mpmath.exp(-1j * u * kk + ln_phi(u - 0.5j))) / (u**2 + 0.25)

    scale = mpmath.sqrt(v0 * tt) + mpmath.mpf("1e-3")
    cuts = [0] + [mpmath.mpf(2) ** j / scale for j in range(-1, 12)] + [mpmath.inf]
    call = 1 - mpmath.exp(kk / 2) / mpmath.pi * mpmath.quad(integrand, cuts)
    return float(call if k >= 0 else call - 1 + mpmath.exp(kk))


@pytest.mark.parametrize(
    ("x", "k", "days"),
    [
        (HESTON_SETS[3], -1.0, 548),  # the heavy left tail far out
        (HESTON_SETS[3], 0.6, 548),
        (BATES_SETS[1], -1.4, 2),  # jump-driven wing of a 2-day expiry
        (BATES_SETS[1], 1.0, 2),
    ],
)
def test_far_wings_match_25_digit_lewis_integral(x: tuple[float, ...], k: float, days: int) -> None:
    model = Heston() if len(x) == 5 else Bates()
    ours = model.otm_price(np.array(x), np.array([k]), np.array([days / 365.0]))[0]
    ref = _lewis_otm(k, days / 365.0, x)
    assert ref > 1e-7
    assert abs(ours - ref) <= 1e-8 * ref


def test_bates_without_jumps_is_heston() -> None:
    k, T = _surface_grid()
    h = np.array([0.3, 1.5, 0.4, 1.0, -0.4])
    b = np.concatenate([h, [0.0, -0.2, 0.3]])
    idx = np.zeros(k.shape, np.int64)
    np.testing.assert_allclose(
        Bates().otm_price(b, k, T), Heston().otm_price(h, k, T), rtol=1e-13, atol=1e-16
    )
    np.testing.assert_allclose(
        Bates().jacobian(b, k, T, idx)[:, :5], Heston().jacobian(h, k, T, idx), rtol=1e-10
    )


@pytest.mark.parametrize("x", [HESTON_SETS[0], HESTON_SETS[3], BATES_SETS[1]])
def test_moment_generating_function(x: tuple[float, ...]) -> None:
    """``ln E[e^{sX}]``: 0 at s = 0 and s = 1 (martingale), convex, and its second moment
    ``E[F_T^2] = 2 int_0^inf C(K) dK`` matches QuantLib's call prices integrated over K."""
    p = np.zeros(8)
    p[: len(x)] = x
    n = len(x)
    T = 0.5
    assert streamer.models.heston.log_mgf(0.0, T, p, n) == 0.0
    assert abs(streamer.models.heston.log_mgf(1.0, T, p, n)) < 1e-13
    s = np.linspace(-3.0, 3.0, 61)
    lm = np.array([streamer.models.heston.log_mgf(v, T, p, n) for v in s])
    finite = np.isfinite(lm)
    assert finite[25:36].all()  # |s| <= 0.5 never explodes
    second = np.diff(lm[finite], 2)
    assert np.all(second > -1e-12)
    if x is not HESTON_SETS[3]:  # (its F_T^2 has a heavy tail: slow to integrate)
        strikes = np.linspace(0.01, 8.0, 400)
        calls = _ql_prices(x, 182, np.log(strikes), [True] * strikes.shape[0])
        # [0, 0.01]: C(K) = 1 - K there to far below the tolerance
        second_moment = 2.0 * (np.trapezoid(calls, strikes) + 0.01 - 0.5 * 0.01**2)
        mgf2 = math.exp(streamer.models.heston.log_mgf(2.0, 182 / 365, p, n))
        assert mgf2 == pytest.approx(second_moment, rel=1e-4)


def test_short_expiry_wide_strikes_and_degenerate_inputs() -> None:
    """1 hour to expiry and strikes to +-150%: prices stay finite, tiny wings are ~0."""
    model = Heston()
    x = np.array([0.5, 2.0, 0.5, 1.5, -0.5])
    k = np.linspace(-1.5, 1.0, 51)
    p = model.otm_price(x, k, np.full(k.shape, 1.0 / (365 * 24)))
    assert np.all(np.isfinite(p)) and np.all(p >= -1e-16)
    assert np.all(p[np.abs(k) > 0.5] < 1e-15)
    special = model.otm_price(x, np.array([0.1, 0.1, math.nan]), np.array([0.0, -1.0, 0.5]))
    assert special[0] == 0.0 and special[1] == 0.0 and math.isnan(special[2])


# --------------------------------------------------------------------------------------------
# implied vols and Jacobian


@pytest.mark.parametrize(
    "x",
    [
        np.array([0.36, 2.0, 0.4, 1.2, -0.3]),
        np.array([2.0, 8.0, 1.0, 3.0, -0.8]),
        np.array([0.09, 0.5, 0.16, 0.6, 0.4]),
        np.array([0.3, 1.5, 0.4, 1.0, -0.4, 0.8, -0.15, 0.25]),
    ],
)
def test_implied_vols_finite_and_reprice(x: FloatArray) -> None:
    model = Heston() if x.shape[0] == 5 else Bates()
    k, T = _surface_grid(vol=math.sqrt(x[0]))
    iv = model.implied_vol(x, k, T, np.zeros(k.shape, np.int64))
    assert np.all(np.isfinite(iv)) and np.all((iv > 0.05) & (iv < 3.0))
    # Black's formula at those vols gives back the model's out-of-the-money prices
    otm = model.otm_price(x, k, T)
    # (to the rounding of the cosine sums, ~1e-16 of the forward)
    repriced = black_price(1.0, np.exp(k), T, iv, k >= 0.0)
    np.testing.assert_allclose(repriced, otm, rtol=1e-9, atol=2e-15)


@pytest.mark.parametrize(
    "x",
    [
        np.array([0.36, 2.0, 0.4, 1.2, -0.3]),
        np.array([1.0, 6.0, 0.5, 2.5, 0.3]),
        np.array([0.3, 1.5, 0.4, 1.0, -0.4, 0.8, -0.15, 0.25]),
        np.array([0.5, 3.0, 0.6, 1.5, -0.2, 3.0, 0.1, 0.6]),
    ],
)
def test_jacobian_matches_central_differences(x: FloatArray) -> None:
    model = Heston() if x.shape[0] == 5 else Bates()
    k, T = _surface_grid()
    idx = np.zeros(k.shape, np.int64)
    jac = model.jacobian(x, k, T, idx)
    assert jac.shape == (k.shape[0], x.shape[0])
    # points whose price is far below 1e-7 have a vega so small that the differences of
    # their implied vols are rounding noise; the analytic Jacobian is exact there too
    keep = model.otm_price(x, k, T) > 1e-7
    for j in range(x.shape[0]):
        h = 1e-4 * max(abs(x[j]), 0.1)
        up, down = x.copy(), x.copy()
        up[j] += h
        down[j] -= h
        fd = (model.implied_vol(up, k, T, idx) - model.implied_vol(down, k, T, idx)) / (2 * h)
        scale = np.max(np.abs(fd[keep]))
        err = np.max(np.abs(fd - jac[:, j])[keep])
        assert err <= 1e-5 * scale + 1e-8, f"column {j}: {err:.2e} vs scale {scale:.2e}"


def test_iv_and_jacobian_in_one_pass_agree() -> None:
    model = Bates()
    x = np.array([0.3, 1.5, 0.4, 1.0, -0.4, 0.8, -0.15, 0.25])
    k, T = _surface_grid()
    idx = np.zeros(k.shape, np.int64)
    iv, jac = model.iv_and_jacobian(x, k, T)
    # the gradient pass may run a few more cosine terms (for the gradient's own tail): the
    # prices differ below 1e-16, the vols by ~1e-12
    np.testing.assert_allclose(iv, model.implied_vol(x, k, T, idx), rtol=1e-10)
    np.testing.assert_array_equal(jac, model.jacobian(x, k, T, idx))


def test_prefetched_jacobian_is_only_reused_for_the_same_inputs() -> None:
    k, T = _surface_grid()
    idx = np.zeros(k.shape, np.int64)
    x = np.array([0.36, 2.0, 0.4, 1.2, -0.3])
    fresh = Heston(prefetch_jacobian=False)
    model = Heston()
    model.implied_vol(x, k, T, idx)
    np.testing.assert_array_equal(model.jacobian(x, k, T, idx), fresh.jacobian(x, k, T, idx))
    model.implied_vol(x, k, T, idx)
    k[:10] -= 0.01  # the caller reuses its buffer: the kept Jacobian must not be served
    np.testing.assert_array_equal(model.jacobian(x, k, T, idx), fresh.jacobian(x, k, T, idx))
    model.implied_vol(x, k, T, idx)
    y = x + np.array([0.0, 0.0, 0.0, 0.0, 0.01])
    np.testing.assert_array_equal(model.jacobian(y, k, T, idx), fresh.jacobian(y, k, T, idx))


# --------------------------------------------------------------------------------------------
# fitting


def _fit_grid() -> tuple[FloatArray, FloatArray]:
    """8 expiries x 15 strikes (about +-2.5 standard deviations)."""
    days = np.array([3, 7, 14, 30, 60, 91, 182, 365])
    ks, ts = [], []
    for t in days / 365.0:
        half = min(2.5 * 0.6 * math.sqrt(t), 1.2)
        ks.append(np.linspace(-half, half, 15))
        ts.append(np.full(15, t))
    return np.concatenate(ks), np.concatenate(ts)


@pytest.mark.parametrize(
    ("true", "start", "rtol"),
    [
        (
            np.array([0.30, 2.5, 0.45, 1.1, -0.35]),
            np.array([0.40, 1.5, 0.35, 0.7, -0.10]),
            0.02,
        ),
        (
            np.array([0.25, 2.0, 0.35, 0.9, -0.40, 0.6, -0.12, 0.20]),
            np.array([0.30, 2.6, 0.30, 1.1, -0.30, 0.4, -0.08, 0.25]),
            0.05,
        ),
    ],
)
def test_parameter_recovery_with_analytic_jacobian(
    true: FloatArray, start: FloatArray, rtol: float
) -> None:
    model = Heston() if true.shape[0] == 5 else Bates()
    k, T = _fit_grid()
    idx = np.zeros(k.shape, np.int64)
    target = model.implied_vol(true, k, T, idx)
    lo, hi = model.bounds(1)
    fit = least_squares(
        lambda x: model.implied_vol(x, k, T, idx) - target,
        start,
        jac=lambda x: model.jacobian(x, k, T, idx),
        bounds=(lo, hi),
        x_scale=model.scale(1),
        xtol=1e-12,
        ftol=1e-12,
        gtol=1e-12,
    )
    assert fit.success
    assert np.sqrt(np.mean(fit.fun**2)) < 1e-6
    np.testing.assert_allclose(fit.x, true, rtol=rtol, atol=1e-3)


def _fit_data(model_x: FloatArray) -> FitData:
    model = Heston()
    k, T = _fit_grid()
    slice_T = np.unique(T)
    idx = np.searchsorted(slice_T, T).astype(np.int64)
    iv = model.implied_vol(model_x, k, T, idx)
    nan = np.full(k.shape, np.nan)
    return FitData(
        k=k,
        T=T,
        slice_idx=idx,
        iv=iv,
        iv_bid=nan,
        iv_ask=nan,
        weight=np.ones(k.shape),
        is_call=k >= 0.0,
        slice_T=slice_T,
        slice_forward=np.ones(slice_T.shape),
    )


@pytest.mark.parametrize("rho", [-0.6, 0.5])
def test_initial_guesses_follow_the_data(rho: float) -> None:
    true = np.array([0.5, 2.0, 0.3, 1.0, rho])
    data = _fit_data(true)
    for model in (Heston(), Bates()):
        guesses = model.initial_guesses(data)
        lo, hi = model.bounds(data.n_slices)
        assert guesses and all(g.shape == lo.shape for g in guesses)
        assert all(np.all((g >= lo) & (g <= hi)) for g in guesses)
        best = guesses[0]
        assert np.sign(best[4]) == np.sign(rho)
        # short-dated ATM variance is near v0, long-dated nearer theta
        assert best[0] > best[2]
        assert model.arbitrage(best, data.slice_T) == []


# --------------------------------------------------------------------------------------------
# interface


def test_registry_names_bounds_and_scales() -> None:
    assert REGISTRY["heston"] is Heston and REGISTRY["bates"] is Bates
    assert streamer.models.heston.Heston is Heston and streamer.models.bates.Bates is Bates
    assert Heston().param_names(5) == ("v0", "kappa", "theta", "xi", "rho")
    assert Bates().param_names(3)[5:] == ("lam", "mu_j", "sigma_j")
    for model in (Heston(), Bates()):
        assert not model.per_expiry
        lo, hi = model.bounds(4)
        n = len(model.param_names(4))
        assert lo.shape == hi.shape == model.scale(4).shape == (n,)
        assert np.all(lo < hi) and np.all(model.scale(4) > 0)
        x = 0.5 * (lo + hi)
        np.testing.assert_array_equal(model.from_view(model.view(x, 4), 4), x)


def test_arbitrage_reports_bounds_and_nonfinite_but_not_feller() -> None:
    model = Heston()
    slice_T = np.array([1 / 365, 0.1, 1.0])
    feller_violated = np.array([0.3, 0.5, 0.3, 2.0, -0.5])  # 2 kappa theta = 0.3 < xi^2 = 4
    assert model.arbitrage(feller_violated, slice_T) == []
    out_of_bounds = np.array([0.3, 2.0, 0.4, 1.0, -1.2])
    found = model.arbitrage(out_of_bounds, slice_T)
    assert [v.check for v in found] == ["bounds"]
    assert found[0].amount == pytest.approx(0.21)
    nonfinite = model.arbitrage(np.array([0.3, 2.0, math.nan, 1.0, -0.5]), slice_T)
    assert [v.check for v in nonfinite] == ["nonfinite"] and nonfinite[0].slice == -1
    assert Bates().arbitrage(np.array([0.3, 2.0, 0.4, 1.0, -0.5, 0.5, -0.1, 0.2]), slice_T) == []


# Bates regimes whose short expiries are priced as a sum over the number of jumps
SPLIT_SETS = [
    (0.2, 20.0, 0.3, 3.5, -0.15, 0.07, -1.0, 1.1),  # rare crashes (the learned path's rival)
    (0.15, 3.4, 0.23, 2.2, -0.29, 5.0, -0.004, 0.106),  # many small jumps (a BTC optimum)
    (0.2, 3.0, 0.3, 0.8, -0.3, 0.1, -0.8, 0.05),
]


@pytest.mark.parametrize("x", SPLIT_SETS)
@pytest.mark.parametrize("days", [1, 3, 11])
def test_jump_split_prices_match_quantlib_to_the_tolerance(x: tuple[float, ...], days: int) -> None:
    """``otm_prices`` at the fit's and the coarse tolerances, where an expiry is summed over
    its jump components (``jump_components``), against QuantLib's ``BatesEngine``: within
    the tolerance asked for (in units of the forward)."""
    T = days / 365.0
    p = np.array(x)
    k = K_GRID * min(1.0, 4.0 * math.sqrt(x[0] * T) / 1.5)
    ref = _ql_prices(x, days, k, list(k >= 0.0))
    split = 0
    for tol in (1e-11, streamer.models.heston.FIT_TOL, streamer.models.heston.COARSE_TOL):
        split += streamer.models.heston.jump_components(T, p, 8, tol) >= 0
        ours, _ = streamer.models.heston.otm_prices(p, 8, k, np.full(k.shape, T), False, tol)
        assert np.max(np.abs(ours - ref)) <= tol, (tol, np.max(np.abs(ours - ref)))
    assert split >= 1 or days > 1  # every set splits its daily


@pytest.mark.parametrize("x", SPLIT_SETS)
def test_jump_split_gradient_matches_the_single_series(x: tuple[float, ...]) -> None:
    """The split's gradient (each component's, plus ``d P(N = n) / d lam`` times its price,
    plus the parity term's) against the one-series gradient at reference grade, which
    ``test_jacobian_matches_central_differences`` checks against differences."""
    p = np.array(x)
    T = np.repeat(np.array([1.0, 2.0, 5.0]) / 365.0, 15)
    k = np.tile(np.linspace(-0.25, 0.2, 15), 3)
    assert streamer.models.heston.jump_components(1.0 / 365.0, p, 8, 1e-11) >= 0
    split, g_split = streamer.models.heston.otm_prices(p, 8, k, T, True, 1e-11)
    ref, g_ref = streamer.models.heston.otm_prices(p, 8, k, T, True)
    np.testing.assert_allclose(split, ref, rtol=0.0, atol=1e-11)
    np.testing.assert_allclose(g_split, g_ref, rtol=0.0, atol=1e-9 * np.max(np.abs(g_ref)))
