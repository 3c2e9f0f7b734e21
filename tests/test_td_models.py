"""heston-td, bates-td and bates-tdl against independent references.

References: QuantLib's ``PiecewiseTimeDependentHestonModel`` with ``AnalyticPTDHestonEngine``
(Gauss-Lobatto at 1e-14) for the chained characteristic function, QuantLib's ``BatesEngine``
for constant pieces with jumps, our own Heston and Bates (an independent closed form) for
constant pieces, a direct numerical integration of the Riccati equations (scipy, DOP853) for
the complex-logarithm branch, central finite differences for the Jacobian, and the known
parameters of synthetic chains fitted through ``streamer.calib.calibrator.Calibrator``.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
import QuantLib as ql
from scipy.integrate import solve_ivp

from streamer.calib.calibrator import Calibrator
from streamer.models import REGISTRY
from streamer.models.base import FitData
from streamer.models.bates import Bates
from streamer.models.bates_td import BatesTD, BatesTDL
from streamer.models.heston import TAIL_TOL, Heston
from streamer.models.heston_td import HestonTD, _PiecewiseModel, durations, td_log_cf
from tests.synth import DEFAULT_DAYS, make_chain
from tests.test_heston_bates import _lewis_otm

FloatArray = npt.NDArray[np.float64]

EVAL_DATE = ql.Date(15, 1, 2024)
PIECE_DAYS = (3, 10, 31, 92, 365)
PIECE_T = np.array(PIECE_DAYS) / 365.0
# (v0, kappa, [(theta, xi, rho) per piece])
PTD_SETS = [
    (0.3, 2.0, [(0.5, 2.5, -0.1), (0.35, 1.5, -0.3), (0.4, 1.0, 0.2), (0.3, 0.8, -0.5),
                (0.45, 0.6, -0.6)]),
    (0.8, 6.0, [(0.2, 4.0, 0.5), (0.6, 3.0, -0.8), (0.3, 2.0, -0.2), (0.5, 1.2, 0.4),
                (0.25, 0.9, -0.3)]),
    (0.05, 0.7, [(0.1, 0.5, -0.9), (0.2, 1.5, -0.7), (0.04, 2.0, 0.0), (0.15, 0.3, 0.6),
                 (0.09, 1.0, -0.4)]),
]  # fmt: skip
# maturities inside the first, inside later pieces, on boundaries and at the last piece's end
DAYS = (1, 3, 7, 20, 31, 60, 200, 365)
K_GRID = np.linspace(-1.2, 0.8, 17)


def _td_vector(v0: float, kappa: float, pieces: list[tuple[float, float, float]]) -> FloatArray:
    return np.array([v0, kappa, *(v for p in pieces for v in p)])


def _ql_ptd_prices(
    v0: float, kappa: float, pieces: list[tuple[float, float, float]], days: int, k: FloatArray
) -> FloatArray:
    """QuantLib's piecewise time-dependent Heston prices (spot = forward = 1, zero rates),
    out of the money (puts for k < 0)."""
    settings = ql.Settings.instance()
    previous = settings.evaluationDate
    settings.evaluationDate = EVAL_DATE
    try:
        dc = ql.Actual365Fixed()
        curve = ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, 0.0, dc))
        spot = ql.QuoteHandle(ql.SimpleQuote(1.0))
        times = [d / 365.0 for d in PIECE_DAYS]

        def piecewise(column: int) -> ql.PiecewiseConstantParameter:
            par = ql.PiecewiseConstantParameter(times[:-1], ql.NoConstraint())
            for i, p in enumerate(pieces):
                par.setParam(i, float(p[column]))
            return par

        model = ql.PiecewiseTimeDependentHestonModel(
            curve,
            curve,
            spot,
            v0,
            piecewise(0),
            ql.ConstantParameter(kappa, ql.PositiveConstraint()),
            piecewise(1),
            piecewise(2),
            ql.TimeGrid(times),
        )
        engine = ql.AnalyticPTDHestonEngine(model, 1e-14, 10_000_000)
        exercise = ql.EuropeanExercise(EVAL_DATE + days)
        out = []
        for kk in k:
            kind = ql.Option.Call if kk >= 0.0 else ql.Option.Put
            option = ql.VanillaOption(ql.PlainVanillaPayoff(kind, float(np.exp(kk))), exercise)
            option.setPricingEngine(engine)
            out.append(option.NPV())
    finally:
        settings.evaluationDate = previous
    return np.asarray(out)


def _ql_bates_prices(x: tuple[float, ...], days: int, k: FloatArray) -> FloatArray:
    settings = ql.Settings.instance()
    previous = settings.evaluationDate
    settings.evaluationDate = EVAL_DATE
    try:
        dc = ql.Actual365Fixed()
        curve = ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, 0.0, dc))
        spot = ql.QuoteHandle(ql.SimpleQuote(1.0))
        model = ql.BatesModel(ql.BatesProcess(curve, curve, spot, *x))
        engine = ql.BatesEngine(model, 1e-14, 10_000_000)
        exercise = ql.EuropeanExercise(EVAL_DATE + days)
        out = []
        for kk in k:
            kind = ql.Option.Call if kk >= 0.0 else ql.Option.Put
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


def _grid(piece_T: FloatArray, n: int = 15) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """``n`` strikes per slice out to about 3 standard deviations (at 60% vol)."""
    ks, ts, idx = [], [], []
    for j, t in enumerate(piece_T):
        half = min(3.0 * 0.6 * math.sqrt(t), 1.2)
        ks.append(np.linspace(-half, half, n))
        ts.append(np.full(n, t))
        idx.append(np.full(n, j))
    return np.concatenate(ks), np.concatenate(ts), np.concatenate(idx).astype(np.int64)


# --------------------------------------------------------------------------------------------
# prices


@pytest.mark.parametrize("params", PTD_SETS)
def test_heston_td_matches_quantlib_piecewise_engine(
    params: tuple[float, float, list[tuple[float, float, float]]],
) -> None:
    v0, kappa, pieces = params
    x = _td_vector(v0, kappa, pieces)
    model = HestonTD(tol=TAIL_TOL)
    for days in DAYS:
        T = np.full(K_GRID.shape, days / 365.0)
        ours = model.otm_price(x, K_GRID, T, PIECE_T)
        ref = _ql_ptd_prices(v0, kappa, pieces, days, K_GRID)
        _assert_prices_close(ours, ref, f"{params[:2]} {days}d")


def test_default_tolerance_prices_agree_with_reference_grade() -> None:
    """The fitting tolerance (``FIT_TOL``) moves no price by more than ~1e-12 of the forward."""
    v0, kappa, pieces = PTD_SETS[1]
    x = _td_vector(v0, kappa, pieces)
    k, T, _ = _grid(PIECE_T, 25)
    fine = HestonTD(tol=TAIL_TOL).otm_price(x, k, T, PIECE_T)
    coarse = HestonTD().otm_price(x, k, T, PIECE_T)
    assert np.max(np.abs(fine - coarse)) < 5e-12


def test_equal_pieces_are_heston_and_zero_jumps_are_heston_td() -> None:
    h = np.array([0.3, 1.5, 0.4, 1.2, -0.4])
    x = np.concatenate([h[:2], np.tile(h[2:], len(PIECE_T))])
    k, T, idx = _grid(PIECE_T)
    T = np.concatenate([T, [0.5 / 365, 500 / 365]])  # before the first piece, past the last
    k = np.concatenate([k, [0.0, 0.1]])
    idx = np.concatenate([idx, [0, len(PIECE_T) - 1]])
    td = HestonTD(tol=TAIL_TOL, piece_T=PIECE_T)
    np.testing.assert_allclose(
        td.otm_price(x, k, T, PIECE_T), Heston().otm_price(h, k, T), rtol=1e-10, atol=1e-15
    )
    jumps = np.concatenate([x, [0.0, -0.2, 0.3]])
    np.testing.assert_allclose(
        BatesTD(tol=TAIL_TOL).otm_price(jumps, k, T, PIECE_T),
        td.otm_price(x, k, T, PIECE_T),
        rtol=1e-12,
        atol=1e-16,
    )
    np.testing.assert_allclose(
        BatesTD(piece_T=PIECE_T).jacobian(jumps, k, T, idx)[:, : x.shape[0]],
        HestonTD(piece_T=PIECE_T).jacobian(x, k, T, idx),
        rtol=1e-9,
        atol=1e-12,
    )


BATES_SETS = [
    (0.25, 2.0, 0.4, 1.0, -0.5, 0.5, -0.1, 0.15),
    (0.3, 1.0, 0.5, 1.5, -0.7, 2.0, -0.3, 0.4),
    (0.2, 3.0, 0.3, 0.8, -0.3, 0.1, -0.8, 0.05),
]
# what real crypto fits reach: rare big down-jumps, vol of vol at its bound (QuantLib's
# integration errs by 5e-8 here at 1 day; the 25-digit Lewis integral is the reference)
CRYPTO_BATES = (0.4, 15.0, 0.3, 5.0, 0.2, 0.5, -0.13, 0.45)


def _layouts(b: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Constant pieces in both jump layouts: one intensity, and one per piece."""
    one_lam = np.concatenate([b[:2], np.tile(b[2:5], len(PIECE_T)), b[5:]])
    per_piece = np.concatenate([b[:2], np.tile(np.append(b[2:5], b[5]), len(PIECE_T)), b[6:]])
    return one_lam, per_piece


