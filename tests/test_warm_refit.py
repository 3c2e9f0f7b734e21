"""The warm refit's shortcuts (issue 13, warm spline refit speed): the spline's fixed-geometry
rows equal the point-by-point evaluation they replace, the warm stall rule stops where a fit
run to convergence would publish the same IVs (within a small share of each half-spread),
a re-fit of an unchanged chain keeps its parameters, and the vectorised range and listing
helpers equal their plain loops."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from streamer.book.snapshot import ChainSnapshot
from streamer.calib.calibrator import CalibConfig, Calibrator, FitResult
from streamer.calib.constraints import common_range, pair_ranges, slice_ranges
from streamer.calib.data import FilterConfig, prepare
from streamer.models import REGISTRY
from streamer.models import spline as sp
from streamer.models.base import FloatArray
from streamer.tools.chains import load_chains
from tests.conftest import shared_file
from tests.synth import make_chain, svi_surface

REAL = "snapshots/deribit_options_snapshot_20260105T041127Z.csv"


def own_config(name: str, **kw: object) -> CalibConfig:
    """The model's ``calib_defaults`` spelled out, with ``kw`` on top."""
    d = dict(REGISTRY[name].calib_defaults)
    filters = d.pop("filters", {})
    assert isinstance(filters, dict)
    d.update(kw)
    return CalibConfig(filters=FilterConfig(**filters), **d)  # type: ignore[arg-type]


def requote(snap: ChainSnapshot, rng: np.random.Generator, noise: float) -> ChainSnapshot:
    """Every bid and ask moved by up to ``noise`` of its half-spread."""
    half = 0.5 * (snap.ask - snap.bid)
    shift = noise * half * rng.uniform(-1.0, 1.0, size=snap.n_quotes)
    return dataclasses.replace(snap, bid=snap.bid + shift, ask=snap.ask + shift)


def real_chain() -> ChainSnapshot:
    return load_chains(shared_file(REAL), "BTC")[0]


def spline_slices() -> list[FloatArray]:
    """Fitted spline slices of the real chain (short wiggly dailies to a year), and each
    with its coefficients and slopes perturbed (hinge rows active, refined points)."""
    r = Calibrator(REGISTRY["spline"](), own_config("spline")).fit(real_chain())
    assert r.success
    rng = np.random.default_rng(4)
    out = []
    for x in r.x:
        out.append(np.ascontiguousarray(x, dtype=np.float64))
        y = x.copy()
        y[: sp.NC] *= rng.uniform(0.7, 1.3, sp.NC)
        y[sp.I_BL] = min(1.9, y[sp.I_BL] * 1.5)
        out.append(np.ascontiguousarray(y, dtype=np.float64))
    return out


def test_fixed_geometry_rows_equal_pointwise_evaluation() -> None:
    """``spline_design``/``spline_geometry``/``spline_hinges_fixed``/``spline_row_design``
    (the compiled LM's rows, built once per slice run) against ``spline_wgrad``,
    ``spline_hinges`` and ``spline_row``, which evaluate every point afresh."""
    p = sp.N_PARAMS
    m_rows = sp.N_HINGE
    active = 0
    for x in spline_slices():
        kl = x[sp.I_S] * math.sinh(x[sp.I_YL])
        kr = x[sp.I_S] * math.sinh(x[sp.I_YR])
        k = np.linspace(kl - 0.3, kr + 0.3, 57)
        D = np.zeros((len(k), p))
        sp.spline_design(x, k, D)
        jac_ref = np.empty(p)
        jac = np.empty(p)
        for i, ki in enumerate(k.tolist()):
            assert sp.spline_row_design(x, D[i], 0.3, jac) == pytest.approx(
                sp.spline_row(x, ki, 0.3, jac_ref), rel=1e-13
            )
            np.testing.assert_allclose(jac, jac_ref, rtol=1e-12, atol=1e-14)
        kh = np.zeros(sp.N_HINGE_GRID)
        hw, h1, h2 = (np.zeros((sp.N_HINGE_GRID, p)) for _ in range(3))
        rough = np.zeros((sp.NC, p))
        sp.spline_geometry(x, kh, hw, h1, h2, rough)
        rows_ref, ejac_ref = np.zeros(m_rows), np.zeros((m_rows, p))
        rows, ejac = np.zeros(m_rows), np.zeros((m_rows, p))
        for margin in (sp.HINGE_MARGIN, 0.3):  # 0.3: most points active
            n_ref = sp.spline_hinges(x, margin, sp.HINGE_MU, sp.ROUGHNESS, rows_ref, ejac_ref, 0)
            n = sp.spline_hinges_fixed(
                x, kh, hw, h1, h2, rough, margin, sp.HINGE_MU, sp.ROUGHNESS, rows, ejac, 0
            )
            assert n == n_ref == m_rows
            scale = max(1.0, float(np.abs(rows_ref).max()))
            np.testing.assert_allclose(rows, rows_ref, rtol=1e-9, atol=1e-9 * scale)
            jscale = max(1.0, float(np.abs(ejac_ref).max()))
            np.testing.assert_allclose(ejac, ejac_ref, rtol=1e-8, atol=1e-9 * jscale)
            active += int(np.count_nonzero(rows_ref[: sp.N_HINGE_BF]))
    assert active > 0  # the comparison covered active butterfly rows