@pytest.mark.parametrize("xb", BATES_SETS)
def test_constant_pieces_with_jumps_match_quantlib_bates(xb: tuple[float, ...]) -> None:
    """Both jump layouts; short maturities take the split by number of jumps."""
    b = np.array(xb)
    one_lam, per_piece = _layouts(b)
    for days in (1, 2, 5, 30, 200):
        T = np.full(K_GRID.shape, days / 365.0)
        ref = _ql_bates_prices(xb, days, K_GRID)
        _assert_prices_close(
            BatesTD(tol=TAIL_TOL).otm_price(one_lam, K_GRID, T, PIECE_T), ref, f"td {days}d"
        )
        _assert_prices_close(
            BatesTDL(tol=TAIL_TOL).otm_price(per_piece, K_GRID, T, PIECE_T), ref, f"tdl {days}d"
        )
        # and our own Bates at the same points
        np.testing.assert_allclose(
            BatesTD(tol=TAIL_TOL).otm_price(one_lam, K_GRID, T, PIECE_T),
            Bates().otm_price(b, K_GRID, T),
            rtol=1e-9,
            atol=1e-14,
        )


@pytest.mark.parametrize(("k", "days"), [(-1.075, 1), (-0.6, 1), (-0.3, 2), (0.2, 2), (-0.9, 5)])
def test_crypto_short_end_matches_25_digit_lewis_integral(k: float, days: int) -> None:
    one_lam, per_piece = _layouts(np.array(CRYPTO_BATES))
    ref = _lewis_otm(k, days / 365.0, CRYPTO_BATES)
    assert ref > 1e-7
    T = np.array([days / 365.0])
    for model, x in ((BatesTD(tol=TAIL_TOL), one_lam), (BatesTDL(tol=TAIL_TOL), per_piece)):
        ours = model.otm_price(x, np.array([k]), T, PIECE_T)[0]
        assert abs(ours - ref) <= 1e-9 * ref, (model.name, ours, ref)