@pytest.mark.parametrize("name", ["spline", "svi", "sabr"])
def test_warm_stall_rule_publishes_what_convergence_would(name: str) -> None:
    """Warm refits of re-quotes of the real chain: the default warm stall rule against the
    same refits run to convergence (the LM's own stall rule, 200 iterations): every fitted
    IV within a tenth of its quote's half-spread (as the numpy and compiled LMs agree, see
    ``test_kernel``), the in-band share within one quote."""
    snap = real_chain()
    model = REGISTRY[name]()
    quick = Calibrator(model, own_config(name))
    full = Calibrator(model, own_config(name, max_iter_warm=200, warm_stall_iters=10,
                                      warm_stall_rtol=1e-4))  # fmt: skip
    quick.fit(snap)
    full.fit(snap)
    rng = np.random.default_rng(7)
    nfev_quick, nfev_full = [], []
    for _ in range(4):
        q = requote(snap, rng, 0.05)
        a, b = quick.fit(q), full.fit(q)
        assert a.success and b.success and a.warm and b.warm
        assert a.prepared is not None
        assert a.expiries == b.expiries
        gap = np.abs(a.fitted_iv - b.fitted_iv) * a.prepared.data.weight
        assert float(gap.max()) <= 0.1, name
        assert abs(a.in_band - b.in_band) <= 1.0 / a.n_quotes + 1e-12
        nfev_quick.append(a.nfev)
        nfev_full.append(b.nfev)
        quick.last_good = b  # both go on from the same accepted fit
    assert max(nfev_quick) <= max(nfev_full)


def test_refit_of_an_unchanged_chain_keeps_its_parameters() -> None:
    """The spline fitted, then re-fitted warm to the very same quotes: the change penalty and
    the stall rule keep the accepted fit (IVs move by < 1 % of any half-spread)."""
    _, fn = svi_surface()
    snap = make_chain(fn, noise_iv=0.003, half_spread_iv=0.01, rng=np.random.default_rng(2))
    cal = Calibrator(REGISTRY["spline"](), own_config("spline"))
    first = cal.fit(snap)
    again = cal.fit(dataclasses.replace(snap, ts_ms=snap.ts_ms + 1000))
    assert first.success and again.success and again.warm and not again.regime_shift
    assert first.prepared is not None
    gap = np.abs(again.fitted_iv - first.fitted_iv) * first.prepared.data.weight
    assert float(gap.max()) < 0.01
    assert again.in_band == first.in_band


def _ranges_loop(r: FitResult) -> tuple[FloatArray, FloatArray]:
    assert r.prepared is not None
    ranges = slice_ranges(r.prepared.data, r.prepared.listed_k)
    S = len(ranges)
    lo, hi = np.full(S, -0.02), np.full(S, 0.02)
    for j in range(1, S):
        lo[j], hi[j] = common_range(ranges, j - 1, j, 0.02)
    return lo, hi