def test_piecewise_intensity_is_the_time_average() -> None:
    """Jumps independent of the rest: only ``int lam dt`` matters at a maturity, so per-piece
    intensities with the same integral give the same prices as one intensity."""
    base = np.array([0.3, 2.0, 0.4, 1.0, -0.4])
    lam = np.array([1.5, 0.5, 0.2, 0.8, 0.4])
    x = np.concatenate(
        [base[:2], np.column_stack([np.tile(base[2:], (5, 1)), lam]).ravel(), [-0.1, 0.2]]
    )
    for days in (2, 10, 60):
        T = days / 365.0
        tau = durations(T, PIECE_T, int(np.searchsorted(PIECE_T, T)))
        mean_lam = float(np.dot(lam[: tau.shape[0]], tau) / T)
        y = np.concatenate([base[:2], np.tile(base[2:], 5), [mean_lam, -0.1, 0.2]])
        Tk = np.full(K_GRID.shape, T)
        np.testing.assert_allclose(
            BatesTDL(tol=TAIL_TOL).otm_price(x, K_GRID, Tk, PIECE_T),
            BatesTD(tol=TAIL_TOL).otm_price(y, K_GRID, Tk, PIECE_T),
            rtol=1e-10,
            atol=1e-15,
        )


def _riccati_log_cf(u: float, T: float, x: FloatArray, piece_T: FloatArray) -> complex:
    """``ln phi(u)`` by integrating dD/dtau = -q/2 - beta D + xi^2 D^2/2, dC/dtau = kappa
    theta D backward from T, piece by piece (no closed form, no logarithm)."""
    v0, kappa = x[0], x[1]
    q = u * u + 1j * u
    y = np.zeros(4)
    tau0 = 0.0
    edges = sorted({T - t for t in piece_T if t < T} | {T})
    for edge in edges:
        t_mid = T - 0.5 * (tau0 + edge)  # calendar time inside this piece
        i = int(np.searchsorted(piece_T, t_mid))
        theta, xi, rho = x[2 + 3 * i : 5 + 3 * i]
        beta = kappa - 1j * rho * xi * u

        def rhs(
            _: float, z: FloatArray, beta: complex = beta, xi: float = xi, theta: float = theta
        ) -> list[float]:
            d = z[0] + 1j * z[1]
            dd = -0.5 * q - beta * d + 0.5 * xi * xi * d * d
            dc = kappa * theta * d
            return [dd.real, dd.imag, dc.real, dc.imag]

        y = solve_ivp(rhs, (tau0, edge), y, method="DOP853", rtol=1e-12, atol=1e-14).y[:, -1]
        tau0 = edge
    return complex(y[2] + v0 * y[0], y[3] + v0 * y[1])