def test_pair_ranges_equal_common_range_per_pair() -> None:
    """The vectorised ``pair_ranges`` against ``common_range`` pair by pair, on a real chain
    and on ranges shuffled so that some neighbours do not overlap."""
    r = Calibrator(REGISTRY["svi"](), own_config("svi")).fit(real_chain())
    assert r.prepared is not None
    data, listed = r.prepared.data, r.prepared.listed_k
    lo, hi = pair_ranges(data, listed=listed)
    lo_ref, hi_ref = _ranges_loop(r)
    np.testing.assert_array_equal(lo, lo_ref)
    np.testing.assert_array_equal(hi, hi_ref)
    # listed ranges that leave gaps between neighbours: placed apart, every other slice
    S = data.n_slices
    far = np.array([[5.0 + j, 5.5 + j] if j % 2 else [-9.0, -8.5] for j in range(S)])
    prep = dataclasses.replace(r.prepared, listed_k=far)
    lo, hi = pair_ranges(data, listed=far)
    lo_ref, hi_ref = _ranges_loop(dataclasses.replace(r, prepared=prep))
    np.testing.assert_array_equal(lo, lo_ref)
    np.testing.assert_array_equal(hi, hi_ref)


def test_listed_ranges_from_the_listing() -> None:
    """``Prepared.listed_k``: per fitted expiry, ``ln(K/F)`` of its lowest and highest
    listed strike, here computed expiry by expiry from the listing's own columns."""
    snap = real_chain()
    prep = prepare(snap, FilterConfig(min_T_days=0.0833), 4)
    listing = snap.listing
    codes = listing.expiries if listing is not None else snap.expiries
    strike = listing.strike if listing is not None else snap.strike
    exp_idx = listing.expiry_idx if listing is not None else snap.expiry_idx
    assert prep.listed_k.shape == (prep.data.n_slices, 2)
    for j, code in enumerate(prep.data.slice_expiry):
        K = strike[exp_idx == codes.index(code)]
        K = K[np.isfinite(K) & (K > 0)]
        F = float(prep.data.slice_forward[j])
        assert prep.listed_k[j, 0] == pytest.approx(math.log(K.min() / F), abs=1e-15)
        assert prep.listed_k[j, 1] == pytest.approx(math.log(K.max() / F), abs=1e-15)


def test_knot_constant_helpers_equal_their_pointwise_forms() -> None:
    """``w012_knots``/``iv_knots``/``wgrad_knots`` (the slice's outer-knot ``sinh``/``cosh``
    computed once) give exactly ``spline_w012``/``spline_iv``/``spline_wgrad``'s values, on
    both wings, on the outer knots and inside."""
    p = sp.N_PARAMS
    g_ref, g = np.empty(p), np.empty(p)
    for x in spline_slices():
        kn = sp.spline_knots(x)
        kl = x[sp.I_S] * math.sinh(x[sp.I_YL])
        kr = x[sp.I_S] * math.sinh(x[sp.I_YR])
        ks = [*np.linspace(kl - 0.5, kr + 0.5, 301).tolist(), kl, kr, 0.0]
        for k in ks:
            assert sp.w012_knots(x, kn, k) == sp.spline_w012(x, k)
            assert sp.iv_knots(x, kn, k, 0.2) == sp.spline_iv(x, k, 0.2)
            assert sp.wgrad_knots(x, kn, k, g) == sp.spline_wgrad(x, k, g_ref)
            np.testing.assert_array_equal(g, g_ref)


def test_check_slices_against_a_plain_grid() -> None:
    """``check_slices`` (interval coefficients once, ``sinh``/``cosh`` from one ``exp``)
    against ``spline_w012`` and ``g_of`` on the same knot-coordinate grid, point by point:
    the same smallest ``w``, a smallest ``g`` no larger than the grid's (the refinement only
    looks for lower points) and no smaller than a 20x denser grid's minus a small slack."""
    X = np.array(spline_slices())
    found = sp.check_slices(X)
    per = sp.CHECK_PER_INT
    for j, x in enumerate(X):
        wmin, gmin = _plain_grid(x, per)
        _, g_dense = _plain_grid(x, 20 * per)
        assert found[j, 2] == pytest.approx(wmin, rel=1e-12)
        assert found[j, 0] <= gmin + 1e-12
        assert found[j, 0] >= g_dense - 1e-3 * max(1.0, abs(g_dense))
        # the pass flag: exactly when the per-slice check (from scratch) finds nothing
        assert (found[j, 4] == 1.0) == (sp._check(x, 0) == [])
    assert 0.0 < float(found[:, 4].mean()) < 1.0  # both kinds of slices were compared


def _plain_grid(x: FloatArray, n: int) -> tuple[float, float]:
    """Smallest ``w`` and ``g`` on ``n`` points per knot interval, evenly in ``y``."""
    yl, yr, s = x[sp.I_YL], x[sp.I_YR], x[sp.I_S]
    h = (yr - yl) / sp.N_INT
    ws, gs = [], []
    for i in range(n * sp.N_INT + 1):
        k = s * math.sinh(yl + h * i / n)
        w, w1, w2 = sp.spline_w012(x, k)
        ws.append(w)
        gs.append(sp.g_of(k, w, w1, w2) if w > 0.0 else -math.inf)
    return min(ws), min(gs)


@pytest.mark.parametrize("name", ["spline", "svi", "sabr"])
def test_fit_statistics_equal_their_numpy_definitions(name: str) -> None:
    """A warm refit's totals and per-slice statistics (one compiled pass, ``block_stats``)
    against numpy on the result's own IVs: RMS of (fitted - mid), in-band share and quotes,
    overall and per expiry; the weighted RMS the regime test keeps equals ``block_wrms``."""
    from streamer.calib.result import block_stats, block_wrms, starts_of, wrms_of

    snap = real_chain()
    cal = Calibrator(REGISTRY[name](), own_config(name))
    cal.fit(snap)
    r = cal.fit(requote(snap, np.random.default_rng(3), 0.05))
    assert r.success and r.warm and r.prepared is not None
    data = r.prepared.data
    iv = r.fitted_iv
    inside = (iv >= data.iv_bid) & (iv <= data.iv_ask)
    assert r.rmse_iv == pytest.approx(float(np.sqrt(np.mean((iv - data.iv) ** 2))), rel=1e-12)
    assert r.in_band == pytest.approx(float(np.mean(inside)), rel=1e-14)
    assert r.n_quotes == data.n_quotes
    for j, sl in enumerate(r.slices):
        m = data.slice_idx == j
        assert sl.n_quotes == int(m.sum())
        assert sl.rmse_iv == pytest.approx(float(np.sqrt(np.mean((iv[m] - data.iv[m]) ** 2))))
        assert sl.in_band == pytest.approx(float(np.mean(inside[m])), rel=1e-14)
        assert cal.history.prev_wrms[sl.expiry] == pytest.approx(
            float(np.sqrt(np.mean((data.weight[m] * (iv[m] - data.iv[m])) ** 2))), rel=1e-12
        )
    starts = starts_of(data.slice_idx, data.n_slices)
    bad = iv.copy()
    bad[[0, 5]] = np.nan  # non-finite residuals count as 1e6 in both
    for v in (iv, bad):
        np.testing.assert_allclose(
            wrms_of(block_stats(v, data, starts)), block_wrms(v, data, starts), rtol=1e-13
        )