def test_chained_characteristic_function_matches_the_riccati_equations() -> None:
    """Random parameter sets (large vol of vol, long pieces, strong correlations) and
    frequencies up to where |phi| is ~e^-40: the principal logarithm of G is the continuous
    one (a wrong branch would change phi by a factor exp(2 pi i 2 kappa theta / xi^2))."""
    rng = np.random.default_rng(1)
    work = np.empty((4, 8), dtype=np.complex128)
    grad = np.empty(14, dtype=np.complex128)
    for _ in range(6):
        piece_T = np.cumsum(rng.uniform(0.05, 1.0, 4))
        pieces = np.column_stack(
            [rng.uniform(0.01, 1.0, 4), rng.uniform(0.3, 5.0, 4), rng.uniform(-0.95, 0.95, 4)]
        )
        x = np.concatenate([[rng.uniform(0.01, 1.0), rng.uniform(0.05, 5.0)], pieces.ravel()])
        T = float(piece_T[-1])
        tau = durations(T, piece_T, 3)
        for u in (0.5, 3.0, 10.0, 30.0):
            ours = td_log_cf(u, tau, x, 3, False, work, grad)
            if ours.real < -40.0:
                continue
            ref = _riccati_log_cf(u, T, x, piece_T)
            assert abs(np.exp(ours - ref) - 1.0) < 1e-7, (u, ours, ref)


# --------------------------------------------------------------------------------------------
# implied vols and Jacobian