def test_kept_spline_geometry_changes_no_fit() -> None:
    """The spline's hinge geometry kept between fits (``History.geometry``): warm refits
    with it equal, bit for bit, refits that rebuild it; and a run whose knot maps moved to
    other slice positions (rows of the start shuffled) rebuilds what no longer matches."""
    from streamer.calib import kernel

    snap = real_chain()
    kept = Calibrator(REGISTRY["spline"](), own_config("spline"))
    fresh = Calibrator(REGISTRY["spline"](), own_config("spline"))
    rng = np.random.default_rng(11)
    for i in range(4):
        q = snap if i == 0 else requote(snap, rng, 0.05)
        fresh.history.geometry = None
        a, b = kept.fit(q), fresh.fit(q)
        assert a.success and b.success
        np.testing.assert_array_equal(a.fitted_iv, b.fitted_iv)
        assert all(np.array_equal(u, v) for u, v in zip(a.x, b.x, strict=True))
    cache = kept.history.geometry
    assert cache is not None and np.all(np.isfinite(cache[0]))
    # the kernel straight: the kept cache against none, on starts with rows shuffled
    assert a.prepared is not None
    data = a.prepared.data
    S = data.n_slices
    X0 = np.array(a.x)[rng.permutation(S)]
    lo, hi = sp.LOWER, sp.UPPER
    args = (
        sp.Spline.kernel_kind, 0.0, np.ascontiguousarray(X0), np.ones(S, dtype=np.bool_),
        data.k, data.T, data.iv, data.weight, np.zeros(0), 0.5, 1, 1.0,
        np.searchsorted(data.slice_idx, np.arange(S)).astype(np.int64),
        np.tile(lo, (S, 1)), np.tile(hi, (S, 1)), np.zeros((S, sp.N_PARAMS)),
        np.zeros((S, sp.N_PARAMS)), True, np.zeros((S, 0)), np.zeros((S, 0)),
        np.tile(np.linspace(-0.2, 0.2, 49), (S, 1)), data.slice_T, 5, 1e-5, 1e-9, 3, 1e-3,
    )  # fmt: skip
    with_cache = kernel.fit_slices_cached(*args, cache)
    without = kernel.fit_slices(*args)
    for u, v in zip(with_cache[:4], without[:4], strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(cache[0][:, 0], X0[:, sp.I_S])  # rebuilt for the new maps


def test_svi_suspect_slices_equal_the_array_expressions() -> None:
    """SVI's compiled screen (``_suspect_slices``) against the array expressions it
    replaced, on the real chain's fitted slices and on perturbed ones (some suspect)."""
    from streamer.models import svi

    r = Calibrator(REGISTRY["svi"](), own_config("svi")).fit(real_chain())
    rng = np.random.default_rng(5)
    X = np.array(r.x)
    bent = X * rng.uniform(0.5, 1.5, X.shape)
    bent[:, 2] = np.clip(bent[:, 2], -0.999, 0.999)
    for Y in (X, bent, np.vstack([X, bent])):
        a, b, rho, m, sigma = (Y[:, i : i + 1] for i in range(5))
        width = np.maximum(sigma, 1e-3)
        k = np.concatenate(
            [np.broadcast_to(svi.GRID_K, (Y.shape[0], len(svi.GRID_K))), m + width * svi._FINE],
            axis=1,
        )
        d = k - m
        rr = np.sqrt(d * d + sigma * sigma)
        w = np.maximum(a + b * (rho * d + rr), svi.VAR_FLOOR)
        w1 = b * (rho + d / rr)
        w2 = b * sigma * sigma / (rr * rr * rr)
        g = (1.0 - k * w1 / (2.0 * w)) ** 2 - 0.25 * w1 * w1 * (1.0 / w + 0.25) + 0.5 * w2
        wmin = (a + b * sigma * np.sqrt(np.maximum(1.0 - rho * rho, 0.0)))[:, 0]
        lee = (b * (1.0 + np.abs(rho)))[:, 0]
        ref = (g.min(axis=1) < -1e-9) | (wmin < 0.0) | (lee > 2.0 + 1e-12)
        got = svi._suspect_slices(np.ascontiguousarray(Y), svi.GRID_K, svi._FINE)
        np.testing.assert_array_equal(got, ref)
    assert ref.any() and not ref.all()


def test_grid_linspace_equals_numpy() -> None:
    """``constraints.linspace`` (a range made once) gives ``np.linspace``'s values exactly,
    for the grid sizes it keeps a range for and others, either direction, equal ends."""
    from streamer.calib.constraints import linspace

    rng = np.random.default_rng(8)
    for _ in range(2000):
        a, b = (float(v) for v in rng.normal(0.0, 3.0, 2))
        for n in (49, 61, 7):
            np.testing.assert_array_equal(linspace(a, b, n), np.linspace(a, b, n))
            np.testing.assert_array_equal(linspace(b, a, n), np.linspace(b, a, n))
    np.testing.assert_array_equal(linspace(1.5, 1.5, 61), np.linspace(1.5, 1.5, 61))