@pytest.mark.parametrize("name", ["heston-td", "bates-td", "bates-tdl"])
def test_jacobian_matches_central_differences(name: str) -> None:
    model = REGISTRY[name]()
    assert isinstance(model, _PiecewiseModel)
    rng = np.random.default_rng(3)
    lo, hi = model.bounds(len(PIECE_T))
    x = lo + (hi - lo) * rng.uniform(0.15, 0.45, lo.shape)
    x[1] = 2.0  # kappa
    k, T, idx = _grid(PIECE_T)
    jac = model.jacobian(x, k, T, idx)
    assert jac.shape == (k.shape[0], x.shape[0])
    keep = model.otm_price(x, k, T, PIECE_T) > 1e-7
    for j in range(x.shape[0]):
        h = 1e-5 * max(abs(x[j]), 0.1)
        up, down = x.copy(), x.copy()
        up[j] += h
        down[j] -= h
        fd = (model.implied_vol(up, k, T, idx) - model.implied_vol(down, k, T, idx)) / (2 * h)
        scale = np.max(np.abs(fd[keep]))
        err = np.max(np.abs(fd - jac[:, j])[keep])
        assert err <= 1e-5 * scale + 1e-8, f"{model.param_names(5)[j]}: {err:.2e} vs {scale:.2e}"
    # a piece's parameters do not move the slices before it
    names = model.param_names(len(PIECE_T))
    later = [i for i, n in enumerate(names) if n.endswith("[3]")]
    assert np.all(jac[idx < 3][:, later] == 0.0)


def test_implied_vols_reprice_and_the_cache_serves_only_the_same_inputs() -> None:
    from streamer.pricing import black_price

    v0, kappa, pieces = PTD_SETS[0]
    x = np.concatenate([_td_vector(v0, kappa, pieces), [0.8, -0.15, 0.25]])
    k, T, idx = _grid(PIECE_T, 21)
    model = BatesTD()
    iv = model.implied_vol(x, k, T, idx)
    assert np.all(np.isfinite(iv)) and np.all((iv > 0.05) & (iv < 3.0))
    otm = model.otm_price(x, k, T, PIECE_T)
    np.testing.assert_allclose(
        black_price(1.0, np.exp(k), T, iv, k >= 0.0), otm, rtol=1e-9, atol=2e-15
    )
    # the cached coefficients serve the Jacobian at the same point, and nothing else
    np.testing.assert_array_equal(model.jacobian(x, k, T, idx), BatesTD().jacobian(x, k, T, idx))
    y = x.copy()
    y[4] += 0.01  # rho[0]
    np.testing.assert_array_equal(
        model.implied_vol(y, k, T, idx), BatesTD().implied_vol(y, k, T, idx)
    )
    k2 = k + 0.01
    np.testing.assert_array_equal(
        model.implied_vol(x, k2, T, idx), BatesTD().implied_vol(x, k2, T, idx)
    )
    T2 = T * 1.01  # new maturities at the same parameters: new coefficients
    np.testing.assert_array_equal(
        model.implied_vol(x, k, T2, idx), BatesTD().implied_vol(x, k, T2, idx)
    )
    # the series stop on the prices alone: the same vols with or without gradients
    np.testing.assert_array_equal(BatesTD(prefetch_jacobian=False).implied_vol(x, k, T, idx), iv)


def test_piece_ends_come_from_the_call_or_are_bound() -> None:
    v0, kappa, pieces = PTD_SETS[0]
    x = _td_vector(v0, kappa, pieces)
    k, T, idx = _grid(PIECE_T)
    full = HestonTD().implied_vol(x, k, T, idx)
    last = idx == 4
    with pytest.raises(ValueError, match="no point in this call"):
        HestonTD().implied_vol(x, k[last], T[last], idx[last])
    bound = HestonTD(piece_T=PIECE_T).implied_vol(x, k[last], T[last], idx[last])
    np.testing.assert_array_equal(bound, full[last])
    np.testing.assert_array_equal(HestonTD().iv_at(x, k[last], T[last], PIECE_T), full[last])
    with pytest.raises(ValueError, match="length"):
        HestonTD().implied_vol(x[:-1], k, T, idx)


# --------------------------------------------------------------------------------------------
# interface and checks


def test_registry_names_bounds_scales_and_view() -> None:
    assert REGISTRY["heston-td"] is HestonTD and REGISTRY["bates-td"] is BatesTD
    assert REGISTRY["bates-tdl"] is BatesTDL
    assert HestonTD().param_names(2) == (
        "v0", "kappa", "theta[0]", "xi[0]", "rho[0]", "theta[1]", "xi[1]", "rho[1]"
    )  # fmt: skip
    assert BatesTD().param_names(1)[-3:] == ("lam", "mu_j", "sigma_j")
    assert BatesTDL().param_names(1)[2:] == (
        "theta[0]",
        "xi[0]",
        "rho[0]",
        "lam[0]",
        "mu_j",
        "sigma_j",
    )
    for model in (HestonTD(), BatesTD(), BatesTDL()):
        assert not model.per_expiry
        lo, hi = model.bounds(4)
        n = len(model.param_names(4))
        assert lo.shape == hi.shape == model.scale(4).shape == (n,)
        assert np.all(lo < hi) and np.all(model.scale(4) > 0)
        x = 0.5 * (lo + hi)
        view = model.view(x, 4)
        assert set(view.slices[2]) >= {"theta", "xi", "rho"} and "kappa" in view.surface
        np.testing.assert_array_equal(model.from_view(view, 4), x)


def test_arbitrage_reports_bounds_and_nonfinite_only() -> None:
    model = BatesTD()
    slice_T = PIECE_T
    lo, hi = model.bounds(len(slice_T))
    x = 0.5 * (lo + hi)
    x[1] = 2.0
    assert model.arbitrage(x, slice_T) == []
    bad = x.copy()
    bad[4] = -1.2  # rho[0]
    found = model.arbitrage(bad, slice_T)
    assert [v.check for v in found] == ["bounds"] and found[0].amount == pytest.approx(0.21)
    nan = x.copy()
    nan[7] = math.nan
    assert [v.check for v in model.arbitrage(nan, slice_T)] == ["nonfinite"]
    assert model.arbitrage(x[:-1], slice_T)[0].check == "nonfinite"


def test_calendar_and_convexity_hold_by_construction() -> None:
    """Prices of a martingale: at fixed k, non-decreasing in T (across piece ends, also inside
    pieces), and convex in the strike."""
    v0, kappa, pieces = PTD_SETS[1]
    x = np.concatenate([_td_vector(v0, kappa, pieces), [1.0, -0.2, 0.3]])
    k = np.linspace(-0.8, 0.6, 57)
    T = np.array([0.5, 2.0, 3.0, 4.0, 10.0, 11.0, 60.0, 300.0]) / 365.0
    model = BatesTD()
    calls = np.empty((T.shape[0], k.shape[0]))
    for i, t in enumerate(T):
        otm = model.otm_price(x, k, np.full(k.shape, t), PIECE_T)
        calls[i] = np.where(k >= 0.0, otm, otm + 1.0 - np.exp(k))
    assert np.all(np.diff(calls, axis=0) >= -1e-12)
    K = np.exp(k)
    slopes = np.diff(calls, axis=1) / np.diff(K)
    assert np.all(np.diff(slopes, axis=1) >= -1e-9)


def test_far_wing_noise_has_no_vol_and_calendar_holds_where_vols_exist() -> None:
    """Far out of the money a price is rounding noise (the parity call ``P + 1 - e^k``): its
    vol is NaN, not the vol of the noise, so the calibrator's calendar check on the whole
    quoted range (1-day wings at k = 1.7 beside 1-year quotes) sees no false fall."""
    v0, kappa, pieces = PTD_SETS[1]
    x = np.concatenate([_td_vector(v0, kappa, pieces), [1.5, -0.1, 0.2]])
    model = BatesTD()
    k = np.linspace(-1.6, 1.8, 69)
    T = np.array([1.0, 2.0, 3.0, 31.0, 200.0]) / 365.0  # one maturity per piece
    kk, TT = np.tile(k, T.shape[0]), np.repeat(T, k.shape[0])
    iv = model.implied_vol(x, kk, TT, np.repeat(np.arange(T.shape[0]), k.shape[0]))
    otm = model.otm_price(x, kk, TT, T)
    assert np.all(np.isnan(iv[otm < 1e-12])) and np.all(np.isfinite(iv[otm > 1e-9]))
    w = (iv * iv * TT).reshape(T.shape[0], k.shape[0])
    falls = w[:-1] - w[1:]
    assert np.all(falls[np.isfinite(falls)] <= 1e-9)
    assert np.isnan(model.implied_vol(x, np.array([1.7]), T[:1], np.zeros(1, np.int64))[0])


def _fit_data(model: _PiecewiseModel, x: FloatArray) -> FitData:
    k, T, idx = _grid(PIECE_T)
    iv = model.implied_vol(x, k, T, idx)
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
        slice_T=PIECE_T.copy(),
        slice_forward=np.ones(PIECE_T.shape),
    )


@pytest.mark.parametrize("name", ["heston-td", "bates-td", "bates-tdl"])
def test_initial_guesses_are_valid_and_follow_the_term_structure(name: str) -> None:
    model = REGISTRY[name]()
    assert isinstance(model, _PiecewiseModel)
    v0, kappa, pieces = PTD_SETS[0]
    x = _td_vector(v0, kappa, pieces)
    data = _fit_data(HestonTD(), x)
    guesses = model.initial_guesses(data)
    lo, hi = model.bounds(data.n_slices)
    assert guesses and all(g.shape == lo.shape for g in guesses)
    assert all(np.all((g >= lo) & (g <= hi)) for g in guesses)
    assert all(model.arbitrage(g, data.slice_T) == [] for g in guesses)
    # v0 from the shortest ATM variance; theta[j] near the forward ATM variance of piece j
    atm = HestonTD().implied_vol(x, np.zeros(5), PIECE_T, np.arange(5))
    assert guesses[0][0] == pytest.approx(atm[0] ** 2, rel=0.1)
    w = atm**2 * PIECE_T
    fwd = np.diff(np.concatenate([[0.0], w])) / np.diff(np.concatenate([[0.0], PIECE_T]))
    theta = guesses[0][2 : 2 + model.n_piece * 5 : model.n_piece]
    np.testing.assert_allclose(theta, fwd, rtol=0.2)


# --------------------------------------------------------------------------------------------
# fitting through the calibrator


SYNTH_T = np.array(DEFAULT_DAYS) / 365.0
SYNTH_PIECES = np.column_stack(
    [
        [0.5, 0.45, 0.4, 0.36, 0.33, 0.3, 0.3, 0.28],  # theta: falling forward variance
        [2.0, 1.8, 1.5, 1.2, 1.0, 0.9, 0.8, 0.7],  # xi: vol of vol falling with maturity
        [-0.2, -0.25, -0.3, -0.35, -0.4, -0.4, -0.45, -0.5],  # rho
    ]
)


@pytest.mark.parametrize("name", ["heston-td", "bates-td"])
def test_parameter_recovery_through_the_calibrator(name: str) -> None:
    """A synthetic chain (8 expiries, 2 days to 1 year) priced by the model itself, noisy
    quotes: the cold fit puts the quotes in the band, recovers the ATM term structure and the
    well-identified parameters (v0, kappa, jumps, and theta where the piece lets the variance
    revert), and the pieces as a whole within a few penalty scales."""
    model = REGISTRY[name]()
    assert isinstance(model, _PiecewiseModel)
    true = np.concatenate([[0.4, 3.0], SYNTH_PIECES.ravel()])
    if name == "bates-td":
        true = np.concatenate([true, [0.8, -0.1, 0.2]])

    def iv_fn(k: FloatArray, T: FloatArray, j: int) -> FloatArray:
        return model.iv_at(true, k, T, SYNTH_T)

    snap = make_chain(iv_fn, noise_iv=0.002, half_spread_iv=0.008, rng=np.random.default_rng(11))
    result = Calibrator(REGISTRY[name]()).fit(snap)
    assert result.success and result.status == "ok" and not result.violations
    assert len(result.slices) == len(DEFAULT_DAYS) and result.in_band > 0.95
    for j, s in enumerate(result.slices):
        assert s.atm_iv == pytest.approx(
            float(iv_fn(np.zeros(1), SYNTH_T[j : j + 1], j)[0]), abs=0.005
        )
    got = result.x[0]
    assert got[0] == pytest.approx(true[0], rel=0.05)  # v0
    assert got[1] == pytest.approx(true[1], rel=0.2)  # kappa
    if name == "bates-td":
        np.testing.assert_allclose(got[-3:], true[-3:], rtol=0.15, atol=0.02)
    theta = got[2 : 2 + 3 * 8 : 3]
    np.testing.assert_allclose(theta[3:], SYNTH_PIECES[3:, 0], rtol=0.15)  # pieces of 2+ weeks
    scale = model.scale(8)
    assert np.median(np.abs(got - true) / scale) < 3.0


def test_warm_refit_with_penalty_stays_put_on_requotes() -> None:
    """Re-quotes of one unchanged surface: the warm fits keep the quotes in the band and the
    parameter jitter well below the cold fits'."""
    model = HestonTD()
    true = np.concatenate([[0.4, 3.0], SYNTH_PIECES.ravel()])

    def iv_fn(k: FloatArray, T: FloatArray, j: int) -> FloatArray:
        return model.iv_at(true, k, T, SYNTH_T)

    rng = np.random.default_rng(5)
    snaps = [make_chain(iv_fn, noise_iv=0.004, half_spread_iv=0.01, rng=rng) for _ in range(6)]
    cold_cal, warm_cal = Calibrator(HestonTD()), Calibrator(HestonTD())
    cold, warm = [], []
    for s in snaps:
        cold_cal.last_good = None
        cold.append(cold_cal.fit(s))
        warm.append(warm_cal.fit(s))
    assert all(r.success for r in cold + warm)
    assert all(r.warm and not r.regime_shift for r in warm[1:])
    scale = model.scale(8)

    def jitter(results: list) -> float:  # type: ignore[type-arg]
        xs = np.array([r.x[0] for r in results])
        return float(np.sqrt(np.mean((np.diff(xs, axis=0) / scale) ** 2)))

    assert jitter(warm) <= jitter(cold) / 3.0
    assert np.mean([r.in_band for r in warm]) >= np.mean([r.in_band for r in cold]) - 0.02


def test_published_surface_evaluates_every_slice_and_any_maturity() -> None:
    """Through the pipeline: a heston-td fit's payload rebuilt as a ``Surface`` (what a bot
    does) prices every slice alone, as the fit did (its piece ends bound from the payload's
    maturities), and answers between and beyond the expiries; its greeks cover every one."""
    from streamer.client.surface import Surface
    from streamer.daemon.pipeline import Pipeline

    model = HestonTD()
    true = np.concatenate([[0.4, 3.0], SYNTH_PIECES.ravel()])

    def iv_fn(k: FloatArray, T: FloatArray, j: int) -> FloatArray:
        return model.iv_at(true, k, T, SYNTH_T)

    snap = make_chain(iv_fn, noise_iv=0.002, half_spread_iv=0.008, rng=np.random.default_rng(11))
    pipe = Pipeline(models=["heston-td"])
    cal = Calibrator(HestonTD())
    result = cal.fit(snap)
    assert result.success
    payload = pipe.surface_message(snap, "heston-td", result, 1)
    surface = Surface.from_payload(payload)
    for s in result.slices:
        K = s.forward * np.exp(np.array([-0.2, 0.0, 0.15]))
        want = model.iv_at(result.x[0], np.log(K / s.forward), np.full(3, s.T), piece_ends(result))
        np.testing.assert_allclose(surface.iv(K, s.expiry), want, rtol=1e-9)
    mid = 0.5 * (result.slices[2].T + result.slices[3].T)
    F = surface.forward_at(mid)
    got = surface.iv_at(F * np.exp(np.array([-0.1, 0.0, 0.1])), mid, F)
    want = model.iv_at(result.x[0], np.array([-0.1, 0.0, 0.1]), np.full(3, mid), piece_ends(result))
    np.testing.assert_allclose(got, want, rtol=1e-9)


def piece_ends(result: object) -> FloatArray:
    """The piece ends of a fit: its slices' maturities."""
    return np.array([s.T for s in result.slices])  # type: ignore[attr-defined]
